"""The sd3 world end to end on a tiny random Stable Diffusion 3 pipeline built offline: load_world reads
it, sde.sample's ODE equals diffusers' own StableDiffusion3Pipeline from the same noise, and a LoRA
saved by worlds.save_lora is read back by diffusers' load_lora_weights with its scale intact."""

import os

import pytest
import torch

import sde
import worlds
from sd3_tiny import build_tiny_sd3


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3(path)
    return str(path)


def test_sd3_ode_equals_the_diffusers_pipeline(pipeline_dir):
    from diffusers import StableDiffusion3Pipeline

    world = worlds.load_world(pipeline_dir, device="cpu")
    assert world.kind == "sd3" and world.latent_shape == (16, 16, 16) and world.dtype == torch.float32
    prompts, seeds = ["a red cat", 'a sign that says "hi"'], [3, 4]
    ours = sde.sample(world, prompts, steps=3, guidance_scale=4.5, noise_level=0.0, seeds=seeds)
    assert ours["images"].shape == (2, 3, 32, 32) and torch.isfinite(ours["images"]).all()

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    x1 = torch.stack([torch.randn(world.latent_shape, generator=g) for g in sde.seed_generators(seeds)])
    theirs = pipe(prompts, latents=x1, num_inference_steps=3, guidance_scale=4.5, height=32, width=32,
                  max_sequence_length=world.defaults["max_sequence_length"], output_type="pt").images
    torch.testing.assert_close(ours["images"], theirs.float(), atol=1e-4, rtol=1e-4)

    sdeed = sde.sample(world, prompts, steps=3, guidance_scale=4.5, noise_level=0.7, seeds=seeds)
    assert sdeed["log_probs"].shape == (2, 3) and torch.isfinite(sdeed["log_probs"]).all()
    assert not torch.allclose(sdeed["images"], ours["images"])


def test_lora_from_sde_loads_in_diffusers(pipeline_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    world = worlds.load_world(pipeline_dir, device="cpu")
    params = worlds.add_lora(world.transformer, "expert", rank=4, alpha=8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    path = str(tmp_path / "expert.safetensors")
    worlds.save_lora(world.transformer, "expert", path)

    x, (embeds, pooled) = torch.randn(2, 16, 16, 16), world.encode_prompts(["a red cat", "a dog"])
    with worlds.adapter(world.transformer, "expert"):
        ours = sde.predict_velocity(world, x, 0.6, embeds, pooled, 1.0)
    with worlds.adapter(world.transformer, None):
        base = sde.predict_velocity(world, x, 0.6, embeds, pooled, 1.0)
    assert not torch.allclose(ours, base, atol=1e-4)

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(path, adapter_name="expert")
    t = torch.full((2,), 600.0)
    theirs = pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # same weights, same alpha / r scale


def test_bad_world_paths_give_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a Stable Diffusion 3 pipeline folder"):
        worlds.load_world(str(tmp_path), device="cpu")
    with pytest.raises(SystemExit, match="neither 'tiny'"):
        worlds.load_world(str(tmp_path / "missing" / "folder"), device="cpu")


def test_encode_once_frees_the_text_encoders_and_serves_the_same_embeddings(pipeline_dir, tmp_path):
    prompts = ["a red cat", 'a sign that says "hi"', "a dog"]
    world = worlds.load_world(pipeline_dir, device="cpu")
    direct = world.encode_prompts(prompts)
    path = worlds.encode_once(world, prompts + prompts[:1], tmp_path / "cache")
    pipe = world.pipeline
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    # The file was encoded as one batch of 4, `direct` as a batch of 3: float32 (eps 1.2e-7) on values of
    # order 1, and a BLAS may choose other kernels for another batch size, moving the last bits (4 ulp,
    # 4.8e-7, seen on an AVX2-only CPU). Exact equality would test the CPU, not the cache.
    for ours, theirs in zip(world.encode_prompts(prompts[::-1]), direct):  # any order, from the file
        torch.testing.assert_close(ours, theirs.flip(0), rtol=1e-6, atol=1e-6)
    assert world.encode_prompts([""])[0].shape[0] == 1  # the empty prompt (CFG) is always there
    with pytest.raises(SystemExit, match="was not among the 4 prompts"):
        world.encode_prompts(["a prompt the run never named"])
    # a second run with the same encoders and prompts reuses the file without encoding anything
    mtime = os.stat(os.path.join(path, "index.json")).st_mtime_ns
    again = worlds.load_world(pipeline_dir, device="cpu")
    again.pipeline.encode_prompt = None  # calling the encoders now would fail
    assert worlds.encode_once(again, prompts, tmp_path / "cache") == path
    assert os.stat(os.path.join(path, "index.json")).st_mtime_ns == mtime
    torch.testing.assert_close(again.encode_prompts(prompts)[1], direct[1], rtol=1e-6, atol=1e-6)  # as above


def test_vae_decodes_in_slices_whatever_the_batch(pipeline_dir):
    """The VAE sees at most worlds.VAE_SLICE images a call, so its peak memory does not grow with the sample batch,
    and the images are those of one call on the whole batch."""
    world = worlds.load_world(str(pipeline_dir), "cpu")
    vae, seen = world.pipeline.vae, []
    whole = vae.decode

    def counting(latents, **kw):
        seen.append(len(latents))
        return whole(latents, **kw)

    latents = torch.randn(7, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    vae.decode = counting
    images = world.decode(latents)
    vae.decode = whole
    assert images.shape[0] == 7 and sum(seen) == 7 and max(seen) <= worlds.VAE_SLICE, seen
    with torch.no_grad():
        one = whole(latents.float() / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    assert torch.allclose(images, (one.float() / 2 + 0.5).clamp(0, 1), atol=1e-5)
