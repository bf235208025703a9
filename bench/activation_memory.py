"""
bench/activation_memory.py: the activation memory of one training forward of SD3.5-Medium's transformer,
with and without gradient checkpointing, counted without a GPU (issue #16, "a memory model in the README").
A benchmark script, not a timed test.

Every stage trains a microbatch as one CFG forward ([uncond; cond], 2 rows per image) through the frozen
bf16 base and the student's LoRA, then its backward; between the two, autograd holds the tensors it
saved for the backward, and that is the activation memory (the weights, adapters and AdamW states are
counted in bench/speed.py). This script counts those saved tensors with
torch.autograd.graph.saved_tensors_hooks:

  meta      the full model (24 blocks, 512 px: 1,024 latent tokens + 205 text tokens) on the meta device:
            shapes only, no memory and seconds of CPU. A saved tensor is counted once per underlying
            tensor (views of one tensor share it); parameters and their views are not activations.
  measured  a real float32 forward on the CPU of the same architecture cut to --blocks blocks (full
            width, 512 px): the same count deduplicated by storage, and the growth of the process's
            resident memory while the graph is alive. This checks the meta count where it can be run.

It prints bytes per image (CFG's two rows) for the model in bf16, with and without
transformer.enable_gradient_checkpointing() (--gradient-checkpointing of the stages), per block and
in all, and the per-GPU activation memory at --train-batch images a microbatch.

Command (CPU, about 2 minutes and ~6 GB of memory for the 2-block check):
  python bench/activation_memory.py
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: bench/ sits above nothing
import runs  # noqa: E402
import worlds  # noqa: E402
from bench.gpu_check import SD35_MEDIUM  # noqa: E402  (SD3.5-Medium's transformer config)

# The same architecture (dual attention on the first half of the blocks, RMS q/k norm, 16 latent channels, patch 2)
# at tiny width, for CPU tests of this count
SD35_MEDIUM_TINY = dict(SD35_MEDIUM, sample_size=16, num_layers=4, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32,
                        dual_attention_layers=(0, 1))
SD3_TEXT_TOKENS = 77 + worlds.SD3_DEFAULTS["max_sequence_length"]  # CLIP's 77 + T5's 128 (Flow-GRPO's max_sequence_length)


def rss_bytes():
    """The process's resident memory now (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def build(config, device, dtype, checkpointing):
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        with torch.device(device):
            tr = SD3Transformer2DModel(**config)
        tr.to(device=device, dtype=dtype).requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    worlds.add_lora(tr, "student", 32, 64)  # the stages' default student: r = 32, trainable, float32
    if checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    return tr


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """scaled_dot_product_attention as CUDA runs it in bf16 (flash attention): it saves q, k, v, the output
    and the log-sum-exp, never the N x N probabilities that the math fallback keeps."""
    assert attn_mask is None
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


def saved_activations(tr, images, device, dtype, config, attention="default"):
    """One training forward of `images` images with CFG (2 rows each): the bytes autograd saves for the
    backward, (per tensor, per storage), and the resident memory it added while alive (real devices).
    attention "flash": SDPA replaced by the flash kernel (meta device: CUDA's bf16 path)."""
    params = {id(p) for p in tr.parameters()}
    per_tensor, per_storage = {}, {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            per_tensor[id(base)] = (base, base.untyped_storage().nbytes() if device != "meta" else base.numel() * base.element_size())
            if device != "meta":
                per_storage[base.untyped_storage().data_ptr()] = base.untyped_storage().nbytes()
        return t

    marks = []  # the running count at each block's start: per-block bytes
    handles = [b.register_forward_pre_hook(lambda *_: marks.append(sum(b for _, b in per_tensor.values())))
               for b in tr.transformer_blocks]
    rows, latent = 2 * images, config["sample_size"] // 2
    x = torch.randn(rows, config["in_channels"], latent, latent, device=device, dtype=dtype)
    text = torch.randn(rows, SD3_TEXT_TOKENS, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(rows, config["pooled_projection_dim"], device=device, dtype=dtype)
    t = torch.full((rows,), 500.0, device=device, dtype=dtype)
    before = rss_bytes()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if attention == "flash":
        torch.nn.functional.scaled_dot_product_attention = flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = tr(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    after = rss_bytes()
    grown = after - before if device != "meta" and before is not None and after is not None else None  # None: no /proc
    assert out.requires_grad
    total = sum(b for _, b in per_tensor.values())
    blocks = [b - a for a, b in zip(marks, marks[1:])]  # all but the last block (its end is not marked)
    return total, (sum(per_storage.values()) if per_storage else None), grown, max(blocks, default=0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-batch", type=int, default=9, help="images per training microbatch per GPU (Flow-GRPO's 9)")
    p.add_argument("--blocks", type=int, default=2, help="blocks of the measured CPU check (0 = skip it)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(runs.HERE, "results", "bench", "activation_memory.json"))
    cfg = p.parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gib = 2 ** 30
    result = dict(config=vars(cfg), text_tokens=SD3_TEXT_TOKENS, latent_tokens=(SD35_MEDIUM["sample_size"] // 2 // 2) ** 2)
    print(f"SD3.5-Medium transformer, 512 px ({result['latent_tokens']} latent + {SD3_TEXT_TOKENS} text tokens), "
          f"student LoRA r=32, one training forward with CFG (2 rows per image)")
    for attention in ("flash", "math"):
        for ckpt in (False, True):
            tr = build(SD35_MEDIUM, "meta", torch.bfloat16, ckpt)
            one, _, _, block = saved_activations(tr, 1, "meta", torch.bfloat16, SD35_MEDIUM, attention)
            if not ckpt:
                biggest = block  # the largest block's saved bytes: what checkpointing recomputes at once in the backward
            result[f"{attention}_{'checkpointing' if ckpt else 'plain'}"] = dict(
                bytes_per_image=one, bytes_per_block_per_image=one / SD35_MEDIUM["num_layers"], bytes_at_train_batch=one * cfg.train_batch,
                backward_peak_bytes_per_image=one + biggest if ckpt else one)
            print(f"  {attention + ' attention,':<17} {'with' if ckpt else 'without':<7} checkpointing: {one / gib:6.3f} GiB per image "
                  f"({one / SD35_MEDIUM['num_layers'] / 2**20:6.1f} MiB per block), {one * cfg.train_batch / gib:6.2f} GiB "
                  f"at {cfg.train_batch} images a microbatch (bf16, meta-device count)"
                  + (f"; + the largest block recomputed in the backward: {(one + biggest) * cfg.train_batch / gib:.2f} GiB" if ckpt else ""))
    if cfg.blocks:
        small = dict(SD35_MEDIUM, num_layers=cfg.blocks, dual_attention_layers=tuple(range(min(cfg.blocks, 13))))
        print(f"check: the same count against a real float32 CPU forward of {cfg.blocks} of its blocks, 1 image (2 rows)")
        for ckpt in (False, True):
            meta = {a: saved_activations(build(small, "meta", torch.float32, ckpt), 1, "meta", torch.float32, small, a)[0]
                    for a in ("flash", "math")}
            tr = build(small, "cpu", torch.float32, ckpt)
            _, storage, grown, _ = saved_activations(tr, 1, "cpu", torch.float32, small)
            del tr
            key = "check_checkpointing" if ckpt else "check_plain"
            result[key] = dict(blocks=cfg.blocks, meta_flash_bytes=meta["flash"], meta_math_bytes=meta["math"],
                               storage_bytes=storage, rss_growth_bytes=grown)
            print(f"  {'with' if ckpt else 'without':<7} checkpointing: meta count {meta['flash'] / 2**20:7.1f} MiB (flash) / "
                  f"{meta['math'] / 2**20:7.1f} MiB (math) | real CPU forward: saved storages {storage / 2**20:7.1f} MiB, "
                  "resident memory grew " + (f"{grown / 2**20:7.1f} MiB" if grown is not None else "(unknown: no /proc)"))
    runs.write_json(cfg.out, result)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
