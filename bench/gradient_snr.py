"""
bench/gradient_snr.py: how much of one Flow-GRPO batch gradient is signal? A benchmark that explains which
tiny-world experts can learn in CPU minutes and which cannot.

Flow-GRPO's gradient is a score-function estimate: at the first inner step (ratio 1) it is
    g = -(1/N) sum_i A_i grad log pi(x_{t-dt}^i | x_t^i),   grad log pi = (eps_i / std) d mean / d theta / D,
each image's D-dimensional exploration noise eps_i projected on the parameters and weighted by its
advantage. Only the part of eps that the reward responds to, in a direction the network can take
for every prompt, is signal; the rest is noise that averages out as 1/N. Two independent batches
therefore have gradients whose cosine is about signal^2 / (signal^2 + noise^2) of one batch:
    cos ~ 0      the batch gradient is noise (Adam then takes random-walk steps)
    cos = c > 0  the signal equals the noise for about B (1 - c) / c images (B = images per batch)
This script draws K batches exactly as grpo_expert.py samples them (same prompts, SDE window, shared
initial noise, group-normalised advantages) on a fresh LoRA, and prints per task: the mean reward
and the mean best reward of a group (what the group offers to learn from), the mean cosine between
batch gradients (with its standard error), the same for a CONTROL that shuffles the
advantages inside each group (no link between noise and reward: its expected cosine is 0), the
cosine between the mean gradients of the two halves of the K batches, and the images needed for a
gradient whose signal equals its noise. Measured numbers and the reading: docs/NOTES.md, "Why the GenEval
and OCR experts do not learn here".

Commands
  tiny world, CPU (about 40 s per task):   python bench/gradient_snr.py
  one task, more batches:                  python bench/gradient_snr.py --tasks ocr --batches 32
  the same 8 prompts in every batch:       python bench/gradient_snr.py --tasks geneval --fixed-prompts --batches 24
  the notes' two tables:                  python bench/gradient_snr.py --batches 32 [--window-start 0]
  SD3.5-M, one GPU:                        python bench/gradient_snr.py --world <sd3.5m folder> --tasks ocr,pickscore
"""

import math
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: bench/ sits above nothing
import rewards  # noqa: E402
import runs  # noqa: E402
import sde  # noqa: E402
import worlds  # noqa: E402

# -----------------------------------------------------------------------------
# Settings (as grpo_expert.py's; None = the world's default)

SETTINGS = dict(
    world=("tiny", "'tiny', or the folder / hub id of a Stable Diffusion 3.5 pipeline"),
    tasks=("deqa,pickscore,geneval,ocr", "tasks to measure, one fresh LoRA each"),
    batches=(16, "K: independent batches per task (K (K - 1) / 2 gradient pairs)"),
    prompts_per_batch=(8, "prompts per batch (grpo_expert.py's --prompts-per-epoch)"),
    group_size=(8, "G: images per prompt"),
    steps=(None, int, "T: SDE steps per trajectory (default: the world's, 10)"),
    timestep_fraction=(0.99, "without a window: the first floor(T * fraction) steps are trained"),
    guidance_scale=(None, float, "CFG scale (default: the world's)"),
    noise_level=(None, float, "SDE noise a (default: the world's)"),
    sde_window=(None, int, "SDE window length, its start drawn per batch (default: the world's; 0 = every step)"),
    window_start=(None, int, "fix the window's first step (default: drawn per batch in the first half, as grpo_expert.py draws it per epoch)"),
    same_latent=(True, "a prompt's G images share their initial noise (reproduce.sh's experts do)"),
    fixed_prompts=(False, "every batch draws epoch 0's prompts (fresh noise each batch): a cosine above the one without "
                          "means that the signal differs from prompt to prompt; the same cosine, that the noise drowns it"),
    lora_rank=(32, "LoRA rank r"),
    lora_alpha=(64, "LoRA alpha"),
    threads=(0, "CPU threads (0 = all cores)"),
    seed=(0, "seed of prompts and noise (batch k uses grpo_expert.py's epoch-k draws)"),
    out=("", "also write the table as JSON to this file ('' = print only)"),
)
cfg = runs.parse_settings(__doc__, SETTINGS)

# -----------------------------------------------------------------------------
# Set-up

dist = runs.setup_distributed()
if dist.world_size > 1:
    raise SystemExit("error: gradient_snr.py runs in one process (it measures one batch's gradient); run it without torchrun")
if dist.device.type == "cpu":
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
world = worlds.load_world(cfg.world, dist.device)
transformer = world.transformer
steps = cfg.steps or world.defaults["train_steps"]
guidance = world.defaults["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
noise_level = world.defaults["noise_level"] if cfg.noise_level is None else cfg.noise_level
window = world.defaults["sde_window"] if cfg.sde_window is None else cfg.sde_window
tasks = [t for t in cfg.tasks.split(",") if t]
for t in tasks:
    if t not in world.tasks:
        raise SystemExit(f"error: --tasks name {t!r} is not a task of the {world.kind} world {world.tasks}")
try:  # the window's settings, checked before anything runs
    sde.sde_window_steps(steps, window, cfg.seed, 0, cfg.window_start)
except ValueError as e:
    raise SystemExit(f"error: --sde-window {window} / --window-start {cfg.window_start}: {e}") from None
if cfg.batches < 4:
    raise SystemExit(f"error: --batches {cfg.batches} is too few for a standard error; use 4 or more")
P, G = cfg.prompts_per_batch, cfg.group_size
B = P * G
groups = torch.arange(B) // G
where = "a step drawn per batch" if cfg.window_start is None else f"step {cfg.window_start}"
print(f"world {world.name} | {cfg.batches} batches of {P} {'fixed ' if cfg.fixed_prompts else ''}prompts x G={G} = {B} images per task | T={steps}, "
      f"{f'SDE window of {window} steps starting at {where}' if window else 'every step stochastic'}, a={noise_level}, CFG {guidance}")


def batch_gradients(task, k, params):
    """One batch of grpo_expert.py's epoch k for `task`: its policy gradient at ratio 1, and the same with
    the advantages shuffled inside each group (the control) as flat float32 vectors, and the rewards (P, G)."""
    chosen = worlds.draw_prompts(train_prompts, {task: 1.0}, P, cfg.seed, 0 if cfg.fixed_prompts else k)  # grpo_expert.py's epoch-k prompts
    prompts = [chosen[i // G][1] for i in range(B)]
    metadata = [chosen[i // G][2] for i in range(B)]
    seeds, init_seeds = sde.epoch_seeds(cfg.seed, k, range(B), G, cfg.same_latent)  # grpo_expert.py's epoch-k noise
    sde_steps = sde.sde_window_steps(steps, window, cfg.seed, k, cfg.window_start)  # grpo_expert.py's epoch-k window (all steps if 0)
    trained = sde_steps if window else list(range(int(math.floor(steps * cfg.timestep_fraction))))
    traj = sde.sample(world, prompts, steps, guidance, noise_level, seeds=seeds, sde_steps=sde_steps, init_seeds=init_seeds)
    reward = reward_fn(traj["images"], prompts, metadata)
    advantages, _ = sde.group_advantages(reward, groups)
    shuffle = torch.Generator().manual_seed(sde.sample_seed(cfg.seed, k, -7))
    control = advantages.view(P, G)[:, torch.randperm(G, generator=shuffle)].reshape(B)  # same values, no link to the noise
    sigmas, latents = traj["sigmas"], traj["latents"]
    log_probs = []
    for j in trained:  # recompute log pi of the sampled actions with gradients (grpo_expert.py's step 4)
        v = sde.predict_velocity(world, latents[:, j], sigmas[j].item(), traj["embeds"], traj["pooled"], guidance)
        _, lp, _, _ = sde.sde_step_with_logprob(v, sigmas[j].item(), sigmas[j + 1].item(), latents[:, j], noise_level,
                                                prev_sample=latents[:, j + 1])
        log_probs.append(lp)
    log_probs = torch.stack(log_probs, 1)  # (B, trained steps)
    out = []
    for adv in (advantages, control):
        loss, _ = sde.clipped_surrogate(log_probs, log_probs.detach(), adv[:, None], clip_range=1.0)  # ratio 1: REINFORCE
        grads = torch.autograd.grad(loss.mean(), list(params.values()), retain_graph=adv is advantages)
        out.append(torch.cat([g.flatten() for g in grads]).float())
    return out + [reward.view(P, G)]


def cosine_stats(grads):
    """Mean pairwise cosine with its jackknife standard error (leave one batch out: the pairs share
    batches, so they are not independent), the cosine between the means of the two halves, and the
    number of batches used. A batch whose groups all lack reward spread has a zero gradient
    (grpo_expert.py skips it): it has no direction and is left out."""
    grads = [g for g in grads if g.norm() > 0]
    K = len(grads)
    if K < 4:
        raise SystemExit(f"error: only {K} batches had reward spread in a group; raise --batches or --group-size")
    g = torch.stack(grads)
    g = g / g.norm(dim=1, keepdim=True)
    cos = (g @ g.T).double()
    off = cos.sum() - cos.diagonal().sum()  # twice the sum over pairs
    mean = off / (K * (K - 1))
    leave_out = (off - 2 * (cos.sum(1) - 1)) / ((K - 1) * (K - 2))  # mean pairwise cosine without batch k
    se = math.sqrt((K - 1) / K * ((leave_out - leave_out.mean()) ** 2).sum().item())
    half = torch.nn.functional.cosine_similarity(torch.stack(grads[: K // 2]).mean(0), torch.stack(grads[K // 2:]).mean(0), dim=0)
    return mean.item(), se, half.item(), K


# -----------------------------------------------------------------------------
# Measure every task on a fresh LoRA (B = 0: the base policy, where an expert's training starts)

rows = []
for task in tasks:
    train_prompts = {task: worlds.read_prompts(worlds.prompt_file(world, task, "train"))}
    reward_fn = rewards.get_reward(task, world.kind)
    worlds.add_lora(transformer, task, cfg.lora_rank, cfg.lora_alpha)  # same seed for every task: same A
    params = worlds.lora_parameters(transformer, task)
    for p in params.values():
        p.requires_grad_(True)
    real, ctrl, scores = [], [], []
    for k in tqdm(range(cfg.batches), desc=task, leave=False):
        g, c, r = batch_gradients(task, k, params)
        real.append(g)
        ctrl.append(c)
        scores.append(r)
    scores = torch.cat(scores)  # (K * P, G): what a group offers to learn from
    reward_mean, best_of_g = scores.mean().item(), scores.max(1).values.mean().item()
    transformer.delete_adapters(task)
    cos, se, half, used = cosine_stats(real)
    ccos, cse, _, _ = cosine_stats(ctrl)
    # signal^2 / noise^2 of one batch is c / (1 - c) and grows linearly with the images averaged, so the
    # signal equals the noise after B (1 - c) / c images; with c within 2 se of 0 only a lower bound is known
    measurable = cos > 2 * se
    c = cos if measurable else cos + 2 * se
    needed = B * (1 - c) / c if c > 0 else float("inf")
    rows.append(dict(task=task, reward=reward_mean, best_of_group=best_of_g, batches=used, cos=cos, se=se,
                     control_cos=ccos, control_se=cse, halves_cos=half, images_for_snr_1=needed, measurable=bool(measurable)))
    print(f"{task:10s} reward {reward_mean:.3f} (best of {G} {best_of_g:.3f}) | cos {cos:+.4f} +- {se:.4f} | "
          f"control {ccos:+.4f} +- {cse:.4f} | halves ({used // 2 * B} images each) {half:+.3f} | "
          f"images for signal = noise: {'' if measurable else '> '}{needed:,.0f}", flush=True)

# -----------------------------------------------------------------------------
# Table

print(f"\n| task | reward (best of the group's {G}) | cosine between {B}-image batch gradients | control (advantages shuffled in each group) | "
      f"cosine between the mean gradients of two halves | images for signal = noise |")
print("|---|---|---|---|---|---|")
for r in rows:
    needed = f"{'' if r['measurable'] else '> '}{r['images_for_snr_1']:,.0f}"
    print(f"| {r['task']} | {r['reward']:.3f} ({r['best_of_group']:.3f}) | {r['cos']:+.4f} +- {r['se']:.4f} | "
          f"{r['control_cos']:+.4f} +- {r['control_se']:.4f} | {r['halves_cos']:+.3f} ({r['batches'] // 2 * B} images each) | {needed} |")
if cfg.out:
    runs.write_json(cfg.out, dict(settings=vars(cfg), rows=rows))
