"""
Do the tiny world's modes defeat any reader, or only the world's own rewards? (issue #38, item 3)

For each task's mode (v4, tiny_world.TASK_MODES: broken glyphs for ocr, ghost objects (washed almost into the
background) for geneval, small subjects for pickscore, blur for deqa; with --v3, v3's: faint glyphs, washed objects, small subjects, grain)
this renders ground truth with the world's own drawing code (tiny_world.render_at) on one split's prompts,
each prompt once crisp and once in the mode from the same seed (the same layout), and scores both with
  our reward      tiny_world.score (GenEval strict)
  independent readers, which share no threshold with it:
    rapidocr      the project's real OCR engine (rewards.py's), its recognition model on the image upscaled
                  x8 (nearest) to 256 px, Flow-GRPO's rule; with --ocr-detector its detector first, as
                  rewards.py runs it (about 1 s an image on a shared core instead of 0.03 s)
    template      the world's own glyph recogniser on a colour-agnostic ink mask (tiny_world.glyph_ink:
                  Otsu's cut of the distance to the sign's colour, not the reward's "within 0.3 of white")
    segmentation  colour-agnostic objects (tiny_world.segment: Otsu's cut of the distance to the border's
                  colour), the named shape by the GenEval program's shape fit, the named colour by its direction
                  from the background (tiny_world.read_colour); for pickscore's "big", an extent >= half the image
    noise         Immerkaer's noise estimate (tiny_world.noise_std) below 0.02 reads "clean"
    focus         the variance-of-Laplacian focus measure, over the image's variance, above FOCUS_CUT reads
                  "in focus" (the classic autofocus score; no edge or palette test of ours)
  ground truth    what the drawing holds: 1 where the named content is drawn (a faint glyph and a washed object
                  still are), 0 where it is not (a "big" subject drawn small, a glyph with half its strokes
                  missing, an object melted out of its shape) or the image is degraded (grain, blur)
A mode passes issue #38's bar when every independent reader scores it at most half of the crisp form.
--sweep then redraws each failing mode at fixed strengths (tiny_world.MODE_RANGES says what they mean) and
prints where each reader falls to half: the design input for tiny world v4. --blur sweeps a candidate mode
instead, the whole image under a Gaussian blur, for glyphs and objects.

The test prompts are never read: the default is the train split (the world has no validation split yet).

  python bench/independent_readers.py --n 64                 # v4's modes
  python bench/independent_readers.py --n 64 --v3 --sweep    # v3's, and how strong they would have to be
  python bench/independent_readers.py --n 64 --tasks ocr,geneval --blur
  python bench/independent_readers.py --n 32 --base-samples assets/tiny_base.safetensors   # in_mode vs drawn_mode
"""

import argparse
import os
import sys

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_world as tw  # noqa: E402

MODE_OF = dict(tw.TASK_MODES)  # --v3: tw.V3_MODES
READERS = {"faint": ("rapidocr", "template"), "broken": ("rapidocr", "template"), "washed": ("segmentation",),
           "melted": ("segmentation",), "ghost": ("segmentation",), "small": ("segmentation",), "grain": ("noise",),
           "blurred": ("focus",), "blur": ("focus",)}
FOCUS_CUT = 0.4  # variance of the Laplacian over the image's variance, on deqa's train prompts (64): crisp
                 # ground truth 0.64 at least (median 2.0), blurred at sigma 0.9-1.4 0.26 at most (median 0.09)
SWEEPS = {"faint": (0.55, 0.45, 0.35, 0.25, 0.15, 0.10, 0.05, 0.02),      # ink's share of the way to white
          "washed": (0.55, 0.70, 0.80, 0.90, 0.95, 0.98),                  # paint's share of the way to the background
          "small": (12.0, 10.0, 8.0, 6.5, 5.0),                            # the subject's radius, px
          "grain": (0.005, 0.01, 0.02, 0.04, 0.10),                        # the noise's std
          "blur": (0.5, 1.0, 1.5, 2.0, 3.0),                               # --blur: a Gaussian's sigma, px
          "blurred": (0.3, 0.5, 0.7, 0.9, 1.2),                            # v4's blur, sigma px
          "broken": (0.9, 0.8, 0.7, 0.6, 0.5),                             # share of the glyph's strokes drawn
          "melted": (0.0, 0.2, 0.4, 0.6, 0.8),                             # how far the blob is drawn out
          "ghost": (0.55, 0.70, 0.80, 0.88, 0.95)}                         # as washed

# -----------------------------------------------------------------------------
# drawing


def draw(task, prompts, mode, strength=None, seed=0):
    """Prompt i drawn from seed + i: crisp (mode None), in the task's mode at a strength (None: render's range).
    Grain is not a render mode: it is sensor noise of std 0.04-0.10 on the crisp image, as calibrate adds it;
    blur (--blur, a candidate v4 mode) is the crisp image under a Gaussian of sigma `strength` px."""
    render_mode = None if mode in ("grain", "blur") else mode  # (v4's "blurred" is a render mode)
    imgs = np.stack([tw.render_at(p, np.random.default_rng(seed + i), render_mode, strength)
                     for i, p in enumerate(prompts)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255   # (B, 3, 32, 32)
    if mode == "blur":
        x = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, strength, strength)))
    if mode == "grain":
        rng = np.random.default_rng(seed + 10_000)
        std = rng.uniform(0.04, 0.10, (len(x), 1, 1, 1)) if strength is None else strength
        x = (x + torch.from_numpy((rng.normal(0, 1, x.shape) * std).astype(np.float32))).clamp(0, 1)
    return x

# -----------------------------------------------------------------------------
# the independent readers


_OCR = {}


def read_rapidocr(images, prompts, detector=False):
    """rapidocr's text on each image upscaled x8 to 256 px (nearest: the glyph's cells stay sharp), scored by
    Flow-GRPO's rule (tiny_world.ocr_reward). Recognition alone by default: the image is one sign, a text line."""
    from PIL import Image
    if "engine" not in _OCR:
        from rapidocr import RapidOCR
        _OCR["engine"] = RapidOCR(params={"Global.log_level": "critical", "Global.use_cls": False,
                                          "Global.text_score": 0.5,
                                          "EngineConfig.onnxruntime.intra_op_num_threads": 1,
                                          "EngineConfig.onnxruntime.inter_op_num_threads": 1})
    out = []
    for img, p in zip((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), prompts):
        big = np.asarray(Image.fromarray(img).resize((256, 256), Image.NEAREST))
        r = _OCR["engine"](big, use_det=detector, use_cls=False, use_rec=True)
        out.append(tw.ocr_reward(tw.parse(p)["text"], "".join(r.txts) if r.txts else ""))
    return np.array(out)


def read_template(images, prompts):
    """The world's glyph recogniser on a colour-agnostic ink mask."""
    x = tw._to_hwc(images)
    return np.array([tw.ocr_reward(tw.parse(p)["text"], tw._recognise(tw.glyph_ink(img)[0]))
                     for img, p in zip(x, prompts)])


def read_segmentation(images, prompts):
    """1 where a colour-agnostic component has the named shape and colour (and, for a "big" subject, an extent
    of at least half the image) for every object the prompt names."""
    out = []
    for img, p in zip(tw._to_hwc(images), prompts):
        bg, comps = tw.segment(img)
        found = []
        for c in comps:
            ys, xs = np.nonzero(c)
            sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            found.append((tw.read_colour(img[c].mean(0), bg), tw._classify_shape(c, sl), extent))
        ok = all(any(f[1] == o["shape"] and (o["colour"] is None or f[0] == o["colour"])
                     and (not o["big"] or f[2] >= tw.IMAGE_SIZE / 2) for f in found)
                 for o in tw.parse(p)["objects"])
        out.append(float(ok))
    return np.array(out)


def read_noise(images, prompts):
    return (tw.noise_std(tw._to_hwc(images)) < 0.02).astype(np.float64)


def focus(images):
    """The variance of the 3x3 Laplacian of the grey image over the image's grey variance (B,)."""
    g = tw._to_hwc(images).mean(-1)
    lap = np.stack([ndimage.laplace(x) for x in g])[:, 1:-1, 1:-1]
    return lap.var((1, 2)) / np.maximum(g.var((1, 2)), 1e-8)


def read_focus(images, prompts):
    return (focus(images) > FOCUS_CUT).astype(np.float64)


def read(reader, images, prompts, detector=False):
    if reader == "rapidocr":
        return read_rapidocr(images, prompts, detector)
    return {"template": read_template, "segmentation": read_segmentation, "noise": read_noise,
            "focus": read_focus}[reader](images, prompts)


def ground_truth(task, mode):
    """What the drawing holds (see the docstring): the named content is drawn in faint and washed only."""
    return 1.0 if mode is None or mode in ("faint", "washed") else 0.0

# -----------------------------------------------------------------------------


def compare_on_samples(args):
    """The base's share of images in each task's mode by the reward's test (in_mode) and by how they are drawn
    (drawn_mode), their agreement, the reward of the images drawn_mode calls crisp, and the independent readers
    on the base's own crisp and moded images."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pilot_v3 import images_of
    transformer, encode, codec = tw.load_base(args.base_samples)
    print(f"the base {args.base_samples}: {args.n} {args.split} prompts a task x 2 images, ODE "
          f"{tw.DEFAULT_STEPS_EVAL} steps, CFG {tw.DEFAULT_GUIDANCE}\n")
    print("| task | mode | in_mode share | drawn_mode share | agree | reward | reward, crisp by in_mode "
          "| reward, crisp by drawn_mode | readers on the base's crisp / moded images (drawn_mode) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        prompts = tw.read_prompts(task, args.split)[:args.n]
        x = images_of(transformer, encode, codec, prompts, 2).flatten(0, 1)
        rep = [p for p in prompts for _ in range(2)]
        s, a, b = tw.score(task, x, rep), tw.in_mode(task, x, rep), tw.drawn_mode(task, x, rep, MODE_OF)
        crisp = lambda m: f"{s[~m].mean():.3f}" if (~m).any() else "-"  # noqa: E731
        split = lambda r: (f"{r[~b].mean():.3f}" if (~b).any() else "-") + " / " + (  # noqa: E731
            f"{r[b].mean():.3f}" if b.any() else "-")
        readers = ", ".join(f"{r} {split(read(r, x, rep))}" for r in READERS[MODE_OF[task]])
        print(f"| {task} | {MODE_OF[task]} | {a.mean():.3f} | {b.mean():.3f} | {(a == b).mean():.3f} | "
              f"{s.mean():.3f} | {crisp(a)} | {crisp(b)} | {readers} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="prompts a task (each drawn crisp and in its mode)")
    ap.add_argument("--split", default="train", choices=("train",), help="never the test prompts")
    ap.add_argument("--tasks", default=",".join(MODE_OF))
    ap.add_argument("--sweep", action="store_true", help="redraw each failing mode at fixed strengths")
    ap.add_argument("--sweep-all", action="store_true", help="sweep every mode, failing or not")
    ap.add_argument("--base-samples", default=None, metavar="CHECKPOINT",
                    help="instead: sample this base on each task's prompts (2 images a prompt) and compare "
                         "in_mode with drawn_mode")
    ap.add_argument("--blur", action="store_true", help="sweep blur, a candidate v4 mode, for ocr and geneval")
    ap.add_argument("--ocr-detector", action="store_true", help="rapidocr with its detector (slow)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v3", action="store_true", help="v3's modes (faint, washed, small, grain) instead of v4's")
    args = ap.parse_args()
    if args.v3:
        MODE_OF.update(tw.V3_MODES)
    torch.set_num_threads(args.threads)
    if args.base_samples:
        return compare_on_samples(args)
    mean = lambda a: f"{a.mean():.3f} +- {a.std(ddof=1) / np.sqrt(len(a)):.3f}"  # noqa: E731

    print(f"{args.n} {args.split} prompts a task, each drawn crisp and in its mode from one seed; "
          f"rapidocr {'with' if args.ocr_detector else 'without'} its detector\n")
    print("| task | mode | our reward, crisp | in the mode | reader | reader, crisp | in the mode | mode / crisp "
          "| ground truth, crisp / mode | bar (<= 1/2) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failing = []
    for task in args.tasks.split(","):
        mode = MODE_OF[task]
        prompts = tw.read_prompts(task, args.split)[:args.n]
        crisp, moded = draw(task, prompts, None), draw(task, prompts, mode)
        ours = [tw.score(task, x, prompts) for x in (crisp, moded)]
        all_pass = True
        for reader in READERS[mode]:
            r0, r1 = read(reader, crisp, prompts, args.ocr_detector), read(reader, moded, prompts, args.ocr_detector)
            ratio = r1.mean() / r0.mean() if r0.mean() else float("nan")
            ok = ratio <= 0.5
            all_pass &= ok
            print(f"| {task} | {mode} | {mean(ours[0])} | {mean(ours[1])} | {reader} | {mean(r0)} | {mean(r1)} | "
                  f"{ratio:.2f} | {ground_truth(task, None):.0f} / {ground_truth(task, mode):.0f} | "
                  f"{'passes' if ok else 'FAILS'} |", flush=True)
        if not all_pass or args.sweep_all:
            failing.append(task)

    if not (args.sweep or args.sweep_all or args.blur):
        return
    sweeps = [(t, "blur") for t in ("ocr", "geneval")] if args.blur else [(t, MODE_OF[t]) for t in failing]
    for task, mode in sweeps:
        prompts = tw.read_prompts(task, args.split)[:args.n]
        crisp = draw(task, prompts, None)
        base = {r: read(r, crisp, prompts, args.ocr_detector).mean() for r in READERS[mode]}
        print(f"\n{task}, {mode} at fixed strengths ({args.n} prompts; crisp: "
              + ", ".join(f"{r} {v:.3f}" for r, v in base.items()) + f"; render's range {tw.MODE_RANGES.get(mode)})")
        print("| strength | our reward | " + " | ".join(f"{r} (share of crisp)" for r in READERS[mode])
              + " | drawn_strength |")
        print("|---" * (3 + len(READERS[mode])) + "|")
        half = {}
        for s in SWEEPS[mode]:
            x = draw(task, prompts, mode, s)
            cells = []
            for r in READERS[mode]:
                v = read(r, x, prompts, args.ocr_detector).mean()
                cells.append(f"{v:.3f} ({v / base[r]:.2f})")
                if v <= base[r] / 2 and r not in half:
                    half[r] = s
            print(f"| {s} | {tw.score(task, x, prompts).mean():.3f} | " + " | ".join(cells)
                  + f" | {tw.mode_strength(mode, x, prompts).mean() if mode != 'blur' else float('nan'):.3f} |", flush=True)
        print("first strength at which each reader scores <= half of crisp: "
              + ", ".join(f"{r} {half.get(r, 'none in the sweep')}" for r in READERS[mode]))


if __name__ == "__main__":
    main()
