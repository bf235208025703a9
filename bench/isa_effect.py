"""Which instruction-set caps change this machine's float results, so that the suite can be run as an
AVX2-only CPU would run it. Run it once per setting and compare the digests:

    python bench/isa_effect.py
    MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/isa_effect.py
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/isa_effect.py
    ATEN_CPU_CAPABILITY=avx2 python bench/isa_effect.py

Prints, for each computation, a digest of its float32 bytes (equal digests: the setting changed nothing)
and the largest difference between the same prompts encoded alone and inside another batch (the
batch-composition effect that exact-equality tests must not depend on)."""

import hashlib
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]

import sde  # noqa: E402
import worlds  # noqa: E402
from sd3_tiny import build_tiny_sd3  # noqa: E402


def digest(t):
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]


torch.manual_seed(0)
env = {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
print("settings:", env or "none", "| torch CPU capability:", torch.backends.cpu.get_cpu_capability())
a, b = torch.randn(64, 96), torch.randn(96, 80)
print(f"  matmul 64x96x80            {digest(a @ b)}")
x = torch.randn(3, 8, 16)
print(f"  softmax + layer_norm       {digest(torch.nn.functional.layer_norm(x.softmax(-1), (16,)))}")
with tempfile.TemporaryDirectory() as tmp:
    build_tiny_sd3(tmp)
    world = worlds.load_world(tmp, device="cpu")
    prompts = ["a red cat", 'a sign that says "hi"', "a dog"]
    alone = world.encode_prompts(prompts)
    other = world.encode_prompts(prompts[::-1] + prompts[:1])
    print(f"  SD3 text encoders          {digest(alone[0])} {digest(alone[1])}")
    gap = max((alone[0] - other[0][:3].flip(0)).abs().max().item(), (alone[1] - other[1][:3].flip(0)).abs().max().item())
    print(f"  alone vs in another batch  max |diff| {gap:.3g}")
    lat = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    v = sde.predict_velocity(world, lat, 0.6, alone[0][:2], alone[1][:2], 1.0)
    print(f"  SD3 transformer velocity   {digest(v)}")
