"""Shared test fixtures: a toy world (random tiny SD3 transformer, hashed-word text encoder) that
exercises sde.py's sampling path without the tiny world's shipped weights."""

import os
import sys
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest.ini runs the tests side by side, one pytest-xdist worker a core: each worker, and every stage script
# it starts (runs.set_threads reads OMP_NUM_THREADS), then computes on one thread. Oversubscribed cores
# make torch's thread pool crawl. Run alone (-n 0), a test uses two threads.
SIDE_BY_SIDE = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
if SIDE_BY_SIDE:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if SIDE_BY_SIDE else 2)

import worlds  # noqa: E402


def make_toy_world(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)
    transformer.requires_grad_(False)

    def encode(prompts):  # a word's embedding is a fixed function of the word (crc32-seeded)
        embeds = torch.zeros(len(prompts), 4, 16)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[:4]):
                embeds[i, j] = torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
        return embeds, embeds.mean(1)[:, :8]

    decode = lambda latents: (latents[:, :3].float().cpu() / 2 + 0.5).clamp(0, 1)
    defaults = dict(resolution=8, shift=3.0, train_steps=4, eval_steps=6, guidance_scale=3.0, noise_level=0.7)
    return worlds.World("toy", "toy", transformer, worlds._cached(encode), decode, (4, 8, 8), torch.device("cpu"),
                     torch.float32, defaults, ("a",))


@pytest.fixture
def toy_world():
    return make_toy_world()


# The longest files first, so that side by side the last worker does not finish alone with one of them
# (seconds per file with the forked stage scripts, --durations=0: 80-110 s for the first three, 40-75 s for the next five;
# pytest-xdist hands out files in this order).
LONGEST_FIRST = ["test_learning.py", "test_reproduce.py", "test_sd3_pipeline.py", "test_reliability.py", "test_failures.py",
                 "test_sft_init.py", "test_gpu_check.py", "test_evaluate.py", "test_opd.py", "test_grpo_expert.py", "test_scale.py",
                 "test_merge.py"]


def pytest_collection_modifyitems(items):
    rank = lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: within a file, the written order
