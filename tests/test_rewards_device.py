"""
The CLIP scorers on a GPU (issue #26): built on the device they are given, in float16, fed float16
pixels, and scoring what the CPU's float32 scores up to half precision. Skipped without CUDA; the
CPU side of the same code is in tests/test_rewards.py.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import rewards  # noqa: E402
from rewards import get_reward  # noqa: E402
from test_rewards import _tiny_mlp, tiny_clip_dir  # noqa: E402,F401  (a fixture: pytest finds it by name)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_clip_scorers_on_cuda_in_half_precision(tiny_clip_dir, tmp_path):
    clip, (_, mlp) = str(tiny_clip_dir), _tiny_mlp(tmp_path)
    torch.manual_seed(1)
    images, prompts = torch.rand(3, 3, 40, 48), ["a red cube", "a photo of a dog", 'a sign that says "hi"']
    on_cpu = [get_reward("pickscore", model=clip, processor=clip)(images, prompts),
              get_reward("aesthetic", clip=clip, mlp=mlp)(images, prompts)]
    pick = get_reward("pickscore", "sd3", "cuda", model=clip, processor=clip)
    aes = get_reward("aesthetic", "sd3", "cuda", clip=clip, mlp=mlp)
    on_gpu = [pick(images.cuda(), prompts), aes(images, prompts)]  # images on either device
    index = torch.cuda.current_device()
    for model in (pick.scorer.model, aes.scorer.model):
        assert {(p.device, p.dtype) for p in model.parameters()} == {(torch.device("cuda", index), torch.float16)}
    assert {p.dtype for p in aes.scorer.mlp.parameters()} == {torch.float32}
    for g, c in zip(on_gpu, on_cpu):
        assert g.dtype == torch.float32 and g.device.type == "cpu" and g.shape == (3,)
        assert torch.allclose(g, c, atol=5e-3), (g, c)


def test_batch_scorer_keeps_the_rank_device(tiny_clip_dir):
    """"cuda" is pinned to the current device when the reward is built: BatchScorer's thread would
    otherwise put it on cuda:0 (a thread's current device is its own)."""
    clip = str(tiny_clip_dir)
    pick = get_reward("pickscore", "sd3", "cuda", model=clip, processor=clip)
    assert pick.scorer.device == torch.device("cuda", torch.cuda.current_device())
    images, prompts = torch.rand(4, 3, 32, 32), ["a cat", "a dog", "a cup", "a sun"]
    scorer = rewards.BatchScorer(pick)
    for b in (slice(0, 1), slice(1, 4)):
        scorer.submit(images[b].cuda(), prompts[b])
    assert torch.allclose(scorer.result(), pick(images, prompts), atol=1e-3)
