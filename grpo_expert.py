"""
grpo_expert.py: Stage 1 of Flow-OPD. Train one expert per task with Flow-GRPO (or, with several
weighted tasks, the GRPO-Mix baseline the paper beats).

Flow-GRPO in one paragraph: turn the flow ODE into an SDE so that every denoising step is a Gaussian
policy with a log-probability (sde.py, section 2); sample G images per prompt; score each with a scalar
reward; normalise rewards within each prompt's group into advantages; raise the log-probability of
the steps of better-than-average images with PPO's clipped ratio loss, kept near the base model by a
KL penalty.

Several tasks (--task geneval:3,ocr:1,pickscore:1) train GRPO-Mix. By default (--mix epochs, the paper's
appendix) whole epochs alternate in the weights' ratio, each on its task's prompts and reward; --mix prompts
draws each prompt's task, advantages normalised task by task. --reward adds weighted reward terms to every
sample's reward (GRPO-Mix's DeQA 1:1); with --prompts the task rewards go and --reward alone is the reward,
which is how the paper's DeQA teacher trains: --prompts geneval,ocr,pickscore --reward deqa:0.4,pickscore:0.6.

Commands
  tiny world, CPU (minutes):   python grpo_expert.py --task ocr
  GRPO-Mix on the tiny world:  python grpo_expert.py --task geneval:3,ocr:1,pickscore:1 --reward deqa:1 --lr 1e-4
  SD3.5-M, one GPU:            python grpo_expert.py --world stabilityai/stable-diffusion-3.5-medium --task ocr
  one node, 8 GPUs:            torchrun --nproc_per_node 8 grpo_expert.py --world <sd3.5m folder> --task ocr
  4 nodes x 8 GPUs:            torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \
                                 --rdzv_endpoint $HEAD:29500 grpo_expert.py --world <sd3.5m folder> --task geneval
  the DeQA teacher:            python grpo_expert.py --world <sd3.5m> --prompts geneval,ocr,pickscore \
                                 --reward deqa:0.4,pickscore:0.6
  (the paper's settings for SD3.5-M: docs/SD3.md)

Outputs in --out: adapter.safetensors (the EMA LoRA, diffusers-loadable), config.json, log.jsonl,
samples_XXXX.png, checkpoints/ (exact resume: rerun the same command).

Flow-GRPO-Fast: --sde-window K makes only K consecutive steps stochastic (the window starts at a step
drawn per epoch in the first half) and trains only those; the tiny world uses K = 2 (its pixels keep the
late steps' noise: docs/DEPARTURES.md), SD3.5-M every step (K = 0), as the paper. --same-latent starts a
prompt's G images from one initial noise, so that a group differs only by the SDE steps' noise
(reproduce.sh uses it on the tiny world). The tiny-world pilots on the window are in docs/NOTES.md.
"""

import contextlib
import copy
import dataclasses
import math
import os

import torch
from tqdm import tqdm

import rewards
import runs
import sde
import worlds

# -----------------------------------------------------------------------------
# Settings. None means "the world's default" (worlds.World.defaults; the paper's values on SD3.5-M).

SETTINGS = dict(
    world=("tiny", "'tiny', or the folder / hub id of a Stable Diffusion 3.5 pipeline"),
    task=("geneval", "the task to reward, or a weighted mix 'geneval:3,ocr:1,pickscore:1' (GRPO-Mix; see --mix)"),
    reward=("", "extra reward terms added to every sample's task reward, e.g. 'deqa:1' (GRPO-Mix's DeQA 1:1)"),
    mix=("epochs", "several tasks: 'epochs' alternates whole epochs in the weights' ratio; 'prompts' mixes each batch"),
    prompts=("", "train on these tasks' prompts with the --reward mix alone as the reward (the DeQA teacher)"),
    out=(None, str, "output folder (default results/<world>/runs/grpo-<task>)"),
    init=("", "start from this LoRA file instead of a fresh adapter"),
    epochs=(60, "epochs; one epoch = sample, score, update"),
    prompts_per_epoch=(None, int, "distinct prompts per epoch, over all ranks (default: the world's; 48 on SD3)"),
    group_size=(None, int, "G: images per prompt, the group of the advantage baseline (default: the world's)"),
    sample_batch=(None, int, "images per sampling forward, per rank (default: the world's)"),
    train_batch=(None, int, "images per training forward, per rank (default: the world's)"),
    steps=(None, int, "T: SDE steps per trajectory (default: the world's, 10)"),
    timestep_fraction=(0.99, "train the first floor(T * fraction) steps (0.99 -> 9 of 10, Flow-GRPO)"),
    guidance_scale=(None, float, "CFG scale for sampling and training (default: the world's; 4.5 on SD3)"),
    noise_level=(None, float, "a in s_t = a sqrt(t / (1 - t)): the SDE's exploration noise (default: the world's)"),
    sde_window=(None, int, "Flow-GRPO-Fast: SDE steps, and trained, only in a window of this many (0 = all)"),
    same_latent=(False, "the G images of a prompt start from one shared initial noise x_1 (Flow-GRPO's same_latent)"),
    std_scope=("global", "advantage std over the whole batch ('global', Flow-GRPO) or per prompt ('group')"),
    adv_clip=(5.0, "advantages are clipped to +-adv_clip"),
    clip_range=(1e-4, "PPO clip range eps (Flow-GRPO's, small because log-probs are per-dimension means)"),
    beta=(None, float, "weight of the KL to the base model (default per task: 0.04 GenEval/OCR, 0.01 PickScore/DeQA)"),
    kl_dt_factor=(True, "multiply the KL by |dt|, as Flow-GRPO's code does (its betas assume it); off = exact KL"),
    lr=(3e-4, "AdamW learning rate (Flow-GRPO: 3e-4 single task, 1e-4 in the mix configs)"),
    weight_decay=(1e-4, "AdamW weight decay"),
    grad_clip=(1.0, "gradient-norm clip"),
    updates_per_epoch=(2, "optimizer steps per epoch (the epoch's samples are split into this many mini-batches)"),
    inner_epochs=(1, "passes over each epoch's samples"),
    lora_rank=(32, "LoRA rank r"),
    lora_alpha=(64, "LoRA alpha (scale alpha / r)"),
    full_finetune=(False, "train every transformer weight instead of a LoRA (reference = a frozen copy)"),
    ema_decay=(0.9, "EMA decay of the saved weights, after Flow-GRPO's warm-up min((1 + s) / (10 + s), decay)"),
    ema_every=(8, "EMA update interval in optimizer steps (Flow-GRPO: 8)"),
    threads=(0, "CPU threads per process (0 = OMP_NUM_THREADS if set, else the cores shared between local ranks)"),
    gradient_checkpointing=(False, "recompute block activations in the backward pass: less memory, same gradients"),
    seed=(0, "seed of prompt draws and sampling noise (per sample: seed, epoch, index)"),
    save_every=(10, "checkpoint every N epochs (and at the end)"),
    grid_every=(10, "sample-grid PNG every N epochs (0 = never)"),
    resume=(True, "continue from the latest checkpoint in --out if there is one"),
    tracker=("", "also log every record to 'tensorboard' or 'wandb' (master only); '' = log.jsonl only"),
)
cfg = runs.parse_settings(__doc__, SETTINGS)

# -----------------------------------------------------------------------------
# Set-up: distributed, world, the policy (a LoRA on the frozen base), its reference, the rewards

dist = runs.setup_distributed()
if dist.device.type == "cpu":  # share the cores between local ranks
    runs.set_threads(cfg.threads, dist)
world = worlds.load_world(cfg.world, dist.device)
steps = cfg.steps or world.defaults["train_steps"]
guidance = world.defaults["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
cfg.noise_level = world.defaults["noise_level"] if cfg.noise_level is None else cfg.noise_level
cfg.sde_window = world.defaults["sde_window"] if cfg.sde_window is None else cfg.sde_window
for name in ("prompts_per_epoch", "group_size", "sample_batch", "train_batch"):  # the world's batch unless given
    setattr(cfg, name, world.defaults[name] if getattr(cfg, name) is None else getattr(cfg, name))
# trained timestep indices: the first n_trained (Flow-GRPO), or the epoch's SDE window (sde.sde_window_steps)
n_trained = int(math.floor(steps * cfg.timestep_fraction))
try:  # a window has the same length every epoch: epoch 0's tells whether it fits
    sde.sde_window_steps(steps, cfg.sde_window, cfg.seed, 0)
except ValueError as e:
    raise SystemExit(f"error: --sde-window {cfg.sde_window}: {e}") from None
# task_weights: whose prompts an epoch draws (and, without --prompts, whose reward each sample gets)
task_weights = rewards.parse_weights(cfg.prompts or cfg.task)
extra_weights = rewards.parse_weights(cfg.reward) if cfg.reward else {}
for name in list(task_weights) + list(extra_weights):
    if name not in world.tasks:
        raise SystemExit(f"error: --task/--prompts/--reward name {name!r} is not a task of the {world.kind} world "
                         f"{world.tasks}")
if cfg.prompts and not extra_weights:
    raise SystemExit(f"error: --prompts {cfg.prompts} trains on the --reward mix alone, and --reward is empty "
                     f"(e.g. --reward deqa:0.4,pickscore:0.6)")
if cfg.mix not in ("epochs", "prompts"):
    raise SystemExit(f"error: --mix must be 'epochs' or 'prompts', got {cfg.mix!r}")
mixed = len(task_weights) > 1
cycle = [t for t, w in task_weights.items() for _ in range(int(w))]  # --mix epochs: epoch e trains task cycle[e % len]
if mixed and cfg.mix == "epochs" and any(w != int(w) for w in task_weights.values()):
    raise SystemExit(f"error: --mix epochs alternates whole epochs: the weights of {cfg.prompts or cfg.task!r} must "
                     f"be whole numbers (3:1:1)")
tag = "+".join(extra_weights) if cfg.prompts else "mix" if mixed else next(iter(task_weights))
out = cfg.out or os.path.join(runs.HERE, "results", world.kind, "runs", f"grpo-{tag}")
DEFAULT_BETA = {"geneval": 0.04, "ocr": 0.04, "pickscore": 0.01, "deqa": 0.01}
MIX_BETA = 0.04  # Flow-GRPO's official mix config
beta = cfg.beta if cfg.beta is not None else (min(DEFAULT_BETA[t] for t in extra_weights) if cfg.prompts else
                                              MIX_BETA if mixed else DEFAULT_BETA[next(iter(task_weights))])

N = cfg.prompts_per_epoch * cfg.group_size  # images per epoch, all ranks
first, n_local = runs.shard(N, dist)  # this rank holds global samples [first, first + n_local)

transformer = world.transformer
if cfg.full_finetune:
    reference_world = dataclasses.replace(world, transformer=copy.deepcopy(transformer))  # the frozen base, for the KL
    if world.dtype != torch.float32:  # float32 master weights: bf16 weights and AdamW states lose small updates
        transformer.float()
        world = dataclasses.replace(world, dtype=torch.float32)
    transformer.requires_grad_(True)
    params = dict(transformer.named_parameters())
else:
    reference_world = None  # the base is the same module with the adapter disabled: no second copy
    if cfg.init:  # either way the LoRA trains in float32 even when the base is bf16 (worlds.py makes it so)
        worlds.load_lora(transformer, cfg.init, "policy", trainable=True)
        transformer.set_adapter("policy")
    else:
        worlds.add_lora(transformer, "policy", cfg.lora_rank, cfg.lora_alpha)
    params = worlds.lora_parameters(transformer, "policy")
param_list = list(params.values())
optimizer = torch.optim.AdamW(param_list, lr=cfg.lr, weight_decay=cfg.weight_decay)
ema = {k: p.detach().clone().float() for k, p in params.items()}

# every reward model on this rank's device (PickScore's CLIP-H on the GPU, as Flow-GRPO scores)
task_reward = {} if cfg.prompts else {t: rewards.get_reward(t, world.kind, dist.device) for t in task_weights}
extra_reward = rewards.combined_reward(cfg.reward, world.kind, dist.device) if extra_weights else None
runs.agree(dist, rewards.load_scorers, *task_reward.values(), extra_reward)  # on this thread, before the loop


def sample_reward(task):
    """The reward of a sample of `task`'s prompts: its task reward (none with --prompts) + the weighted extras.
    Rewards come as float32 (B,) CPU tensors."""
    def reward(images, prompts, metadata):
        total = task_reward[task](images, prompts, metadata) if task in task_reward else torch.zeros(len(images))
        if extra_reward is not None:
            total = total + extra_reward(images, prompts, metadata)[0]
        return total
    return reward


scorer = rewards.BatchScorer({t: sample_reward(t) for t in task_weights})  # scores batch k while batch k+1 samples
train_files = {t: worlds.prompt_file(world, t, "train") for t in task_weights}
train_prompts = {t: worlds.read_prompts(path) for t, path in train_files.items()}
worlds.encode_once(world, [p for prompts, _ in train_prompts.values() for p in prompts],
                   os.path.join(runs.HERE, "results", world.kind, "prompt_cache"))  # SD3: then frees the text encoders
if cfg.gradient_checkpointing:
    world.transformer.enable_gradient_checkpointing()

# What this run is (settings + input hashes): a checkpoint in --out is resumed only if it records the same.
identity = runs.run_identity(cfg, dict(base=world.source, init=cfg.init,
                                       **{f"prompts_{t}": path for t, path in train_files.items()}),
                             paths=("world", "init"))
if world.kind == "sd3" and "ocr" in {*task_weights, *extra_weights}:  # another OCR engine reads another reward
    identity["settings"]["ocr_engine"] = rewards.ocr_engine()
start_epoch, opt_step = (runs.load_train_state(out, params, ema, optimizer, identity, dist=dist) if cfg.resume
                         else (0, 0))

if dist.master:
    os.makedirs(out, exist_ok=True)
    runs.write_json(os.path.join(out, "config.json"),
                    dict(vars(cfg), steps=steps, guidance_scale=guidance, beta=beta, world_size=dist.world_size,
                         **{k: identity["settings"][k] for k in ("ocr_engine",) if k in identity["settings"]}))
    mix_note = f" | mix by {cfg.mix}" + (f": epochs cycle {cycle}" if cfg.mix == "epochs" else "") if mixed else ""
    print(f"world {world.name} ({world.kind}) on {dist.device} x {dist.world_size} | "
          f"{'prompts' if cfg.prompts else 'tasks'} {task_weights} extra {extra_weights}" + mix_note)
    print(f"{cfg.prompts_per_epoch} prompts x G={cfg.group_size} = {N} images/epoch, {n_local}/rank | T={steps}, "
          f"trained steps {f'a window of {cfg.sde_window}' if cfg.sde_window else list(range(n_trained))} | "
          f"{cfg.updates_per_epoch * cfg.inner_epochs} optimizer steps/epoch | "
          f"{sum(p.numel() for p in param_list):,} trainable params | beta {beta} | out {out}")

track = runs.open_tracker(cfg.tracker, out, vars(cfg), dist)
if start_epoch and dist.master:
    print(f"resumed from {out} at epoch {start_epoch}")


def kl_to_reference(v, x_t, sigma, sigma_next, embeds, pooled, kl_scale):
    """KL(pi_theta || pi_ref) of one step in closed form (sde.velocity_kl), per sample, times kl_scale. The
    reference is the base model: the LoRA disabled, or the frozen copy when fully fine-tuning."""
    base = worlds.adapter(transformer, None) if reference_world is None else contextlib.nullcontext()
    with torch.no_grad(), base:
        v_ref = sde.predict_velocity(reference_world or world, x_t, sigma, embeds, pooled, guidance)
    return kl_scale * sde.velocity_kl(v, v_ref, sigma, sigma_next, cfg.noise_level)


def save_outputs(epoch, opt_step):
    """The EMA adapter that later stages use, then the exact-resume checkpoint, each written atomically
    (master only). The checkpoint goes last: a run killed between the two resumes from the previous
    checkpoint and writes both again, where the other order could leave a finished run's adapter stale."""
    if not dist.master:
        return
    if cfg.full_finetune:
        runs.save_tensors(os.path.join(out, "transformer.safetensors"), {k: v for k, v in ema.items()})
    else:
        worlds.save_lora(transformer, "policy", os.path.join(out, "adapter.safetensors"), state_dict=ema)
    runs.save_train_state(out, epoch, params, ema, optimizer, opt_step, identity)


# -----------------------------------------------------------------------------
# Training loop

for epoch in tqdm(range(start_epoch, cfg.epochs), desc="grpo", disable=not dist.master, initial=start_epoch,
                  total=cfg.epochs):
    timer = runs.Timer()
    # this epoch's task(s)
    epoch_weights = {cycle[epoch % len(cycle)]: 1.0} if mixed and cfg.mix == "epochs" else task_weights
    chosen = worlds.draw_prompts(train_prompts, epoch_weights, cfg.prompts_per_epoch, cfg.seed, epoch)
    index = torch.arange(first, first + n_local)  # global sample indices held by this rank
    tasks = [chosen[i // cfg.group_size][0] for i in index.tolist()]
    prompts = [chosen[i // cfg.group_size][1] for i in index.tolist()]
    metadata = [chosen[i // cfg.group_size][2] for i in index.tolist()]
    # per-sample seeding (--same-latent: one initial noise per group)
    seeds, init_seeds = sde.epoch_seeds(cfg.seed, epoch, index.tolist(), cfg.group_size, cfg.same_latent)
    sde_steps = sde.sde_window_steps(steps, cfg.sde_window, cfg.seed, epoch)  # all unless windowed
    train_steps = sde_steps if cfg.sde_window else list(range(n_trained))

    # 1. On-policy sampling: G SDE trajectories per prompt, with their per-step log-probs; each decoded batch
    #    is handed to the scorer's thread at once, so scoring overlaps the sampling of the next batch
    transformer.eval()
    score_batch = lambda b, batch_images: scorer.submit(  # noqa: E731
        batch_images, prompts[b: b + len(batch_images)], metadata[b: b + len(batch_images)],
        tasks[b: b + len(batch_images)])
    with timer("sampling"):
        traj = sde.sample(world, prompts, steps, guidance, cfg.noise_level, seeds=seeds, batch_size=cfg.sample_batch,
                          sde_steps=sde_steps, init_seeds=init_seeds, on_batch=score_batch)
        latents, old_log_probs = traj["latents"], traj["log_probs"]  # (n_local, T+1, C, h, w), (n_local, T)
        embeds, pooled, sigmas = traj["embeds"], traj["pooled"], traj["sigmas"]
        images = traj["images"]  # (n_local, 3, H, W) in [0, 1]

    # 2. Scalar rewards: the prompt's task reward (+ the extra weighted terms); what is left of the scoring
    with timer("reward"):
        reward = runs.agree(dist, scorer.result)  # (n_local,); a reward that failed on one rank stops every rank
        # every rank needs every reward: a group's images may live on several ranks
        all_reward = runs.gather_cat(reward.to(dist.device), dist).cpu()
        all_task = runs.gather_cat(torch.tensor([list(task_weights).index(t) for t in tasks], device=dist.device),
                                   dist).cpu()
        per_task = {f"reward_{t}": all_reward[all_task == k].mean().item()
                    for k, t in enumerate(task_weights) if (all_task == k).any()}
        runs.assert_finite(all_reward, "a reward", f"grpo_expert.py epoch {epoch + 1}",
                           label=lambda i: f"task {chosen[i // cfg.group_size][0]}, "
                                           f"prompt {chosen[i // cfg.group_size][1]!r}")

    # 3. Group-normalised advantages (Flow-GRPO eq. 7): A = (r - mean_group) / (std + 1e-4), clipped
    #    A prompt-mixed batch is normalised task by task: one std over rewards of different scales (PickScore/26
    #    spreads ~10x less than GenEval) would shrink the small-scale task's advantages.
    groups = torch.arange(N) // cfg.group_size
    advantages, keep = torch.zeros(N), torch.zeros(N, dtype=torch.bool)
    for k in all_task.unique():
        rows = all_task == k
        advantages[rows], keep[rows] = sde.group_advantages(all_reward[rows], groups[rows], cfg.std_scope,
                                                            clip=cfg.adv_clip)
    kept = keep.nonzero().squeeze(1)  # global indices of samples in groups with reward spread

    # Flow-GRPO's code scales the KL by |dt| (its betas assume it; docs/DEPARTURES.md): --kl-dt-factor, on by default
    kl_scale = {j: (sigmas[j] - sigmas[j + 1]).item() if cfg.kl_dt_factor else 1.0 for j in train_steps}

    # 4. Policy update: PPO-clipped ratio loss on every trained step + beta * KL to the base (eq. 8)
    transformer.train()
    stats = dict(loss=[], policy=[], kl=[], ratio=[], clipfrac=[])  # detached tensors: read once
    with timer("training"):
        for inner in range(cfg.inner_epochs):
            chunks = runs.optimizer_chunks(kept, cfg.updates_per_epoch, sde.sample_seed(cfg.seed, epoch, -1 - inner))
            for chunk in (chunks if len(kept) else []):  # each rank's share of a chunk is within one sample of equal
                optimizer.zero_grad(set_to_none=True)
                # the step's summed loss, for the divergence guard (no sync until it is read): every rank decides
                # on the sum over ranks, so that a non-finite loss on one rank stops every rank at the same step
                step_loss = torch.zeros((), device=dist.device)
                # global count: every rank divides by it, so the summed gradient is the global mean
                n_chunk = len(chunk)
                mine = chunk[(chunk >= first) & (chunk < first + n_local)] - first  # this rank's share, local indices
                for mb in mine.split(cfg.train_batch) if len(mine) else []:  # a rank may hold none of this chunk
                    adv = advantages[mb + first].to(dist.device)
                    for j in train_steps:  # step j: x_t = latents[:, j] -> x_{t-dt} = latents[:, j + 1]
                        x_t, s, s_next = latents[mb, j], sigmas[j].item(), sigmas[j + 1].item()
                        v = sde.predict_velocity(world, x_t, s, embeds[mb], pooled[mb], guidance)
                        _, log_prob, _, _ = sde.sde_step_with_logprob(v, s, s_next, x_t, cfg.noise_level,
                                                                      prev_sample=latents[mb, j + 1])
                        policy_loss, ratio = sde.clipped_surrogate(log_prob, old_log_probs[mb, j], adv, cfg.clip_range)
                        kl = (kl_to_reference(v, x_t, s, s_next, embeds[mb], pooled[mb], kl_scale[j]) if beta > 0
                              else torch.zeros_like(policy_loss))
                        loss = policy_loss + beta * kl
                        (loss.sum() / (n_chunk * len(train_steps))).backward()
                        step_loss += loss.detach().sum()
                        stats["loss"].append(loss.detach().mean())
                        stats["policy"].append(policy_loss.detach().mean())
                        stats["kl"].append(kl.detach().mean())
                        stats["ratio"].append(ratio.detach())
                        stats["clipfrac"].append(((ratio.detach() - 1).abs() > cfg.clip_range).float().mean())
                    if "ratio_first" not in stats:  # on-policy check: before the first update the ratio is exactly 1
                        stats["ratio_first"] = torch.cat(stats["ratio"]).mean()
                step_loss = runs.all_reduce_sum(param_list, dist, step_loss)  # the loss summed over ranks, as the grads
                grad_norm = torch.nn.utils.clip_grad_norm_(param_list, cfg.grad_clip)
                where = f"grpo_expert.py epoch {epoch + 1} optimizer step {opt_step + 1}"
                runs.assert_finite(torch.stack([grad_norm.float(), step_loss.float()]), "the gradient norm or the loss",
                                   where, label=lambda i: ("it is the gradient norm", "it is the loss")[i])  # one sync
                optimizer.step()
                opt_step += 1
                if opt_step % cfg.ema_every == 0:
                    runs.ema_update(ema, params, cfg.ema_decay, step=opt_step)

    # 5. Log, grids, checkpoints
    if dist.master:
        mean = lambda k, empty=0.0: torch.stack(stats[k]).mean().item() if stats[k] else empty  # noqa: E731
        ratio = torch.cat(stats["ratio"]).cpu() if stats["ratio"] else torch.ones(1)
        record = dict(epoch=epoch + 1, reward=all_reward.mean().item(), **per_task, kept=len(kept) / N,
                      kl=mean("kl"), policy_loss=mean("policy"), clipfrac=mean("clipfrac"),
                      ratio_mean=ratio.mean().item(), ratio_min=ratio.min().item(), ratio_max=ratio.max().item(),
                      ratio_first=stats["ratio_first"].item() if "ratio_first" in stats else 1.0, opt_step=opt_step,
                      **{f"sec_{k}": v for k, v in timer.seconds.items()}, **runs.peak_memory(dist.device))
        runs.log_jsonl(os.path.join(out, "log.jsonl"), record, echo=False)
        track(record)
        tqdm.write(f"epoch {epoch + 1}: reward {record['reward']:.3f} "
                   + " ".join(f"{k} {v:.3f}" for k, v in per_task.items())
                   + f" | kl {record['kl']:.2e} clip {record['clipfrac']:.2f} ratio {record['ratio_mean']:.4f} | "
                   + " ".join(f"{k} {v:.1f}s" for k, v in timer.seconds.items()))
        if cfg.grid_every and (epoch + 1) % cfg.grid_every == 0:
            runs.save_grid(images[:16], os.path.join(out, f"samples_{epoch + 1:04d}.png"), nrow=8,
                           scale=max(1, 128 // images.shape[-1]))
    if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
        save_outputs(epoch + 1, opt_step)

runs.end_distributed(dist)
