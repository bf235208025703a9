"""
Does a model draw the objects its prompt names? (issue #38, item 1: an honest quality reward must not pay for
leaving content out). For the base and each adapter on it, samples prompts of the deqa and pickscore tasks (ODE,
the world's evaluation steps and CFG, K images a prompt, image k of every model from the same initial noise, as
bench/pilot_v3.py draws them) and prints, per model and task:
  objects     the share of each prompt's named objects that the GenEval program finds (tiny_world.objects_drawn),
              mean +- SE over prompts, and its paired difference from the base
  fewer       the share of images with fewer than all named objects found
  colours     the same count by colour alone (any object-sized component of the named colour, ragged or not)
  deqa        the deqa reward, and each model's paired difference from the base
  grain       the share of images in deqa's mode by how they are drawn (tiny_world.drawn_mode: noise std > 0.02)
              and by the reward's own test (tiny_world.in_mode)

The test prompts are not read: the default is the train split (the world has no validation split yet).

  python bench/objects_drawn.py --n 64 --images 2     # the base and the shipped experts (assets/tiny_experts/)
"""

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import tiny_world as tw  # noqa: E402
import worlds  # noqa: E402
from pilot_v3 import images_of  # noqa: E402

EXPERTS = os.path.join(os.path.dirname(HERE), "assets", "tiny_experts")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=tw.CHECKPOINT)
    ap.add_argument("--adapters", default=",".join(f"{t}={EXPERTS}/{t}.safetensors" for t in tw.TASKS),
                    help="name=path,... (default: the shipped experts)")
    ap.add_argument("--tasks", default="deqa,pickscore")
    ap.add_argument("--split", default="train", choices=("train",), help="never the test prompts")
    ap.add_argument("--n", type=int, default=64, help="prompts a task")
    ap.add_argument("--images", type=int, default=2, help="images a prompt")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformer, encode, codec = tw.load_base(args.base)
    models = [("base", None)] + [tuple(x.split("=", 1)) for x in args.adapters.split(",") if x]
    for name, path in models[1:]:
        worlds.load_lora(transformer, path, name)
    se = lambda a: a.std(ddof=1) / np.sqrt(len(a))  # noqa: E731
    print(f"{args.n} {args.split} prompts a task x {args.images} images; ODE {tw.DEFAULT_STEPS_EVAL} steps, "
          f"CFG {tw.DEFAULT_GUIDANCE}; paired on prompts (image k of every model from one noise)\n")
    print("| task | model | objects drawn | minus the base | fewer than all | named colours drawn | minus the base "
          "| deqa | minus the base | grain (drawn) | grain (in_mode) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        prompts = tw.read_prompts(task, args.split)[:args.n]
        rep = [p for p in prompts for _ in range(args.images)]
        ref = None
        for name, _ in models:
            with worlds.adapter(transformer, None if name == "base" else name):
                x = images_of(transformer, encode, codec, prompts, args.images).flatten(0, 1)  # (P*K, 3, H, W)
            obj = tw.objects_drawn(x, rep).reshape(len(prompts), args.images)
            col = tw.objects_drawn(x, rep, shape=False).reshape(len(prompts), args.images).mean(1)
            q = tw.score("deqa", x, rep).reshape(len(prompts), args.images)
            grain_drawn, grain_test = tw.drawn_mode("deqa", x, rep).mean(), tw.in_mode("deqa", x, rep).mean()
            po, pq = obj.mean(1), q.mean(1)
            if ref is None:
                ref = (po, pq, col)
            do, dq, dc = po - ref[0], pq - ref[1], col - ref[2]
            diff = lambda d: "" if name == "base" else f"{d.mean():+.3f} +- {se(d):.3f}"  # noqa: E731
            print(f"| {task} | {name} | {po.mean():.3f} +- {se(po):.3f} | {diff(do)} | {(obj < 1).mean():.3f} | "
                  f"{col.mean():.3f} +- {se(col):.3f} | {diff(dc)} | {pq.mean():.3f} +- {se(pq):.3f} | {diff(dq)} | "
                  f"{grain_drawn:.3f} | {grain_test:.3f} |", flush=True)


if __name__ == "__main__":
    main()
