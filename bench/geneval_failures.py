"""
bench/geneval_failures.py: why a tiny-world base fails GenEval prompts: by drawing badly, or by not
following the prompt (issue #19: Flow-GRPO's gain on SD3.5-M comes from the second kind). A diagnostic
script, not a timed test.

For each base it samples the GenEval test prompts with evaluate.py's ODE sampler and reads every image
as the reward does (tiny_world's colour classes and connected components). A component of an object
colour that is big enough to be an object either is a recognised shape (its best ideal shape's IoU >=
tiny_world.MIN_SHAPE_IOU) or is a ragged blob. A failing image (GenEval strict = 0) is then
  a drawing failure            if any of its object components is a ragged blob;
  a prompt-following failure   if every component is a clean shape, but the wrong colour, shape,
                               count or position for the prompt.
It prints per base: GenEval (strict), the share of components that are clean shapes, the split of
the failures, and GenEval per prompt category. The renderer's ground truth is the reference (every
component clean). With --groups G it also samples what Flow-GRPO learns from: groups of G SDE images
(the world's sampler and noise level, one shared initial noise a group) of 12 training prompts a
category, and prints per category the strict success rate and the share of groups that hold a success
at all (a group without one gives GRPO no signal on that clause). With --relations it asks whether a
base reads the relation word at all: 32 position prompts and the same prompts with the relation
flipped (left of <-> right of, above <-> below), ODE images from the same seeds; it prints the mean
pixel change the flip makes beside the change another seed makes, and GenEval of both on the
original prompts.

Command (tiny world, CPU, ~1 minute a base):
  python bench/geneval_failures.py --bases assets/tiny_base.safetensors,/tmp/pilot/base_b.safetensors
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: bench/ sits above nothing
import sde  # noqa: E402
import tiny_world as tw  # noqa: E402
import worlds  # noqa: E402


def read_images(images, prompts):
    """(strict GenEval per image, clean components, all components, any ragged component per image)."""
    strict = tw.score("geneval", images, prompts)
    shapes = [[shape for _, shape, _, _ in tw._components(cls)] for cls in tw._colour_classes(tw._to_hwc(images))]
    clean = sum(s is not None for image in shapes for s in image)
    total = sum(len(image) for image in shapes)
    return np.asarray(strict), clean, total, np.array([None in image for image in shapes])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", default=tw.CHECKPOINT, help="tiny base .safetensors files, comma-separated")
    p.add_argument("--prompts", type=int, default=120, help="GenEval test prompts (evenly spread)")
    p.add_argument("--images", type=int, default=2, help="images per prompt")
    p.add_argument("--groups", type=int, default=0, help="G: also sample Flow-GRPO's groups of G SDE images (0 = no)")
    p.add_argument("--relations", action="store_true", help="also: how much flipping a prompt's relation word changes its image")
    p.add_argument("--threads", type=int, default=0)
    cfg = p.parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts, _ = worlds.read_prompts(os.path.join(tw.PROMPT_DIR, "geneval_test.txt"))
    keep = np.linspace(0, len(prompts) - 1, min(cfg.prompts, len(prompts))).round().astype(int)
    many = [prompts[i] for i in keep for _ in range(cfg.images)]
    rng = np.random.default_rng(0)
    rows = [("ground truth", tw.render_batch(many, rng))]
    loaded = {base: worlds.load_world(f"tiny:{base}") for base in cfg.bases.split(",")}
    for base, world in loaded.items():
        rows.append((base, sde.sample(world, many, steps=world.defaults["eval_steps"], guidance_scale=world.defaults["guidance_scale"],
                                      noise_level=0.0, seeds=list(range(len(many))), batch_size=64)["images"]))
    category = np.array([tw.geneval_category(tw.parse(q)) for q in many])
    cats = list(dict.fromkeys(category))
    print(f"GenEval, {len(keep)} test prompts x {cfg.images} images (ODE, the world's steps and CFG)")
    print(f"{'images':<44} {'strict':>7} {'clean components':>17} {'failures: drawing':>18} {'prompt-following':>17}   "
          + " ".join(f"{c[:12]:>12}" for c in cats))
    for name, images in rows:
        strict, clean, total, ragged = read_images(images, many)
        fail = strict < 1
        print(f"{name[-44:]:<44} {strict.mean():>7.3f} {clean / max(total, 1):>10.3f} of {total:<5} {(fail & ragged).mean():>18.3f} "
              f"{(fail & ~ragged).mean():>17.3f}   " + " ".join(f"{strict[category == c].mean():>12.3f}" for c in cats))
    if cfg.groups:
        train, _ = worlds.read_prompts(os.path.join(tw.PROMPT_DIR, "geneval_train.txt"))
        G = cfg.groups
        print(f"Flow-GRPO's groups: {G} SDE images a prompt (one initial noise a group), 12 training prompts a category: "
              f"strict success rate / share of groups with a success")
        for base, world in loaded.items():
            cells = []
            for c in cats:
                group = [q for q in train if tw.geneval_category(tw.parse(q)) == c][:12]
                many = [q for q in group for _ in range(G)]
                out = sde.sample(world, many, world.defaults["train_steps"], world.defaults["guidance_scale"], world.defaults["noise_level"],
                                 seeds=[sde.sample_seed(0, i) for i in range(len(many))], init_seeds=[sde.sample_seed(1, i // G) for i in range(len(many))],
                                 sde_steps=sde.sde_window_steps(world.defaults["train_steps"], world.defaults["sde_window"], 0, 0), batch_size=64)
                r = np.asarray(tw.score("geneval", out["images"], many)).reshape(len(group), G)
                cells.append(f"{c} {r.mean():.3f} / {(r.max(1) > 0).mean():.2f}")
            print(f"  {base[-44:]:<44} " + " | ".join(cells))
    if cfg.relations:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        train, _ = worlds.read_prompts(os.path.join(tw.PROMPT_DIR, "geneval_train.txt"))
        prompts = [q for q in train if tw.geneval_category(tw.parse(q)) == "position"][:32]
        flipped = [next(q.replace(f" {r} ", f" {o} ") for r, o in opposite.items() if f" {r} " in q) for q in prompts]
        print("relation word flipped, the same seeds (32 position prompts, ODE): mean |pixel change| of the flip vs of another seed; "
              "GenEval on the original prompt of the image of it / of the flipped prompt")
        for base, world in loaded.items():
            run = lambda ps, first: sde.sample(world, ps, steps=world.defaults["eval_steps"], guidance_scale=world.defaults["guidance_scale"],
                                               noise_level=0.0, seeds=list(range(first, first + len(ps))))["images"]
            a, b, c = run(prompts, 0), run(flipped, 0), run(prompts, 1000)
            print(f"  {base[-44:]:<44} flip {float((a - b).abs().mean()):.4f} vs seed {float((a - c).abs().mean()):.4f} | "
                  f"GenEval {tw.score('geneval', a, prompts).mean():.3f} / {tw.score('geneval', b, prompts).mean():.3f}")


if __name__ == "__main__":
    main()
