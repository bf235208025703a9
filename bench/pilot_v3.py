"""
Tiny world v3 pilot (issue #29): how much of a task's headroom is a rendering mode, and how much of it an
expert removes. For a base and any adapters on it, samples a task's prompts (ODE, the world's evaluation
steps and CFG, K images a prompt, image k of every model from the same initial noise) and prints, per model:
  score          the task's reward (GenEval strict), mean +- SE over prompts
  mode share     the share of images in the task's mode (tiny_world.in_mode: faint glyphs, washed objects)
  score | crisp  the reward of the images not in the mode (what the base draws when it draws well)
  deqa           image quality
and each adapter's paired difference from the first model (mean over prompts of the per-prompt mean
difference, +- its SE), as a share of the first model's headroom (1 - score).

  python bench/pilot_v3.py --base assets/tiny_base.safetensors --task ocr --adapters ocr=runs/grpo-ocr/adapter.safetensors
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_world  # noqa: E402
import worlds  # noqa: E402


def images_of(transformer, encode, codec, prompts, k_images, batch=64):
    out = []
    for k in range(k_images):
        imgs = [tiny_world.sample(transformer, encode, prompts[i:i + batch], seed=1000 * k + i, codec=codec)
                for i in range(0, len(prompts), batch)]
        out.append(torch.cat(imgs))
    return torch.stack(out, 1)  # (P, K, 3, H, W)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=tiny_world.CHECKPOINT)
    ap.add_argument("--task", required=True, choices=tiny_world.TASKS)
    ap.add_argument("--adapters", default="", help="name=path,...")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--images", type=int, default=4, help="images a prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-dir", default=None, help="read the prompt files from here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prompt_dir:
        tiny_world.PROMPT_DIR = args.prompt_dir
    prompts = tiny_world.read_prompts(args.task, args.split)[:args.n]
    transformer, encode, codec = tiny_world.load_base(args.base)
    models = [("base", None)] + [tuple(x.split("=", 1)) for x in args.adapters.split(",") if x]
    for name, path in models[1:]:
        worlds.load_lora(transformer, path, name)
    rows = {}
    cats = [tiny_world.geneval_category(tiny_world.parse(p)) if args.task == "geneval" else
            (f"{len(tiny_world.parse(p)['text'])} glyphs" if args.task == "ocr" else "all") for p in prompts]
    for name, _ in models:
        with worlds.adapter(transformer, None if name == "base" else name):
            x = images_of(transformer, encode, codec, prompts, args.images)
        flat = x.flatten(0, 1)
        rep = [p for p in prompts for _ in range(args.images)]
        s = tiny_world.score(args.task, flat, rep).reshape(len(prompts), args.images)
        mode = tiny_world.in_mode(args.task, flat, rep).reshape(len(prompts), args.images)
        q = tiny_world.score("deqa", flat, rep).reshape(len(prompts), args.images)
        rows[name] = (s, mode, q)
        crisp = s[~mode].mean() if (~mode).any() else float("nan")
        per = s.mean(1)
        line = (f"{name:14s} score {per.mean():.3f} +- {per.std(ddof=1) / np.sqrt(len(per)):.3f} | mode share "
                f"{mode.mean():.3f} | score|crisp {crisp:.3f} | deqa {q.mean():.3f}")
        by = {c: round(float(s[np.array(cats) == c].mean()), 3) for c in sorted(set(cats))}
        print(line + " | " + ", ".join(f"{c} {v}" for c, v in by.items()), flush=True)
    s0, m0, q0 = rows["base"]
    for name, (s, m, q) in rows.items():
        if name == "base":
            continue
        d = (s - s0).mean(1)
        se = d.std(ddof=1) / np.sqrt(len(d))
        head = 1 - s0.mean()
        dq = (q - q0).mean(1)
        print(f"{name} - base: {d.mean():+.3f} +- {se:.3f} ({d.mean() / se if se else 0:.1f} SE), "
              f"{d.mean() / head:.0%} of the headroom {head:.3f}; mode share {m0.mean():.3f} -> {m.mean():.3f}; "
              f"deqa {dq.mean():+.3f} +- {dq.std(ddof=1) / np.sqrt(len(dq)):.3f}")


if __name__ == "__main__":
    main()
