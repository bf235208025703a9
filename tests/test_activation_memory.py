"""bench/activation_memory.py, the README's activation memory model: its meta-device count (shapes only) is
the bytes a real forward makes autograd hold, to the flash kernel's seeds, and gradient checkpointing keeps less."""

import torch

from bench.activation_memory import SD35_MEDIUM_TINY, build, saved_activations


def test_meta_count_equals_the_storages_a_real_forward_keeps_and_checkpointing_keeps_less():
    counts = {}
    for ckpt in (False, True):
        meta, _, _, _ = saved_activations(build(SD35_MEDIUM_TINY, "meta", torch.float32, ckpt), 2, "meta", torch.float32, SD35_MEDIUM_TINY)
        flash, _, _, _ = saved_activations(build(SD35_MEDIUM_TINY, "meta", torch.float32, ckpt), 2, "meta", torch.float32, SD35_MEDIUM_TINY, "flash")
        _, storage, _, _ = saved_activations(build(SD35_MEDIUM_TINY, "cpu", torch.float32, ckpt), 2, "cpu", torch.float32, SD35_MEDIUM_TINY)
        # the CPU runs SDPA's flash kernel here; the meta count of CUDA's flash kernel also holds its random
        # number seed and offset (24 bytes an attention call), which the CPU's does not keep
        assert 0 <= flash - storage <= 24 * 8 and flash <= meta
        counts[ckpt] = storage
    assert 0 < counts[True] < counts[False] / 3
