"""The paper's teachers are Flow-GRPO's released checkpoints: PEFT adapter folders (PeftModel.save_pretrained,
adapter_config.json + adapter_model.safetensors, keys 'base_model.model.<module>.lora_A.weight'). worlds.load_lora
reads them (the folder or its safetensors file) and runs them exactly as peft's own PeftModel.from_pretrained does;
a folder that does not fit the transformer stops with one error line; a trainable adapter on a bf16 base holds the
file's exact float32 values; diffusers-format files written by worlds.save_lora load as before.

Everything runs on a tiny random SD3Transformer2DModel (tests/sd3_tiny.py's sizes, two blocks: the last one is
context_pre_only, so it has no attn.to_add_out, as in SD3)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import worlds
from sd3_tiny import TINY_CLIP_PROJ, TINY_JOINT_DIM, TINY_LATENT_CHANNELS, TINY_SD3_IMAGE_SIZE


def tiny_transformer(seed=0, head_dim=8, dtype=torch.float32):
    """tests/sd3_tiny.py's transformer (random, seeded), frozen like a world's base."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    t = SD3Transformer2DModel(
        sample_size=TINY_SD3_IMAGE_SIZE // 2, patch_size=2, in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=4, joint_attention_dim=TINY_JOINT_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_CLIP_PROJ, pos_embed_max_size=32,
    )
    return t.requires_grad_(False).to(dtype)


def flow_grpo_config():
    """Flow-GRPO's scripts/train_sd3.py LoraConfig."""
    from peft import LoraConfig

    return LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian",
                      target_modules=["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                      "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"])


def peft_folder(folder, seed=1, **transformer_kwargs):
    """A teacher folder as Flow-GRPO writes it: get_peft_model(transformer, config) ... save_pretrained. lora_B
    is random (not peft's zero init), so the adapter changes the model."""
    from peft import get_peft_model

    model = get_peft_model(tiny_transformer(**transformer_kwargs), flow_grpo_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(folder))
    return str(folder)


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    side = TINY_SD3_IMAGE_SIZE // 2
    return dict(hidden_states=torch.randn(2, TINY_LATENT_CHANNELS, side, side, generator=gen).to(dtype),
                encoder_hidden_states=torch.randn(2, 6, TINY_JOINT_DIM, generator=gen).to(dtype),
                pooled_projections=torch.randn(2, 2 * TINY_CLIP_PROJ, generator=gen).to(dtype),
                timestep=torch.tensor([300.0, 800.0]))


def velocity(model, x):
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def file_weights(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_flow_grpo_folder_runs_as_peft_runs_it(tmp_path):
    from peft import PeftModel

    folder = peft_folder(tmp_path / "teacher")
    assert sorted(os.listdir(folder))[:2] == ["README.md", "adapter_config.json"] and os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    keys = file_weights(folder)
    # the layout of Flow-GRPO's release: 8 projections in block 0, 7 in the context_pre_only last block, A and B each
    assert "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight" in keys and len(keys) == 2 * (8 + 7)
    assert keys["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 32

    x = inputs()
    v_peft = velocity(PeftModel.from_pretrained(tiny_transformer(), folder), x)
    v_base = velocity(tiny_transformer(), x)
    assert (v_peft - v_base).abs().max() > 1e-3  # the adapter matters
    for path in (folder, os.path.join(folder, "adapter_model.safetensors")):
        assert worlds.is_lora(path)
        t = tiny_transformer()
        params = worlds.load_lora(t, path, "geneval")
        assert t.peft_config["geneval"].r == 32 and t.peft_config["geneval"].lora_alpha == 64
        assert all(torch.equal(p, keys["base_model.model." + k.replace(".geneval.", ".")]) for k, p in params.items())
        assert not any(p.requires_grad for p in params.values())
        with worlds.adapter(t, "geneval"):
            torch.testing.assert_close(velocity(t, x), v_peft, rtol=0, atol=1e-6)
        with worlds.adapter(t, None):  # another instance of the same weights: see below
            torch.testing.assert_close(velocity(t, x), v_base, rtol=1e-6, atol=1e-6)


def _one_line_error(transformer, path, *must_name):
    with pytest.raises(SystemExit) as e:
        worlds.load_lora(transformer, path, "teacher")
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    for s in (path, *must_name):
        assert s in msg, (s, msg)
    return msg


@pytest.mark.parametrize("other", [False, True], ids=["first-adapter", "after-another"])
@pytest.mark.parametrize("case", ["width", "rank", "missing-key", "targets", "bin-only"])
def test_folder_that_does_not_fit_stops_with_one_line(tmp_path, case, other):
    t = tiny_transformer()
    if other:
        worlds.add_lora(t, "other", rank=4, alpha=8)
    if case == "width":  # a teacher of another model: every in/out feature differs
        folder = peft_folder(tmp_path / "wide", head_dim=16)
        _one_line_error(t, folder, "wrong shape", "expected (32, 32)")
    elif case == "rank":  # config and weights disagree on the rank
        folder = peft_folder(tmp_path / "r", seed=2)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(dict(config, r=16), f)
        _one_line_error(t, os.path.join(folder, "adapter_model.safetensors"), "wrong shape", "r=16")
    elif case == "missing-key":  # peft would leave this lora_B at zero: the layer's update silently off
        folder = peft_folder(tmp_path / "m")
        weights = file_weights(folder)
        del weights["base_model.model.transformer_blocks.1.attn.to_v.lora_B.weight"]
        save_file(weights, os.path.join(folder, "adapter_model.safetensors"))
        _one_line_error(t, folder, "lacks 1", "transformer_blocks.1.attn.to_v.lora_B.weight")
    elif case == "targets":  # targets no module of this transformer
        folder = peft_folder(tmp_path / "t")
        with open(os.path.join(folder, "adapter_config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(dict(config, target_modules=["attn.to_qkv"]), f)
        _one_line_error(t, folder, "attn.to_qkv")
    else:
        folder = tmp_path / "bin"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.bin").write_bytes(b"")
        _one_line_error(t, str(folder), "adapter_model.bin")
    # nothing was left behind: the other adapter is active and trainable as before, the name loads a good folder
    if other:
        assert t.active_adapters() == ["other"] and all(p.requires_grad for p in worlds.lora_parameters(t, "other").values())
    good = peft_folder(tmp_path / "good")
    worlds.load_lora(t, good, "teacher")
    assert list(t.peft_config) == ["other", "teacher"][not other:]
    assert t.active_adapters() == ["other" if other else "teacher"]


def test_trainable_adapter_on_bf16_base_holds_the_files_float32_values(tmp_path):
    folder = peft_folder(tmp_path / "student")
    keys = file_weights(folder)
    assert all(v.dtype == torch.float32 for v in keys.values())
    # the same weights as a diffusers-format file (what stage scripts write): the same exactness
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    diffusers_file = str(tmp_path / "student.safetensors")
    worlds.write_lora(diffusers_file, {k.removeprefix("base_model.model."): v for k, v in keys.items()}, config)
    for i, path in enumerate((diffusers_file, folder)):
        t = tiny_transformer(dtype=torch.bfloat16)
        params = worlds.load_lora(t, path, "student", trainable=True)
        for k, p in params.items():  # exact: not rounded through the base's bf16
            want = keys["base_model.model." + k.replace(".student.", ".")]
            assert p.dtype == torch.float32 and p.requires_grad and torch.equal(p.detach(), want), (path, k)
            assert not torch.equal(want.bfloat16().float(), want)  # (so a bf16 round trip would have shown)
    teacher = worlds.load_lora(t, folder, "teacher")  # a frozen teacher stays in the base's dtype
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.values())

    # peft runs the float32 adapter on the bf16 layers (input cast to lora_A's dtype, sum cast back), and it
    # trains: its output is close to the float32 model's, and the loss reaches its weights
    x = inputs(torch.bfloat16)
    with worlds.adapter(t, "student"):
        v = t(**x, return_dict=False)[0]
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    v.float().square().mean().backward()
    silent = "transformer_blocks.1.attn.add_q_proj"  # the last block's context queries: their output is discarded
    assert all(p.grad is not None and (p.grad.abs().sum() > 0) != (silent in k) for k, p in params.items())
    t32 = tiny_transformer()
    worlds.load_lora(t32, folder, "student")
    with worlds.adapter(t32, "student"):
        v32 = velocity(t32, inputs())
    assert (v.detach().float() - v32).abs().max() < 0.05 * v32.abs().max()

    fresh = worlds.add_lora(t, "fresh", rank=4, alpha=8)  # a fresh trainable adapter on a bf16 base is float32 too
    assert all(p.dtype == torch.float32 for p in fresh)


def test_diffusers_files_load_as_before(tmp_path):
    """worlds.save_lora's file: read_lora strips 'transformer.', load_lora gives the saved adapter's model,
    also when a PEFT adapter_config.json lies in the same folder (the file's own metadata wins)."""
    from peft import get_peft_model

    t = tiny_transformer()
    params = worlds.add_lora(t, "a", rank=4, alpha=8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    path = str(tmp_path / "a.safetensors")
    worlds.save_lora(t, "a", path)
    get_peft_model(tiny_transformer(), flow_grpo_config()).save_pretrained(str(tmp_path))  # a PEFT config beside it
    weights, config = worlds.read_lora(path)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(weights) == sorted(k.replace(".a.", ".") for k in worlds.lora_parameters(t, "a"))
    x = inputs()
    with worlds.adapter(t, "a"):
        v_a = velocity(t, x)
    t2 = tiny_transformer()
    loaded = worlds.load_lora(t2, path, "b")
    assert t2.peft_config["b"].r == 4
    assert all(torch.equal(loaded[k.replace(".a.", ".b.")], p) for k, p in worlds.lora_parameters(t, "a").items())
    # Equal weights in another model instance: MKL's AVX2 kernels may round differently with the buffers'
    # alignment (6e-8 seen, one ulp), so float32's precision, not bit equality; the weights above are equal.
    with worlds.adapter(t2, "b"):
        torch.testing.assert_close(velocity(t2, x), v_a, rtol=1e-6, atol=1e-6)

    # is_lora tells a LoRA from a full state dict or nothing (what a stage picks a loader by)
    full = str(tmp_path / "sub" / "full.safetensors")
    os.makedirs(os.path.dirname(full))
    save_file({k: v.contiguous() for k, v in tiny_transformer().state_dict().items()}, full)
    assert worlds.is_lora(path) and not worlds.is_lora(full) and not worlds.is_lora(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match=r"^error: .*full.safetensors has no LoRA config"):
        worlds.read_lora(full)
