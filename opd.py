"""
opd.py: Stage 2 of Flow-OPD, multi-teacher on-policy distillation with task routing and Manifold
Anchor Regularization (MAR).

The student samples its own SDE trajectories (on-policy); every prompt's task routes it to that task's
expert teacher; at every sampled state x_t the teacher's velocity is the target, and the reverse KL
between the student's and the teacher's Gaussian SDE steps is a time-weighted squared distance of
their velocities (sde.velocity_kl):
    KL_t = w(t) ||v_theta(x_t) - v_T(x_t)||^2,   w(t) = (|dt| / 2) (s_t (1 - t) / (2t) + 1 / s_t)^2
a dense, per-step, per-dimension signal instead of one scalar reward per image. MAR adds the same KL
toward a frozen task-agnostic teacher (the base model by default) on all data, weight lambda:
    L = L_distill + lambda * E[ w(t) ||v_theta - v_anchor||^2 ]

--opd-loss picks how the KL becomes a gradient (docs/DEPARTURES.md, "Which OPD loss"):
  direct     (default) minimise E[KL_t] over the student's own states, gradient through v_theta,
             states detached: the paper's earlier draft, and the gradient the official code follows
             (its advantage -KL is not detached).
  pg         the published form: r_t = -w(t) ||stopgrad(v_theta) - v_T||^2 as the advantage in PPO's
             clipped surrogate. r_t depends on the state x_t only, not on the sampled action, so its
             expected gradient is ZERO (tests/test_opd.py measures it). Kept to reproduce the paper as written.
  pg-sample  LLM on-policy distillation's estimator: r_t = -(log pi_theta(x_{t-dt}|x_t) - log pi_T(x_{t-dt}|x_t))
             on the SAMPLED action, in the clipped surrogate. Its expected gradient is grad KL / D (log-probs
             are per-dimension means, Flow-GRPO's convention): it needs a D-times larger learning rate.
The official code departs twice more, each a flag here, off by default (docs/DEPARTURES.md): its step KL
is weighted by |dt| w(t) (--kl-dt-factor), and it drops samples whose task-reward advantage is zero
(--skip-zero-advantage).

Teachers and the MAR anchor are LoRA adapters on ONE shared frozen base (peft multi-adapter, switched
by name); a full-weight teacher (a safetensors state dict of the transformer) is loaded as a copy;
the teacher 'base' (--teachers geneval=base,...) is the frozen base itself, adapters disabled. A sample
routed hard to the model that is also the MAR anchor reuses its teacher's velocities. The log's
forwards_* fields count the transformer rows per image of each phase (CFG counts 2).

Commands
  tiny world, CPU:     python opd.py --student results/tiny/runs/merge/adapter.safetensors
  (teachers default to the shipped tiny experts assets/tiny_experts/<task>.safetensors)
  SD3.5-M, 8 GPUs:     torchrun --nproc_per_node 8 opd.py --world <sd3.5m folder> --student merged.safetensors \
                         --teachers geneval=g.safetensors,ocr=o.safetensors,deqa=d.safetensors,pickscore=p.safetensors
  4 nodes x 8 GPUs:    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 opd.py ...
"""

import contextlib
import copy
import dataclasses
import json
import math
import os

import torch
from tqdm import tqdm

import rewards
import runs
import sde
import worlds

# -----------------------------------------------------------------------------
# Settings. None means "the world's default".

SETTINGS = dict(
    world=("tiny", "'tiny', or the folder / hub id of a Stable Diffusion 3.5 pipeline"),
    student=("", "cold-start LoRA of the student (merge.py / sft_init.py output); '' = a fresh LoRA on the base"),
    teachers=("", "task=file pairs 'geneval=a.safetensors,...' ('' = the tiny world's experts; 'base' = the base)"),
    task=("geneval:1,ocr:1,deqa:1,pickscore:1", "which tasks' training prompts to draw, with their odds"),
    routing=("", "soft routing as JSON {task: {teacher_task: alpha}}; unlisted tasks route hard to their own teacher"),
    opd_loss=("direct", "direct | pg | pg-sample (see the docstring)"),
    mar_weight=(0.02, "lambda of MAR (paper appendix 0.02; official configs 0.04; 0 = off)"),
    mar_teacher=("base", "the MAR anchor: 'base' (official default), a task name (its teacher), or a LoRA file"),
    out=(None, str, "output folder (default results/<world>/runs/opd)"),
    epochs=(40, "epochs; one epoch = student samples, teachers label, student updates"),
    prompts_per_epoch=(None, int, "distinct prompts per epoch, over all ranks (default: the world's; 48 on SD3)"),
    group_size=(None, int, "G: student trajectories per prompt (default: the world's; 24 on SD3, official OPD 16)"),
    sample_batch=(None, int, "images per sampling forward, per rank (default: the world's)"),
    train_batch=(None, int, "images per training forward, per rank (default: the world's)"),
    steps=(None, int, "T: SDE steps per trajectory (default: the world's, 10)"),
    timestep_fraction=(0.99, "distil the first floor(T * fraction) steps"),
    guidance_scale=(None, float, "CFG scale for student and teachers (default: the world's)"),
    noise_level=(None, float, "a in s_t = a sqrt(t / (1 - t)) (default: the world's; 0.7 on SD3)"),
    sde_window=(None, int, "SDE steps only in a window of this many (Flow-GRPO-Fast; 0 = all); pg trains only it"),
    clip_range=(1e-4, "pg / pg-sample: PPO clip range"),
    adv_clip=(5.0, "pg / pg-sample: rewards used as advantages are clamped to +-adv_clip (official: 5)"),
    kl_dt_factor=(False, "the official code's |dt| w(t) step weight of the KL and MAR (off = the exact KL w(t))"),
    skip_zero_advantage=(False, "the official code's filter: train only samples whose group's task rewards differ"),
    lr=(1e-4, "AdamW learning rate (official OPD config: 1e-4)"),
    weight_decay=(1e-4, "AdamW weight decay"),
    grad_clip=(1.0, "gradient-norm clip"),
    updates_per_epoch=(2, "optimizer steps per epoch"),
    inner_epochs=(1, "passes over each epoch's samples"),
    lora_rank=(32, "rank of a fresh student LoRA (ignored with --student)"),
    lora_alpha=(64, "alpha of a fresh student LoRA"),
    ema_decay=(0.9, "EMA decay of the student's weights (the EMA is saved)"),
    ema_every=(8, "EMA update interval in optimizer steps"),
    score=(True, "score the student's samples with the task rewards (logged only, never trained on)"),
    threads=(0, "CPU threads per process (0 = OMP_NUM_THREADS if set, else the cores shared between local ranks)"),
    gradient_checkpointing=(False, "recompute block activations in the backward pass: less memory, same gradients"),
    seed=(0, "seed of prompt draws and sampling noise"),
    save_every=(10, "checkpoint every N epochs (and at the end)"),
    grid_every=(10, "sample-grid PNG every N epochs (0 = never)"),
    resume=(True, "continue from the latest checkpoint in --out if there is one"),
    tracker=("", "also log every record to 'tensorboard' or 'wandb' (master only); '' = log.jsonl only"),
)
cfg = runs.parse_settings(__doc__, SETTINGS)
if cfg.opd_loss not in ("direct", "pg", "pg-sample"):
    raise SystemExit(f"error: --opd-loss must be direct, pg or pg-sample, got {cfg.opd_loss!r}")
if cfg.skip_zero_advantage and not cfg.score:
    raise SystemExit("error: --skip-zero-advantage needs the task rewards: drop --no-score")

# -----------------------------------------------------------------------------
# Set-up: distributed, world, teachers and anchor on the shared base, the student adapter

dist = runs.setup_distributed()
if dist.device.type == "cpu":  # share the cores between local ranks
    runs.set_threads(cfg.threads, dist)
world = worlds.load_world(cfg.world, dist.device)
transformer = world.transformer
steps = cfg.steps or world.defaults["train_steps"]
guidance = world.defaults["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
cfg.noise_level = world.defaults["noise_level"] if cfg.noise_level is None else cfg.noise_level
cfg.sde_window = world.defaults["sde_window"] if cfg.sde_window is None else cfg.sde_window
for name in ("prompts_per_epoch", "group_size", "sample_batch", "train_batch"):  # the world's batch unless given
    setattr(cfg, name, world.defaults[name] if getattr(cfg, name) is None else getattr(cfg, name))
first_steps = list(range(int(math.floor(steps * cfg.timestep_fraction))))  # distilled steps (per epoch: see the loop)
window_only = cfg.opd_loss != "direct" and bool(cfg.sde_window)  # pg / pg-sample distil the window's steps (actions)
task_weights = rewards.parse_weights(cfg.task)
out = cfg.out or os.path.join(runs.HERE, "results", world.kind, "runs", "opd")

teacher_files = worlds.parse_teachers(cfg.teachers, world)  # {task: LoRA file}

# Routing table alpha[task][teacher]: hard routing is alpha = 1 for the prompt's own task's teacher.
routing = {t: {t: 1.0} for t in task_weights}
routing.update(json.loads(cfg.routing) if cfg.routing else {})
for task, row in routing.items():
    missing = [k for k in row if k not in teacher_files]
    if task in task_weights and missing:
        raise SystemExit(f"error: prompts of task {task!r} route to {missing}, which have no teacher in --teachers "
                         f"{sorted(teacher_files)}")


def load_teacher(name, path):
    """A LoRA (file or PEFT folder: worlds.is_lora) becomes adapter `name` on the shared base (frozen); a full
    state dict becomes a copy of the transformer."""
    if worlds.is_lora(path):
        worlds.load_lora(transformer, path, name, trainable=False)
        return None  # switch to it with worlds.adapter(transformer, name)
    if not os.path.isfile(path):
        raise SystemExit(f"error: teacher file {path} does not exist")
    try:
        weights, _ = runs.load_tensors(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SystemExit(f"error: teacher {path} is not a readable safetensors file ({e})") from None
    full = copy.deepcopy(transformer)
    try:
        full.load_state_dict(weights)
    except RuntimeError as e:
        raise SystemExit(f"error: teacher {path} is neither a LoRA nor this world's transformer state dict "
                         f"({str(e).splitlines()[0]})")
    return dataclasses.replace(world, transformer=full)


# Full-weight teachers are copied from the bare base, before any adapter exists on it. A teacher named
# 'base' is the frozen base itself (adapter name None: adapters disabled).
teacher_copy = {}  # teacher name -> World with its own transformer (full-weight teachers only)
# what frozen_velocities switches to
teacher_adapter = {t: None if f == "base" else f"teacher_{t}" for t, f in teacher_files.items()}
used = sorted({k for t in task_weights for k in routing[t]})
# full-weight teachers first: a copy made after a LoRA is attached would carry peft's layers (strict load fails)
for t in sorted(used, key=lambda t: teacher_adapter[t] is None or worlds.is_lora(teacher_files[t])):
    if teacher_adapter[t] is not None:
        teacher_copy[t] = load_teacher(teacher_adapter[t], teacher_files[t])
if cfg.mar_teacher in ("base", ""):
    anchor = None  # adapters disabled = the frozen base
elif cfg.mar_teacher in teacher_files:
    anchor = teacher_adapter[cfg.mar_teacher]
    if anchor is not None and cfg.mar_teacher not in teacher_copy:
        teacher_copy[cfg.mar_teacher] = load_teacher(anchor, teacher_files[cfg.mar_teacher])
else:
    anchor = "anchor"
    teacher_copy["anchor"] = load_teacher(anchor, cfg.mar_teacher)

# A task routed hard to the very model that is the anchor: its MAR targets are its distillation targets.
routed_to_anchor = {t: list(row.values()) == [1.0] and teacher_adapter[next(iter(row))] == anchor
                    for t, row in routing.items() if t in task_weights}

if cfg.student:
    worlds.load_lora(transformer, cfg.student, "student", trainable=True)
    transformer.set_adapter("student")
else:
    worlds.add_lora(transformer, "student", cfg.lora_rank, cfg.lora_alpha)
params = worlds.lora_parameters(transformer, "student")  # float32 even on a bf16 base (worlds.add_lora / load_lora)
param_list = list(params.values())
optimizer = torch.optim.AdamW(param_list, lr=cfg.lr, weight_decay=cfg.weight_decay)
ema = {k: p.detach().clone().float() for k, p in params.items()}

train_files = {t: worlds.prompt_file(world, t, "train") for t in task_weights}
train_prompts = {t: worlds.read_prompts(path) for t, path in train_files.items()}
worlds.encode_once(world, [p for prompts, _ in train_prompts.values() for p in prompts],
                   os.path.join(runs.HERE, "results", world.kind, "prompt_cache"))  # SD3: then frees the text encoders
if cfg.gradient_checkpointing:
    world.transformer.enable_gradient_checkpointing()
task_reward = {t: rewards.get_reward(t, world.kind, dist.device) for t in task_weights} if cfg.score else {}
runs.agree(dist, rewards.load_scorers, *task_reward.values())  # on this thread, before the loop
scorer = rewards.BatchScorer(task_reward)  # scores batch k on its own thread while batch k+1 samples
N = cfg.prompts_per_epoch * cfg.group_size
first, n_local = runs.shard(N, dist)
cfg_rows = 2 if guidance and guidance > 1 else 1  # transformer rows per sample-step: CFG's [uncond; cond]

# What this run is (settings + input hashes): a checkpoint in --out is resumed only if it records the same.
anchor_file = cfg.mar_teacher if anchor == "anchor" else None
identity = runs.run_identity(cfg, dict(base=world.source, student=cfg.student, anchor=anchor_file,
                                       **{f"teacher_{t}": teacher_files[t] for t in used},
                                       **{f"prompts_{t}": path for t, path in train_files.items()}),
                             paths=("world", "student", "teachers") + (("mar_teacher",) if anchor_file else ()))
# each teacher by the whole content of its adapter (a PEFT folder's weights, not input_sha256's sampled bytes): a
# checkpoint re-uploaded under the same name is another teacher, and a resume with it is refused
teacher_sha256 = {t: "base" if f == "base" else worlds.adapter_sha256(f) for t, f in teacher_files.items()}
identity["settings"]["teacher_sha256"] = teacher_sha256
start_epoch, opt_step = (runs.load_train_state(out, params, ema, optimizer, identity, dist=dist) if cfg.resume
                         else (0, 0))

if dist.master:
    os.makedirs(out, exist_ok=True)
    runs.write_json(os.path.join(out, "config.json"), dict(vars(cfg), steps=steps, guidance_scale=guidance,
                                                           teachers=teacher_files, teacher_sha256=teacher_sha256,
                                                           routing=routing,
                                                           world_size=dist.world_size))
    print(f"world {world.name} ({world.kind}) on {dist.device} x {dist.world_size} | loss {cfg.opd_loss} | "
          f"MAR lambda {cfg.mar_weight} anchor {cfg.mar_teacher}")
    print(f"teachers {teacher_files} | routing {routing}")
    print(f"{cfg.prompts_per_epoch} prompts x G={cfg.group_size} = {N} images/epoch, {n_local}/rank | T={steps}, "
          f"SDE window {cfg.sde_window or 'all'}, distilled steps {'the window' if window_only else first_steps} | "
          f"{sum(p.numel() for p in param_list):,} trainable params | out {out}")

track = runs.open_tracker(cfg.tracker, out, vars(cfg), dist)
if start_epoch and dist.master:
    print(f"resumed from {out} at epoch {start_epoch}")

# -----------------------------------------------------------------------------
# Helpers the loop calls: the frozen models' labels (counted in calls["frozen"] for the log's forwards_*),
# MAR's anchor reusing a teacher's labels, the divergence guard.


@torch.no_grad()
def frozen_velocities(name, rows, x_t, sigma, embeds, pooled, calls):
    """A frozen model's velocities at the student's states x_t (n_local, S, C, h, w) of samples `rows`, at
    each distilled step (sigma: S (s_t, s_{t-dt}) pairs): (len(rows), S, C, h, w) on the CPU. One adapter
    switch for the whole epoch (a teacher adapter, or None = the base); a full-weight teacher is its own
    copy of the transformer."""
    copy_world = teacher_copy.get(name.removeprefix("teacher_")) if name else None
    context = contextlib.nullcontext() if copy_world is not None else worlds.adapter(transformer, name)
    rows = torch.as_tensor(rows, dtype=torch.long)
    out = torch.zeros(len(rows), len(sigma), *world.latent_shape)
    with context:
        for i, (s, _) in enumerate(sigma):
            for k, mb in zip(torch.arange(len(rows)).split(cfg.train_batch), rows.split(cfg.train_batch)):
                out[k, i] = sde.predict_velocity(copy_world or world, x_t[mb, i], s, embeds[mb], pooled[mb],
                                                 guidance).cpu()
            calls["frozen"] += len(rows)
    return out


def anchor_velocities(v_target, tasks, x_t, sigma, embeds, pooled, calls):
    """MAR's targets (n_local, S, C, h, w): the anchor labels every sample, whatever its task; a sample routed
    to the anchor itself (e.g. --mar-teacher deqa on deqa prompts) already has its velocities in v_target, so
    it is not labelled twice."""
    others = [i for i in range(len(tasks)) if not routed_to_anchor[tasks[i]]]
    v_anchor = v_target.clone()
    if others:
        v_anchor[others] = frozen_velocities(anchor, others, x_t, sigma, embeds, pooled, calls)
    return v_anchor


def check_targets(v_target, v_anchor, chosen, where):
    """Divergence guard on the targets, over all ranks (a rank that stopped alone would leave the others waiting)."""
    worst = torch.stack([v.flatten(1).abs().amax(1) for v in (v_target, v_anchor) if v is not None]).amax(0)
    runs.assert_finite(runs.gather_cat(worst.to(dist.device), dist), "a teacher or anchor velocity", where,
                       label=lambda i: f"task {chosen[i // cfg.group_size][0]}, "
                                       f"prompt {chosen[i // cfg.group_size][1]!r}")


def trained_samples(scores, dist):
    """--skip-zero-advantage (the official code's filter, docs/DEPARTURES.md): the global indices of the
    samples whose group's task rewards differ; all N samples without the flag."""
    if not cfg.skip_zero_advantage:
        return torch.arange(N)
    all_scores = runs.gather_cat(scores.to(dist.device), dist).cpu()
    return sde.group_advantages(all_scores, torch.arange(N) // cfg.group_size)[1].nonzero().squeeze(1)


# -----------------------------------------------------------------------------
# Training loop

for epoch in tqdm(range(start_epoch, cfg.epochs), desc="opd", disable=not dist.master, initial=start_epoch,
                  total=cfg.epochs):
    timer = runs.Timer()
    chosen = worlds.draw_prompts(train_prompts, task_weights, cfg.prompts_per_epoch, cfg.seed, epoch)
    index = range(first, first + n_local)
    tasks = [chosen[i // cfg.group_size][0] for i in index]
    prompts = [chosen[i // cfg.group_size][1] for i in index]
    metadata = [chosen[i // cfg.group_size][2] for i in index]
    seeds = [sde.sample_seed(cfg.seed, epoch, i) for i in index]
    sde_steps = sde.sde_window_steps(steps, cfg.sde_window, cfg.seed, epoch)
    train_steps = sde_steps if window_only else first_steps  # the S distilled steps
    calls = dict(frozen=0, training=0)  # sample-steps each phase ran the transformer on (x2 with CFG)

    # 1. On-policy sampling: the student's own SDE trajectories (x_t ~ rho_theta)
    score_batch = lambda b, batch_images: scorer.submit(  # noqa: E731
        batch_images, prompts[b: b + len(batch_images)], metadata[b: b + len(batch_images)],
        tasks[b: b + len(batch_images)])
    with timer("sampling"), worlds.adapter(transformer, "student"):
        traj = sde.sample(world, prompts, steps, guidance, cfg.noise_level, seeds=seeds, batch_size=cfg.sample_batch,
                          sde_steps=sde_steps, on_batch=score_batch if cfg.score else None)
    embeds, pooled = traj["embeds"], traj["pooled"]
    # the S distilled steps, one index i per step: x_t[:, i], (s_t, s_{t-dt}) = sigma[i]; the pg losses also read
    # the sampled next state x_next[:, i] and its log-prob at sampling old_log_prob[:, i]
    x_t = traj["latents"][:, train_steps]  # (n_local, S, C, h, w)
    x_next = traj["latents"][:, [j + 1 for j in train_steps]]
    old_log_prob = traj["log_probs"][:, train_steps]  # (n_local, S)
    sigma = [(traj["sigmas"][j].item(), traj["sigmas"][j + 1].item()) for j in train_steps]

    # 2. Task routing: v_target(x_t) = sum_k alpha_k(c) v_k(x_t) at the distilled steps. Each teacher labels
    #    exactly the samples routed to it (never other tasks' prompts), at every distilled step, in one pass:
    #    one adapter switch per teacher per epoch. MAR's anchor labels every sample.
    with timer("teachers"):
        v_target = sde.route_targets(tasks, routing, lambda teacher, rows: frozen_velocities(
            teacher_adapter[teacher], rows, x_t, sigma, embeds, pooled, calls))  # (n_local, S, C, h, w)
        v_anchor = anchor_velocities(v_target, tasks, x_t, sigma, embeds, pooled, calls) if cfg.mar_weight > 0 else None
        check_targets(v_target, v_anchor, chosen, f"opd.py epoch {epoch + 1}")

    # 3. Rewards on the side: how well the student does each task (logged, never trained on)
    with timer("reward"):
        scores = runs.agree(dist, scorer.result) if cfg.score else torch.full((n_local,), float("nan"))

    # The official code's two departures, off by default (docs/DEPARTURES.md, "Which OPD loss"): it trains only
    # the samples whose group's task rewards differ (--skip-zero-advantage), and weights each step's KL and
    # MAR by |dt| w(t) instead of w(t) (--kl-dt-factor).
    trained = trained_samples(scores, dist)
    kl_scale = [abs(s - s_next) if cfg.kl_dt_factor else 1.0 for s, s_next in sigma]

    # 4. Update the student (eq. "Flow-OPD objective"): distillation loss + lambda * MAR, the per-step mean
    #    over the S distilled steps, the mean over each optimizer step's samples (a global count, as grpo_expert.py)
    S = len(train_steps)
    losses = []  # detached tensors: read once per epoch
    kl_sample, mar_sample = torch.zeros(n_local, device=dist.device), torch.zeros(n_local, device=dist.device)
    with timer("training"), worlds.adapter(transformer, "student"):
        for inner in range(cfg.inner_epochs):
            chunks = runs.optimizer_chunks(trained, cfg.updates_per_epoch, sde.sample_seed(cfg.seed, epoch, -1 - inner))
            for chunk in (chunks if len(trained) else []):  # each rank's share of a chunk is within one sample of equal
                optimizer.zero_grad(set_to_none=True)
                # the step's summed loss for the divergence guard (no sync until read), summed over ranks below so
                # that a non-finite loss on one rank stops every rank at the same step
                step_loss = torch.zeros((), device=dist.device)
                mine = chunk[(chunk >= first) & (chunk < first + n_local)] - first
                for mb in mine.split(cfg.train_batch) if len(mine) else []:  # a rank may hold none of this chunk
                    for i, (s, s_next) in enumerate(sigma):
                        v = sde.predict_velocity(world, x_t[mb, i], s, embeds[mb], pooled[mb], guidance)
                        target = v_target[mb, i].to(v.device)
                        kl = kl_scale[i] * sde.velocity_kl(v, target, s, s_next, cfg.noise_level)  # KL(pi_theta||pi_T)
                        loss = kl if cfg.opd_loss == "direct" else sde.opd_pg_loss(
                            cfg.opd_loss, v, target, x_t[mb, i], x_next[mb, i], old_log_prob[mb, i], s, s_next,
                            cfg.noise_level, cfg.clip_range, cfg.adv_clip, kl_scale[i])
                        if v_anchor is not None:  # MAR: lambda * w(t) ||v_theta - v_anchor||^2, on all data
                            mar = kl_scale[i] * sde.velocity_kl(v, v_anchor[mb, i].to(v.device), s, s_next,
                                                                cfg.noise_level)
                            loss = loss + cfg.mar_weight * mar
                            if inner == 0:
                                mar_sample[mb] += mar.detach() / S
                        (loss.sum() / (len(chunk) * S)).backward()
                        step_loss += loss.detach().sum()
                        losses.append(loss.detach().mean())
                        calls["training"] += len(mb)
                        if inner == 0:
                            kl_sample[mb] += kl.detach() / S
                step_loss = runs.all_reduce_sum(param_list, dist, step_loss)  # the loss summed over ranks, as the grads
                grad_norm = torch.nn.utils.clip_grad_norm_(param_list, cfg.grad_clip)
                where = f"opd.py epoch {epoch + 1} optimizer step {opt_step + 1}"
                runs.assert_finite(torch.stack([grad_norm.float(), step_loss.float()]), "the gradient norm or the loss",
                                   where, label=lambda i: ("it is the gradient norm", "it is the loss")[i])  # one sync
                optimizer.step()
                opt_step += 1
                if opt_step % cfg.ema_every == 0:
                    runs.ema_update(ema, params, cfg.ema_decay, step=opt_step)

    # 5. Log, grids, checkpoints
    gathered = runs.gather_cat(torch.stack([scores.to(dist.device), kl_sample, mar_sample], 1), dist).cpu()  # (N, 3)
    all_tasks = runs.gather_cat(torch.tensor([list(task_weights).index(t) for t in tasks], device=dist.device),
                                dist).cpu()
    if dist.master:
        per_task = {}
        for k, t in enumerate(task_weights):
            if (all_tasks == k).any():
                per_task[f"kl_{t}"] = gathered[all_tasks == k, 1].mean().item()  # KL to this task's teacher
                if cfg.score:
                    per_task[f"reward_{t}"] = gathered[all_tasks == k, 0].mean().item()
        # forwards_*: transformer rows per image of each phase (CFG counts 2)
        forwards = {f"forwards_{k}": cfg_rows * v / max(n_local, 1) for k, v in dict(sampling=steps * n_local,
                                                                                     **calls).items()}
        record = dict(epoch=epoch + 1, loss=torch.stack(losses).mean().item() if losses else 0.0,
                      kl=gathered[:, 1].mean().item(), mar=gathered[:, 2].mean().item(), opt_step=opt_step, **per_task,
                      trained=len(trained) / N, **{f"sec_{k}": v for k, v in timer.seconds.items()},
                      **runs.peak_memory(dist.device), **forwards)
        runs.log_jsonl(os.path.join(out, "log.jsonl"), record, echo=False)
        track(record)
        tqdm.write(f"epoch {epoch + 1}: KL {record['kl']:.3e} "
                   + " ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("reward_"))
                   + f" | MAR {record['mar']:.2e} | " + " ".join(f"{k} {v:.1f}s" for k, v in timer.seconds.items()))
        if cfg.grid_every and (epoch + 1) % cfg.grid_every == 0:
            images = traj["images"]
            runs.save_grid(images[:16], os.path.join(out, f"samples_{epoch + 1:04d}.png"), nrow=8,
                           scale=max(1, 128 // images.shape[-1]))
    if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
        if dist.master:  # the adapter, then the checkpoint: a kill between the two redoes both (grpo_expert.py)
            worlds.save_lora(transformer, "student", os.path.join(out, "adapter.safetensors"), state_dict=ema)
            runs.save_train_state(out, epoch + 1, params, ema, optimizer, opt_step, identity)

runs.end_distributed(dist)
