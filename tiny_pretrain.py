"""
tiny_pretrain.py: the tiny world's commands: write its prompt files, pretrain its base, calibrate its
rewards. The world itself (scenes, captions, scorers, the model's config) is tiny_world.py.

Commands (2 CPU cores):
  python tiny_pretrain.py prompts                      # write prompts/tiny/*.txt (deterministic)
  python tiny_pretrain.py pretrain --steps 3000 --seed 0 --out /tmp/base.safetensors
  python tiny_pretrain.py calibrate                    # reward table (each task's mode too), base scores, grids
The shipped v4 base (issue #38) is the v3 base fine-tuned once with v4's modes (glyphs with strokes missing,
objects washed almost into the background, small subjects, blur; v3's faint and washed modes no longer drawn),
3000 steps, 16 minutes on one core
(assets/tiny_base.json records the command, seed and loss, with v3's and v1's runs under "previous"):
  git show a78ef6d:assets/tiny_base.safetensors > /tmp/v4/v3.safetensors                              # v3
  git show a78ef6d:assets/tiny_base.json > /tmp/v4/v3.json
  python tiny_pretrain.py pretrain --steps 3000 --seed 40 --threads 1 --init /tmp/v4/v3.safetensors --cooldown \
      --broken 0.6 --ghost 0.6 --small 0.8 --blurred 0.35 \
      --mix ocr:0.45,geneval:0.1,geneval-task:0.2,deqa:0.1,pickscore:0.15 --out /tmp/v4/baseA.safetensors  # loss 0.0297
(the same command with --melted 0.6 in place of --ghost 0.6, loss 0.0353, was tried and dropped: docs/TINY_WORLD.md)
The v3 base (issue #29) was the v1 base fine-tuned in three step-counted runs, each continuing the last:
  git show 5089724:assets/tiny_base.safetensors > /tmp/v1.safetensors   # v1 (sha256 033612fa...): five wall-clock runs
  # at commit a438fe6 (16-glyph signs):
  python tiny_pretrain.py pretrain --steps 2500 --seed 22 --threads 1 --init /tmp/v1.safetensors --cooldown \
      --faint 0.7 --washed 0.9 --out /tmp/B.safetensors                                                  # loss 0.0338
  python tiny_pretrain.py pretrain --steps 3000 --seed 24 --threads 1 --init /tmp/B.safetensors --cooldown \
      --faint 0.7 --washed 0.6 --small 0.5 --out /tmp/B2.safetensors                                     # loss 0.0327
  # at commit a78ef6d (8-glyph signs):
  python tiny_pretrain.py pretrain --steps 3000 --seed 27 --threads 1 --init /tmp/B2.safetensors --cooldown \
      --faint 0.7 --washed 0.6 --small 0.5 --mix ocr:0.55,geneval:0.1,geneval-task:0.2,deqa:0.075,pickscore:0.075 \
      --out assets/tiny_base.safetensors                                                                 # loss 0.0264
Each run took 15-30 minutes on one core beside another job; the same commands give the same base up to float
rounding. The v1 base's history (`--minutes`, under this file's former name tiny_world.py) is in
docs/NOTES.md#pretraining-the-tiny-base.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from tiny_world import (CHECKPOINT, DEFAULT_GUIDANCE, DEFAULT_STEPS_EVAL, GENEVAL_CATEGORIES, HERE, IMAGE_SIZE, SHIFT, TASKS,
                        TASK_MODES, build_transformer, corrupt_caption, degrade, diversity, drawn_mode, load_base, load_codec, make_encoder, make_prompt, omit_from_scene, read_prompts,
                        parse, render_batch, sample, score, score_ood, text_tables, write_prompt_files)

# -----------------------------------------------------------------------------
# pretraining: rectified flow on freshly drawn scenes of every task (never the OOD compositions)

PRETRAIN_MIX = {"geneval": 0.2, "geneval-task": 0.2, "ocr": 0.4, "deqa": 0.1, "pickscore": 0.1}  # caption sampling weights
# (geneval: all six GenEval categories; geneval-task: the one-object prompts of the GenEval task, backgrounds named)
BATCH_SIZE = 48          # scenes per step
LR = 1e-3                # AdamW peak learning rate (linear warmup, then constant)
WARMUP_STEPS = 200       # learning-rate warmup
WEIGHT_DECAY = 0.01      # AdamW weight decay
EMA_DECAY = 0.999        # the saved weights are an exponential moving average
PROMPT_DROPOUT = 0.1     # fraction of captions replaced by "" so that CFG works
SAVE_EVERY_S = 120       # seconds between atomic checkpoints


def _save(path, transformer, tables, card, vae=None):
    from safetensors.torch import save_file
    state = {f"transformer.{k}": v.detach().contiguous() for k, v in transformer.state_dict().items()}
    state.update(tables)
    state.update(vae or {})  # a learnt autoencoder travels with its base (tiny_world.load_codec)
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    with open(path, "rb") as f:
        card["sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(tmp, "w") as f:
        json.dump(card, f, indent=2)
    os.replace(tmp, os.path.splitext(path)[0] + ".json")


def _parse_odds(text, flag, names, start, what):
    """'name:odds,...' -> start updated with each item's odds; one error line naming the flag and the item."""
    mix = dict(start)
    for item in text.split(","):
        name, _, odds = item.partition(":")
        try:
            value = float(odds)
        except ValueError:
            value = -1.0
        if name not in names or value < 0:
            raise SystemExit(f"error: {flag} item {item!r} must be {what}:odds with a {what} of {list(names)} and odds >= 0")
        mix[name] = value
    if sum(mix.values()) <= 0:
        raise SystemExit(f"error: {flag} {text!r} gives every {what} odds 0")
    return mix


def parse_mix(text):
    """'ocr:0.55,geneval:0.1,...' -> the caption odds of pretraining (the kinds listed; PRETRAIN_MIX's keys);
    '' -> None (the default)."""
    return _parse_odds(text, "--mix", list(PRETRAIN_MIX), {}, "name") if text else None


def parse_geneval_mix(text):
    """'position:3,colour_attr:3' -> the odds of every GenEval category (unlisted ones 1); '' -> None (equal)."""
    return _parse_odds(text, "--geneval-mix", GENEVAL_CATEGORIES, dict.fromkeys(GENEVAL_CATEGORIES, 1.0), "category") if text else None


MODE_DRAWS = (("faint", "broken"), ("small",), ("washed", "melted", "ghost"))
# the modes that share one draw (their odds sum to at most 1): a sign's glyph (v3 faint, v4 broken), a big subject,
# the object of a one-object scene (v3 washed; v4 melted, ghost). "blurred" (v4) is drawn after them, on any scene
MODE_FLAGS = tuple(m for draw in MODE_DRAWS for m in draw) + ("blurred",)


def _mode(prompt, rng, odds):
    """The unnamed rendering mode of one pretraining scene, odds: {mode: share} (MODE_FLAGS; absent = 0): a
    sign's glyph faint (v3) or broken (v4), the object of a one-object scene (not a big subject) washed out (v3),
    melted or washed almost into the background (v4: a ghost), a big subject drawn small; a scene left crisp by
    these is blurred with odds `blurred` (v4: every kind of scene); else crisp (None)."""
    spec = parse(prompt)
    objs = spec.get("objects") or []
    if spec["kind"] == "ocr":
        draw = MODE_DRAWS[0]
    elif len(objs) == 1 and objs[0]["big"]:
        draw = MODE_DRAWS[1]
    elif len(objs) == 1 and objs[0]["count"] == 1:
        draw = MODE_DRAWS[2]
    else:
        draw = ()
    mode = _pick(rng, {m: odds.get(m, 0.0) for m in draw})
    if mode is None and odds.get("blurred") and rng.random() < odds["blurred"]:
        mode = "blurred"
    return mode


def _pick(rng, odds):
    """One of the modes with its odds (their sum at most 1), or None; no draw where every odds is 0 (v3's
    commands draw the same numbers as before)."""
    odds = {k: v for k, v in odds.items() if v}
    if not odds:
        return None
    u, total = rng.random(), 0.0
    for name, p in odds.items():
        total += p
        if u < total:
            return name
    return None


def pretrain(minutes, seed, out, threads, init, lr=LR, cooldown=False, steps=None, caption_noise=0.0, quality_noise=0.0,
             autoencoder=None, geneval_mix=None, omission_noise=0.0, mix=None, mode_odds=None):
    """Rectified-flow pretraining for `steps` optimizer steps (the same command gives the same base on any
    machine, up to float rounding) or, without steps, for `minutes` of wall time (the shipped v1 base).
    caption_noise / quality_noise: the share of scenes captioned with one alt-text-like error
    (tiny_world.corrupt_caption) / rendered with one quality fault their caption never names (degrade).
    autoencoder: a file of vae.* tensors (bench/pilot_autoencoder.py): the base then learns that frozen
    autoencoder's latents instead of the pixel-unshuffle's, and carries it in its checkpoint (with --init,
    the init's latent is kept). geneval_mix: {category: odds} of the GenEval captions (default: equal).
    omission_noise: the share of scenes rendered with one thing their caption names left out
    (tiny_world.omit_from_scene): one failure that every kind of prompt shares. mode_odds: {mode: share} of the
    unnamed rendering modes (_mode; MODE_FLAGS, absent = 0)."""
    import copy
    from tqdm import tqdm
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from safetensors.torch import load_file
    init_state = load_file(init) if init else {}
    vae = {k: v for k, v in (load_file(autoencoder) if autoencoder else init_state).items() if k.startswith("vae.")}
    codec = load_codec(vae)
    transformer = build_transformer(codec.shape).train()
    previous = None
    if init:  # continue from saved (EMA) weights with a fresh optimizer; the card keeps the history. Under
        # --autoencoder a pixel-unshuffle base lends the tensors whose shapes match: both latents are 8x8
        # tokens, so its blocks, text and time embeddings carry over, its patch embedding and output do not
        own = transformer.state_dict()
        given = {k[len("transformer."):]: v for k, v in init_state.items() if k.startswith("transformer.")}
        shared = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
        if len(shared) < len(own) and not autoencoder:
            raise SystemExit(f"error: --init {init} does not fit this transformer ({len(shared)} of {len(own)} tensors)")
        if len(shared) < len(own):
            print(f"--init {init}: {len(shared)} of {len(own)} tensors reused, the rest start fresh: "
                  + ", ".join(sorted({k.split('.')[0] for k in own if k not in shared})))
        transformer.load_state_dict(shared, strict=False)
        with open(os.path.splitext(init)[0] + ".json") as f:
            previous = json.load(f)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    tables = text_tables()
    encode_prompts = make_encoder(tables)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.99))
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer: {n_params / 1e6:.2f}M parameters; batch {BATCH_SIZE}; " + (f"{steps} steps" if steps else f"{minutes} minutes")
          + f"; caption noise {caption_noise}, quality noise {quality_noise}, omission noise {omission_noise}")
    card = dict(command="python " + " ".join(sys.argv), seed=seed, minutes=minutes, threads=threads, batch_size=BATCH_SIZE,
                lr=lr, cooldown=cooldown, ema_decay=EMA_DECAY, prompt_dropout=PROMPT_DROPOUT, mix=PRETRAIN_MIX, params=n_params,
                init=init, previous=previous, max_steps=steps, caption_noise=caption_noise, quality_noise=quality_noise,
                autoencoder=autoencoder, latent=list(codec.shape), geneval_mix=geneval_mix, omission_noise=omission_noise,
                mix_v3=mix or PRETRAIN_MIX, **{m: (mode_odds or {}).get(m, 0.0) for m in MODE_FLAGS})
    mix = mix or PRETRAIN_MIX
    tasks, weights = list(mix), [w / sum(mix.values()) for w in mix.values()]
    t_start = last_save = time.time()
    step, loss_avg = 0, None
    bar = tqdm(total=steps or int(minutes * 60), unit="step" if steps else "s", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}")
    while (step < steps) if steps else (time.time() - t_start < minutes * 60):
        # data: captions from every task's generator, their ground-truth scenes, 10% dropped to ""
        prompts = [make_prompt(tasks[rng.choice(len(tasks), p=weights)], rng, geneval_mix) for _ in range(BATCH_SIZE)]
        shown = [omit_from_scene(p, rng) if omission_noise and rng.random() < omission_noise else p for p in prompts]
        modes = [_mode(p, rng, mode_odds or {}) for p in shown]          # unnamed rendering modes
        images = render_batch(shown, rng, modes)                             # (B, 3, 32, 32)
        for i in range(BATCH_SIZE):  # web-like data: some images worse than their captions say ...
            if rng.random() < quality_noise:
                images[i] = degrade(images[i], rng)
        prompts = [corrupt_caption(p, rng) if rng.random() < caption_noise else p for p in prompts]  # ... some captions wrong
        x0 = codec.encode(images)                                            # (B, 12, 16, 16) or (B, C, 8, 8)
        prompts = ["" if rng.random() < PROMPT_DROPOUT else p for p in prompts]
        emb, pooled = encode_prompts(prompts)
        # rectified flow (SD3): logit-normal sigma, x_t = (1 - sigma) x0 + sigma noise, target v = noise - x0
        sigma = torch.sigmoid(torch.randn(BATCH_SIZE))
        noise = torch.randn_like(x0)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        v = transformer(hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled,
                        timestep=1000 * sigma, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        # update
        # linear warmup, then constant; with --cooldown, linear decay to 0 over the run's wall-clock time
        done = step / steps if steps else (time.time() - t_start) / (minutes * 60)
        frac_left = max(0.0, 1 - done) if cooldown else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS) * frac_left
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (step + 1) / (step + 10))  # short EMA at the start
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        bar.n = step if steps else int(time.time() - t_start)
        bar.set_postfix(step=step, loss=f"{loss_avg:.4f}")
        # log / save
        if time.time() - last_save > SAVE_EVERY_S:
            _save(out, ema, tables, dict(card, steps=step, loss=round(loss_avg, 5)), vae)
            last_save = time.time()
    bar.close()
    _save(out, ema, tables, dict(card, steps=step, loss=round(loss_avg, 5)), vae)
    print(f"done: {step} steps, loss (EMA of batch losses) {loss_avg:.4f}, saved {out}")

# -----------------------------------------------------------------------------
# calibration: rewards on ground truth vs corruptions, and the base model on every test split

def _grid(images, nrow):
    """(B,3,32,32) -> PIL image, nrow per row, upscaled x3 for viewing."""
    x = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    b = len(x) // nrow * nrow
    x = x[:b].reshape(-1, nrow, IMAGE_SIZE, IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
    x = x.reshape(-1, nrow * IMAGE_SIZE, 3)
    return Image.fromarray(x).resize((x.shape[1] * 3, x.shape[0] * 3), Image.NEAREST)


def calibrate(n, steps, guidance, shift, threads, split="train", base_path=CHECKPOINT, grids=True):
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    print(f"{'task':10s} {'truth':>6s} {'mode':>6s} {'noise':>6s} {'blank':>6s} {'blur':>6s} {'base':>6s} {'sd':>6s} "
          f"{'in mode':>7s} {'crisp':>6s}   (n={n} {split} prompts; mode: {', '.join(f'{t} {m}' for t, m in TASK_MODES.items())}; "
          f"base: {steps} Euler steps, cfg {guidance}, shift {shift}; in mode: the base's share of images in its "
          f"task's mode, by how they are drawn (tiny_world.drawn_mode); crisp: its score on the others)")
    transformer, encode_prompts, codec = load_base(base_path)
    grids_truth, grids_base = [], []
    for task in TASKS:
        prompts = read_prompts(task, split)[:n]
        truth = render_batch(prompts, rng)
        moded = render_batch(prompts, rng, [TASK_MODES[task]] * len(prompts))
        noise = torch.from_numpy(rng.random(truth.shape, dtype=np.float32))
        blank = torch.full_like(truth, 0.05)
        blur = torch.from_numpy(ndimage.gaussian_filter(truth.numpy(), (0, 0, 1.0, 1.0)))
        t0 = time.time()
        base = sample(transformer, encode_prompts, prompts, steps, guidance, seed=1, shift=shift, codec=codec)
        t_sample = time.time() - t0
        row = [score(task, im, prompts) for im in (truth, moded, noise, blank, blur, base)]
        mode = drawn_mode(task, base, prompts)
        crisp = row[-1][~mode].mean() if (~mode).any() else float("nan")
        print(f"{task:10s} " + " ".join(f"{r.mean():6.3f}" for r in row) + f" {row[-1].std():6.3f} {mode.mean():7.3f} "
              f"{crisp:6.3f}   ({t_sample:.1f}s sampling)")
        grids_truth.append(torch.cat([truth[:4], moded[:4]]))
        grids_base.append(base[:8])
    ood = read_prompts("ood", "test")  # (the OOD compositions have no train split: never trained on)
    base = sample(transformer, encode_prompts, ood, steps, guidance, seed=1, shift=shift, codec=codec)
    print("ood (base):", {k: round(v, 3) for k, v in score_ood(base, ood).items()},
          " ood (truth):", {k: round(v, 3) for k, v in score_ood(render_batch(ood, rng), ood).items()})
    rep = [p for p in read_prompts("geneval", split)[:8] for _ in range(4)]
    print(f"diversity (4 samples x 8 geneval prompts): base "
          f"{diversity(sample(transformer, encode_prompts, rep, steps, guidance, seed=2, shift=shift, codec=codec), rep):.3f}, "
          f"truth {diversity(render_batch(rep, rng), rep):.3f}")
    # timing: one transformer forward at batch 16 with CFG (32 effective)
    emb, pooled = encode_prompts(["a photo of a red circle"] * 32)
    x = torch.randn(32, *codec.shape)
    with torch.no_grad():
        for k in range(6):
            if k == 1:
                t0 = time.time()
            transformer(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                        timestep=torch.full((32,), 500.0), return_dict=False)
    print(f"forward, batch 16 with CFG (32 rows): {(time.time() - t0) / 5 * 1000:.1f} ms; "
          f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters")
    if not grids:
        return
    os.makedirs(os.path.join(HERE, "assets"), exist_ok=True)
    _grid(torch.cat(grids_truth), 8).save(os.path.join(HERE, "assets", "tiny_ground_truth.png"))
    _grid(torch.cat(grids_base), 8).save(os.path.join(HERE, "assets", "tiny_base_samples.png"))
    print("wrote assets/tiny_ground_truth.png (rows: " + ", ".join(TASKS) + "; 4 crisp, then 4 in the task's mode) "
          "and assets/tiny_base_samples.png (rows: " + ", ".join(TASKS) + ")")

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="write prompts/tiny/*.txt")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("pretrain", help="train the base model")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (reproducible on any machine; overrides --minutes)")
    p.add_argument("--caption-noise", type=float, default=0.0, help="share of captions with one alt-text-like error")
    p.add_argument("--quality-noise", type=float, default=0.0, help="share of images with one unnamed quality fault")
    p.add_argument("--omission-noise", type=float, default=0.0, help="share of images that leave out one thing their "
                   "caption names (the second object, one of a count, one glyph)")
    p.add_argument("--faint", type=float, default=0.0, help="share of sign images whose glyph is drawn faint (v3)")
    p.add_argument("--washed", type=float, default=0.0, help="share of one-object scenes drawn washed out (v3)")
    p.add_argument("--small", type=float, default=0.0, help="share of big-subject scenes drawn small, off-centre (v3)")
    p.add_argument("--broken", type=float, default=0.0, help="share of sign images whose glyph has strokes missing (v4)")
    p.add_argument("--melted", type=float, default=0.0, help="share of one-object scenes whose object is a melted blob (v4)")
    p.add_argument("--ghost", type=float, default=0.0, help="share of one-object scenes whose object is washed almost "
                   "into the background (v4)")
    p.add_argument("--blurred", type=float, default=0.0, help="share of the scenes left crisp by the other modes that are "
                   "drawn out of focus (v4)")
    p.add_argument("--mix", default="", help="caption odds, e.g. 'ocr:0.55,geneval:0.1,geneval-task:0.2,deqa:0.075,"
                   "pickscore:0.075' (default: " + ",".join(f"{k}:{v}" for k, v in PRETRAIN_MIX.items()) + ")")
    p.add_argument("--geneval-mix", default="", help="odds of the GenEval caption categories, e.g. 'position:3,colour_attr:3' "
                   "(unlisted: 1; default: all equal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=CHECKPOINT)
    p.add_argument("--init", default=None, help="continue from this checkpoint's weights (fresh optimizer)")
    p.add_argument("--autoencoder", default=None, help="learn this frozen autoencoder's latents (vae.* tensors, "
                   "bench/pilot_autoencoder.py) instead of the pixel-unshuffle's")
    p.add_argument("--threads", type=int, default=2, help="torch threads; 1 on a machine shared with other jobs "
                   "(2 threads competing with another process for 2 cores run ~30x slower)")
    p.add_argument("--lr", type=float, default=LR, help="AdamW peak learning rate")
    p.add_argument("--cooldown", action="store_true", help="decay the learning rate linearly to 0 over the run "
                   "(for a last run continued with --init)")
    p = sub.add_parser("calibrate", help="reward table + base scores + sample grids")
    p.add_argument("--n", type=int, default=64, help="prompts per task")
    p.add_argument("--base", default=CHECKPOINT, help="the base to calibrate (another than the shipped one: no grids written)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="the prompts (a gate reads train: "
                   "the test prompts make the final tables only)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS_EVAL)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--shift", type=float, default=SHIFT)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.cmd == "prompts":
        write_prompt_files(args.seed)
    elif args.cmd == "pretrain":
        for name in ("caption_noise", "quality_noise", "omission_noise") + MODE_FLAGS:
            if not 0 <= getattr(args, name) <= 1:
                raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)} must be a share in [0, 1]")
        for group in MODE_DRAWS:
            if sum(getattr(args, a) for a in group) > 1:
                raise SystemExit("error: " + " and ".join(f"--{a} {getattr(args, a)}" for a in group)
                                 + " share one draw: their sum must be <= 1")
        pretrain(args.minutes, args.seed, args.out, args.threads, args.init, args.lr, args.cooldown, args.steps,
                 args.caption_noise, args.quality_noise, args.autoencoder, parse_geneval_mix(args.geneval_mix), args.omission_noise,
                 parse_mix(args.mix), {m: getattr(args, m) for m in MODE_FLAGS})
    else:
        calibrate(args.n, args.steps, args.guidance, args.shift, args.threads, args.split, args.base, os.path.abspath(args.base) == CHECKPOINT)
