"""What goes wrong only at scale, checked on the CPU (issue #26): the prompt cache shared out over ranks in
memory that does not grow with the prompt count, the GPU's dtypes reaching the transformer and the VAE as
diffusers and Flow-GRPO pass them, ranks that refuse to train from different checkpoints, optimizer steps
that give every rank an equal share, float32 master weights under full fine-tuning, and the process
group's timeout as a setting."""

import json
import os
import subprocess
import sys

import pytest
import torch

import runs
import sde
import worlds
from helpers import ENV, ROOT, run_script
from sd3_tiny import build_tiny_sd3


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3(path)
    return str(path)


def torchrun(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tests/dist_check.py", *map(str, args)], cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


def test_encode_once_shares_the_prompts_out_over_ranks_and_equals_one_process(pipeline_dir, tmp_path):
    from safetensors import safe_open

    result = torchrun("encode", pipeline_dir, tmp_path / "cache", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    encoded = []
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), "pt") as f:
            encoded.append(json.loads(f.metadata()["encoded"]))
            served = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(encoded[0] + encoded[1]) == sorted(set(encoded[0] + encoded[1])) and len(encoded[0]) + len(encoded[1]) == 51
    assert 25 <= len(encoded[0]) <= 26 and 25 <= len(encoded[1]) <= 26  # the 50 prompts and "", half each

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_check import PROMPTS

    world = worlds.load_world(pipeline_dir, "cpu")
    embeds, pooled = world.encode_prompts(PROMPTS)  # one process, straight from the encoders
    # Batches of other prompts: float32 (eps 1.2e-7) rounds in other places when a BLAS picks other kernels for
    # another batch size, a few ulp of values up to ~3 (1.2e-6 absolute seen with AVX2 kernels): 1e-6 + 1e-6 |x|.
    torch.testing.assert_close(served["embeds"], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(served["pooled"], pooled, rtol=1e-6, atol=1e-6)


MEMORY = r"""
import resource, sys, types, torch
sys.path.insert(0, ".")
import worlds
n = int(sys.argv[1])
def encode(prompts):  # SD3's embedding size: 205 x 2048 float32 = 1.68 MB a prompt (205 x 4096 bf16 on the GPU)
    return torch.randn(len(prompts), 205, 2048), torch.randn(len(prompts), 2048)
world = worlds.World("sd3", sys.argv[3], torch.nn.Identity(), worlds._cached(encode), None, (16, 8, 8), torch.device("cpu"),
                     torch.float32, dict(max_sequence_length=128), ())
world.pipeline = types.SimpleNamespace(text_encoder=1, text_encoder_2=1, text_encoder_3=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worlds.encode_once(world, [f"prompt {i}" for i in range(n)], sys.argv[2], batch=16)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # MiB
"""


def test_encode_once_memory_does_not_grow_with_the_number_of_prompts(tmp_path):
    grown = {}
    for n in (16, 320):  # 27 MB and 537 MB of embeddings
        out = subprocess.run([sys.executable, "-c", MEMORY, str(n), str(tmp_path / f"cache{n}"), str(tmp_path)], cwd=ROOT,
                             env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        grown[n] = float(out.stdout.split()[-1])
    # streamed: one batch of 16 (27 MB) at a time, whatever n; holding them all would grow by >= 537 MB
    assert grown[320] - grown[16] < 120, grown


def test_timesteps_and_the_vae_see_float32_on_a_bf16_transformer(pipeline_dir):
    world = worlds.load_world(pipeline_dir, "cpu", dtype=torch.bfloat16)
    assert world.pipeline.vae.dtype == torch.float32  # Flow-GRPO decodes in float32
    seen = []
    world.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    out = sde.sample(world, ["a red cat"], steps=3, guidance_scale=4.5, noise_level=0.7, seeds=[1])
    assert [t.dtype for t in seen] == [torch.float32] * 3
    sigmas = sde.sd3_sigmas(3, world.defaults["shift"])
    assert seen[1][0].item() == pytest.approx(sigmas[1].item() * 1000, rel=1e-6)  # 913.04, not bf16's 912
    assert torch.isfinite(out["images"]).all()


def test_a_rank_that_resumes_another_checkpoint_is_refused(tmp_path):
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    ema = {"w": torch.ones(3)}
    optimizer = torch.optim.AdamW(params.values())
    runs.save_train_state(str(tmp_path / "rank0"), 3, params, ema, optimizer, 6)
    result = torchrun("resume", tmp_path)  # rank 1's folder is empty: a node-local --out on another node
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: the ranks disagree")]
    assert result.returncode != 0 and errors and "rank 0 holds [3, 6], rank 1 [0, 0]" in errors[0], result.stderr[-3000:]

    runs.save_train_state(str(tmp_path / "rank1"), 3, params, ema, optimizer, 6)  # the same checkpoint on both: fine
    result = torchrun("resume", tmp_path)
    assert result.returncode == 0 and "rank 1 resumed at epoch 3" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("n_samples,world_size,steps", [(32 * 36, 32, 2), (64, 8, 2), (48 * 24, 32, 4), (100, 4, 3)])
def test_every_rank_gets_an_equal_share_of_every_optimizer_step(n_samples, world_size, steps):
    kept = torch.arange(n_samples)
    kept = kept[torch.rand(n_samples, generator=torch.Generator().manual_seed(0)) > 0.2]  # groups dropped for no spread
    chunks = runs.optimizer_chunks(kept, steps, seed=7)
    assert torch.equal(torch.sort(torch.cat(chunks)).values, kept)  # every kept sample once
    n_local = n_samples // world_size
    for rank in range(world_size):
        mine = [((c >= rank * n_local) & (c < (rank + 1) * n_local)).sum().item() for c in chunks]
        assert max(mine) - min(mine) <= 1, (rank, mine)
    assert [c.tolist() for c in chunks] == [c.tolist() for c in runs.optimizer_chunks(kept, steps, seed=7)]  # any rank, any resume


def test_full_finetune_keeps_float32_master_weights_on_a_bf16_base(pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts" / "sd3"
    prompts.mkdir(parents=True)
    (prompts / "ocr_train.txt").write_text('a sign that says "cat"\n')
    out = tmp_path / "run"
    run_script("grpo_expert.py", "--world", pipeline_dir, "--task", "ocr", "--full-finetune", "--epochs", "1",
               "--prompts-per-epoch", "1", "--group-size", "2", "--steps", "2", "--sample-batch", "2", "--train-batch", "2",
               "--updates-per-epoch", "1", "--grid-every", "0", "--threads", "1", "--out", out,
               env=dict(FLOWOPD_DTYPE="bfloat16", FLOWOPD_PROMPTS=str(tmp_path / "prompts"),
                        FLOWOPD_PROMPT_CACHE=str(tmp_path / "cache")), timeout=300)
    state = runs.load_checkpoint(str(out))
    assert {v.dtype for v in state["params"].values()} == {torch.float32}  # AdamW's states take the weights' dtype


def test_the_process_group_timeout_is_a_setting(monkeypatch):
    monkeypatch.delenv("FLOWOPD_DIST_TIMEOUT", raising=False)
    assert runs.dist_timeout_minutes() == 120  # above NCCL's 10 minutes and the slowest CPU-bound phase
    monkeypatch.setenv("FLOWOPD_DIST_TIMEOUT", "45")
    assert runs.dist_timeout_minutes() == 45
    monkeypatch.setenv("FLOWOPD_DIST_TIMEOUT", "soon")
    with pytest.raises(SystemExit, match="FLOWOPD_DIST_TIMEOUT='soon'"):
        runs.dist_timeout_minutes()

    seen = {}
    monkeypatch.setenv("FLOWOPD_DIST_TIMEOUT", "45")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda url: iter([(torch.distributed.HashStore(), 0, 2)]))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw))
    runs.setup_distributed()
    assert seen["timeout"].total_seconds() == 45 * 60
