"""
bench/gain_per_call.py: how much of a teacher's gain OPD runs keep, against the transformer calls they
spent (issue #16, "fewer model calls for the same result"). A benchmark script, not a timed test.

Given OPD run folders (opd.py --out), it reads each run's calls per image from its log.jsonl (the
forwards_* fields opd.py counts: sampling, frozen = teachers + MAR anchor, training; a training
backward counts as the forward it differentiates, so calls = sampling + frozen + 2 x training) and
scores its adapter on one task's test prompts with paired ODE images (evaluate.py's sampler: 20 Euler
steps, the world's CFG; image k of prompt i from the same seed for every model), beside the base and
the teacher. It prints per run: the task's score with its standard error over prompts, the paired
difference to the base with its SE, the share of the teacher's gain (run - base) / (teacher - base)
with a delta-method SE, the calls per image and in all relative to the first run, and the paired
difference to the first run with its SE.

Command (tiny world, CPU): the study in docs/NOTES.md, "Distilling a random subset of the steps", e.g.
  python bench/gain_per_call.py --task deqa --teacher assets/tiny_experts/deqa.safetensors \\
      --runs all=/tmp/study/k0,k2=/tmp/study/k2 --prompts 64 --images 4
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: bench/ sits above nothing
import rewards  # noqa: E402
import runs  # noqa: E402
import sde  # noqa: E402
import worlds  # noqa: E402


def calls_per_image(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist (pass opd.py --out folders)")
    records = [json.loads(line) for line in open(path)]
    if "forwards_frozen" not in records[-1]:
        raise SystemExit(f"error: {path} has no forwards_* fields (a run from before opd.py counted its calls)")
    per_epoch = [r["forwards_sampling"] + r["forwards_frozen"] + 2 * r["forwards_training"] for r in records]
    return float(np.mean(per_epoch)), len(records)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="tiny")
    p.add_argument("--task", default="deqa")
    p.add_argument("--teacher", required=True, help="the teacher's LoRA file")
    p.add_argument("--runs", required=True, help="label=opd.py output folder, comma-separated")
    p.add_argument("--prompts", type=int, default=64, help="test prompts (evenly spread over the file)")
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="", help="a JSON of the table (optional)")
    cfg = p.parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    entries = [e.partition("=") for e in cfg.runs.split(",")]
    if not entries or any(not label or not path for label, _, path in entries):
        raise SystemExit(f"error: --runs {cfg.runs!r} must be label=folder pairs, comma-separated")
    calls_by = {label: calls_per_image(path) for label, _, path in entries}  # checked before any model is loaded
    world = worlds.load_world(cfg.world)
    prompts, metadata = worlds.read_prompts(worlds.prompt_file(world, cfg.task, "test"))
    keep = np.linspace(0, len(prompts) - 1, min(cfg.prompts, len(prompts))).round().astype(int)
    prompts, metadata = [prompts[i] for i in keep], [metadata[i] for i in keep]
    score = rewards.get_reward(cfg.task, world.kind)
    many = [q for q in prompts for _ in range(cfg.images)]
    seeds = list(range(len(many)))

    loaded = []

    def scores(path):  # (prompts,) mean score of each prompt's images
        name = None
        if path:
            name = f"model{len(loaded)}"
            loaded.append(path)
            worlds.load_lora(world.transformer, path, name)
        with worlds.adapter(world.transformer, name):
            images = sde.sample(world, many, steps=world.defaults["eval_steps"], guidance_scale=world.defaults["guidance_scale"],
                                noise_level=0.0, seeds=seeds, batch_size=64)["images"]
        s = torch.as_tensor(score(images, many, [m for m in metadata for _ in range(cfg.images)]), dtype=torch.float64)
        return s.reshape(len(prompts), cfg.images).mean(1)

    se = lambda x: x.std().item() / math.sqrt(len(x))
    base, teacher = scores(None), scores(cfg.teacher)
    gain = teacher - base
    print(f"{cfg.task}, {len(prompts)} test prompts x {cfg.images} images, paired | base {base.mean():.3f} +- {se(base):.3f} | "
          f"teacher {teacher.mean():.3f} +- {se(teacher):.3f} (gain {gain.mean():+.3f} +- {se(gain):.3f})")
    print(f"{'run':<14} {'epochs':>6} {'calls/img':>9} {'rel':>5} {'score':>14} {'- base':>15} {'share of gain':>15} {'- first run':>15}")
    rows, ref, first = [], None, None
    for label, _, path in entries:
        calls, epochs = calls_by[label]
        s = scores(os.path.join(path, "adapter.safetensors"))
        d = s - base
        if gain.mean().item() == 0:  # a teacher with no gain on these prompts: no share to keep (nan, printed as such)
            share, share_se = torch.tensor(float("nan")), float("nan")
        else:  # a ratio of paired means; delta-method SE over prompts
            share = d.mean() / gain.mean()
            share_se = (d - share * gain).std().item() / math.sqrt(len(d)) / abs(gain.mean().item())
        total = calls * epochs
        ref = ref or total
        first = s if first is None else first
        vs_first = s - first  # paired: the same prompts and seeds
        rows.append(dict(run=label, folder=path, epochs=epochs, calls_per_image=calls, calls_relative=total / ref,
                         score=s.mean().item(), score_se=se(s), minus_base=d.mean().item(), minus_base_se=se(d),
                         share=share.item(), share_se=share_se, minus_first=vs_first.mean().item(), minus_first_se=se(vs_first)))
        print(f"{label:<14} {epochs:>6} {calls:>9.0f} {total / ref:>5.2f} {s.mean():>8.3f} +- {se(s):.3f} "
              f"{d.mean():>+8.3f} +- {se(d):.3f} {share:>8.2f} +- {share_se:.2f} {vs_first.mean():>+8.3f} +- {se(vs_first):.3f}")
    if cfg.out:
        runs.write_json(cfg.out, dict(config=vars(cfg), base=base.mean().item(), base_se=se(base), teacher=teacher.mean().item(),
                                      gain=gain.mean().item(), gain_se=se(gain), runs=rows))


if __name__ == "__main__":
    main()
