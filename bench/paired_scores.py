"""
bench/paired_scores.py: the paired difference between two models of one evaluate.py run, with standard
errors over prompts. evaluate.py scores every model on the same prompts from the same seeds and keeps
each image's score in <out>/eval_cache/<model>-<task>-<key>.json; this reads those files, so it costs
no sampling. Per task it prints each model's mean with its SE over prompts (a prompt's score is the
mean of its images) and the mean paired difference B - A with its SE: the noise the difference has
once the prompts' difficulty, which both models share, is taken out.

Command (after evaluate.py --models base,x=adapter.safetensors ... --out DIR [--cache CACHE]):
  python bench/paired_scores.py DIR base x geneval,deqa          (or CACHE in place of DIR)
"""

import argparse
import glob
import json
import math
import os
import sys

import numpy as np


def prompt_means(cache_dir, model, task):
    """{prompt id: (prompt, mean score of its images)} of one model and task in an evaluate.py score cache."""
    files = glob.glob(os.path.join(cache_dir, f"{model}-{task}-*.json"))
    if len(files) != 1:
        raise SystemExit(f"error: {cache_dir} holds {len(files)} score files of model {model!r} and task {task!r}, expected 1 "
                         "(evaluate.py --models ... --tasks ... with this --out)")
    with open(files[0]) as f:
        prompts = json.load(f)["prompts"]
    return {k: (v["prompt"], float(np.mean(v[task]))) for k, v in prompts.items()}


def paired(cache_dir, a, b, task):
    """(mean A, SE A, mean B, SE B, mean B - A, its SE, prompts) over the prompts both models scored."""
    sa, sb = prompt_means(cache_dir, a, task), prompt_means(cache_dir, b, task)
    keys = sorted(set(sa) & set(sb), key=int)
    if len(keys) < 2 or any(sa[k][0] != sb[k][0] for k in keys):
        raise SystemExit(f"error: models {a!r} and {b!r} do not share two or more prompts of task {task!r} in {cache_dir}")
    x, y = np.array([sa[k][1] for k in keys]), np.array([sb[k][1] for k in keys])
    se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v)))  # noqa: E731
    return x.mean(), se(x), y.mean(), se(y), (y - x).mean(), se(y - x), len(keys)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="evaluate.py's --out folder, or its --cache folder")
    p.add_argument("a", help="the reference model's name (e.g. base)")
    p.add_argument("b", help="the model compared with it")
    p.add_argument("tasks", help="comma-separated tasks")
    args = p.parse_args(argv)
    cache_dir = os.path.join(args.out, "eval_cache") if os.path.isdir(os.path.join(args.out, "eval_cache")) else args.out
    for task in args.tasks.split(","):
        ma, ea, mb, eb, d, ed, n = paired(cache_dir, args.a, args.b, task)
        print(f"{task}: {args.a} {ma:.3f} +- {ea:.3f} | {args.b} {mb:.3f} +- {eb:.3f} | "
              f"{args.b} - {args.a} {d:+.3f} +- {ed:.3f} (paired, {n} prompts)")


if __name__ == "__main__":
    sys.exit(main())
