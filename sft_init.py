"""
sft_init.py: the SFT cold start of Flow-OPD. Sample images from each task's specialised teacher once
(optionally best-of-N by the task's reward, as Flow-GRPO's SFT keeps the highest-reward image), cache
their final latents x_0, then fine-tune a fresh student LoRA on the (prompt, x_0) pairs with SD3's
rectified-flow loss. The paper's alternative to merge-init (PAPER-NOTES section 3); the official code
calls an SFT script it never released, so this one follows Flow-GRPO's SFT recipe and SD3's loss.

  1. cache     x_0 ~ teacher_task(prompt) for prompts-per-task training prompts of every task,
               safetensors shards + index.json under <cache>, per-sample seeds (any world size gives
               the same cache), resumable shard by shard
  2. SFT       sigma ~ logit-normal, x_t = (1 - sigma) x_0 + sigma noise, v* = noise - x_0,
               L = mean ||v^g_theta(x_t, sigma, c) - v*||^2 (+ lambda ||v^g_theta - v^g_base||^2),
               v^g = v_u + g (v_c - v_u) the guided velocity (g = 1: SD3's plain conditional loss)

Commands
  tiny world, CPU (minutes):   python sft_init.py            (teachers: assets/tiny_experts/<task>.safetensors)
  one teacher, best-of-4:      python sft_init.py --task ocr \
                                 --teachers ocr=results/tiny/runs/grpo-ocr/adapter.safetensors --best-of 4
  rejection sampling (RAFT):   python sft_init.py --task geneval --teachers geneval=base --best-of 8
                               (the base's best of 8)
  SD3.5-M, one GPU:            python sft_init.py --world stabilityai/stable-diffusion-3.5-medium \
      --teachers geneval=g.safetensors,ocr=o.safetensors,deqa=d.safetensors,pickscore=p.safetensors
  one node, 8 GPUs:            torchrun --nproc_per_node 8 sft_init.py --world <sd3.5m folder> --teachers ...
  4 nodes x 8 GPUs:            torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \
                                 --rdzv_endpoint $HEAD:29500 sft_init.py --world <sd3.5m folder> --teachers ...

Guidance. The teachers' samples are CFG-guided, and SD3's loss teaches them to the student's
CONDITIONAL velocity (--train-guidance 1, the default), so a student sampled with CFG applies the
guidance on top of what it learnt. --train-guidance g puts the loss on the GUIDED velocity
v_u + g (v_c - v_u) instead: its minimiser is the field whose guided ODE transports noise to the
teachers' samples (one extra unconditional forward per item). On the tiny world the plain loss's student
scored higher (docs/NOTES.md, "SFT on the guided velocity"), so the default stays SD3's plain loss.

Outputs in --out: adapter.safetensors (the EMA LoRA, diffusers-loadable: opd.py --student), config.json,
log.jsonl, checkpoints/ (exact resume: rerun the same command), cache/ (teacher samples; --cache to
share one cache between runs: a rerun reuses its complete shards and generates only missing ones).
"""

import json
import os
import warnings

import numpy as np
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
    teachers=("", "task=file pairs 'geneval=a.safetensors,...' ('' = the tiny world's experts; 'base' = the base)"),
    task=("geneval:1,ocr:1,deqa:1,pickscore:1", "tasks to distil, with the odds of a batch item's task"),
    out=(None, str, "output folder (default results/<world>/runs/sft-init)"),
    cache=(None, str, "teacher-sample cache folder (default <out>/cache; runs with the same teachers can share it)"),
    init=("", "start the student from this LoRA file instead of a fresh adapter"),
    # 1. teacher samples
    prompts_per_task=(256, "cached samples per task; item k uses training prompt k of a seeded shuffle (cycling)"),
    best_of=(1, "N: sample N images per item with the teacher and keep the highest-reward one (1 = no selection)"),
    sample_steps=(None, int, "sampling steps for the teacher (default: the world's eval steps, 20 tiny / 40 SD3)"),
    sample_noise_level=(0.0, "0 = ODE sampling (the teachers' evaluation setting); > 0 = SDE with this noise level a"),
    guidance_scale=(None, float, "CFG scale of teacher sampling (default: the world's, 4.5)"),
    sample_batch=(16, "images per sampling forward, per rank"),
    shard_size=(64, "cached items per shard file (the unit of resumable generation)"),
    # 2. SFT
    steps=(1000, "optimizer steps"),
    train_guidance=(1.0, "CFG scale g of the trained velocity v_u + g (v_c - v_u): 1 = SD3's plain conditional loss"),
    batch=(32, "items per optimizer step, over all ranks"),
    train_batch=(32, "items per training forward, per rank"),
    lr=(3e-4, "AdamW learning rate"),
    weight_decay=(1e-4, "AdamW weight decay"),
    grad_clip=(1.0, "gradient-norm clip"),
    logit_mean=(0.0, "mean of the logit-normal timestep density (SD3: 0)"),
    logit_std=(1.0, "std of the logit-normal timestep density (SD3: 1)"),
    cond_dropout=(0.0, "probability of training an item on the empty prompt (see the training loop's comment)"),
    base_reg=(0.0, "lambda of the regulariser lambda * ||v_theta - v_base||^2 at the same x_t (0 = off)"),
    lora_rank=(32, "LoRA rank r"),
    lora_alpha=(64, "LoRA alpha (scale alpha / r)"),
    ema_decay=(0.9, "EMA decay of the trained weights (the EMA is what is saved)"),
    ema_every=(8, "EMA update interval in optimizer steps (Flow-GRPO: 8)"),
    probe=(16, "probe items: the first N positions of step 0's batch, whose flow loss is logged (0 = off)"),
    probe_every=(50, "probe loss every N steps (and at step 0)"),
    log_every=(10, "log.jsonl record every N steps"),
    threads=(0, "CPU threads per process (0 = OMP_NUM_THREADS if set, else the cores shared between local ranks)"),
    gradient_checkpointing=(False, "recompute block activations in the backward pass: less memory, same gradients"),
    seed=(0, "seed of prompt choice, sampling noise, batches, sigmas and training noise"),
    save_every=(100, "checkpoint every N steps (and at the end)"),
    resume=(True, "continue from the latest checkpoint in --out if there is one"),
    tracker=("", "also log every record to 'tensorboard' or 'wandb' (master only); '' = log.jsonl only"),
)
cfg = runs.parse_settings(__doc__, SETTINGS)

# -----------------------------------------------------------------------------
# Set-up: distributed, world, teachers, settings derived from the world

dist = runs.setup_distributed()
if dist.device.type == "cpu":  # share the cores between local ranks
    runs.set_threads(cfg.threads, dist)
world = worlds.load_world(cfg.world, dist.device)
transformer = world.transformer
sample_steps = cfg.sample_steps or world.defaults["eval_steps"]
guidance = world.defaults["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
task_weights = rewards.parse_weights(cfg.task)
for name in task_weights:
    if name not in world.tasks:
        raise SystemExit(f"error: --task name {name!r} is not a task of the {world.kind} world {world.tasks}")
out = cfg.out or os.path.join(runs.HERE, "results", world.kind, "runs", "sft-init")
cache_dir = cfg.cache or os.path.join(out, "cache")

teacher_files = worlds.parse_teachers(cfg.teachers, world)  # {task: LoRA file}
missing = [t for t in task_weights if t not in teacher_files]
if missing:
    raise SystemExit(f"error: tasks {missing} have no teacher in --teachers {sorted(teacher_files)}")
for t in task_weights:
    if teacher_files[t] != "base" and not os.path.exists(teacher_files[t]):  # a LoRA file or a PEFT folder
        raise SystemExit(f"error: teacher file {teacher_files[t]} (task {t}) does not exist")
if cfg.best_of < 1 or cfg.prompts_per_task < 1:
    raise SystemExit("error: --best-of and --prompts-per-task must be >= 1")

first, n_local = runs.shard(cfg.batch, dist, what="items per step (--batch)")  # this rank's block of each global batch
train_files = {t: worlds.prompt_file(world, t, "train") for t in task_weights}
train_prompts = {t: worlds.read_prompts(path) for t, path in train_files.items()}
worlds.encode_once(world, [p for prompts, _ in train_prompts.values() for p in prompts],
                   os.path.join(runs.HERE, "results", world.kind, "prompt_cache"))  # SD3: then frees the text encoders
if cfg.gradient_checkpointing:
    world.transformer.enable_gradient_checkpointing()
null = world.encode_prompts([""])  # the empty prompt's conditioning, for the guided loss

# What this run is (settings + input hashes): a checkpoint in --out is resumed only if it records the same,
# checked before any teacher sample is generated.
identity = runs.run_identity(cfg, dict(base=world.source, init=cfg.init,
                                       **{f"teacher_{t}": teacher_files[t] for t in task_weights},
                                       **{f"prompts_{t}": path for t, path in train_files.items()}),
                             paths=("world", "teachers", "init"))
with runs.all_or_none(dist):  # a changed run on one node stops every rank, not that node alone
    state = runs.load_checkpoint(out, tensors=False) if cfg.resume else None  # the header: load_train_state loads
    if state is not None:
        runs.check_resume(out, state, identity, "steps", state["epoch"])


# -----------------------------------------------------------------------------
# 1. Teacher samples, generated once. Item k of task t: prompt perm_t[k mod P] of a seeded shuffle of
#    the training prompts, candidate c's noise from sample_seed(seed, task id, k, c). A shard is a
#    contiguous block of one task's items, self-describing (its prompts and generation key are in its
#    metadata), so a rerun keeps every shard whose key and prompts match and generates the rest.

def task_items(task):
    """(prompts, metadata, item ids) of the task's prompts_per_task cached items."""
    prompts, metadata = train_prompts[task]
    perm = np.random.default_rng([cfg.seed, world.tasks.index(task)]).permutation(len(prompts))
    ids = list(range(cfg.prompts_per_task))
    return [prompts[perm[k % len(prompts)]] for k in ids], [metadata[perm[k % len(prompts)]] for k in ids], ids


def generation_key(task):
    """Everything a cached sample depends on besides its prompt and item id."""
    teacher = "base" if teacher_files[task] == "base" else runs.content_sha256(teacher_files[task])
    return dict(task=task, teacher=teacher, world=world.name, steps=sample_steps,
                guidance_scale=guidance, noise_level=cfg.sample_noise_level, best_of=cfg.best_of, seed=cfg.seed)


shards = []  # every shard of the cache: dict(task, file, lo, hi), in task order
keys = {t: generation_key(t) for t in task_weights}
items = {t: task_items(t) for t in task_weights}
for t in task_weights:
    for lo in range(0, cfg.prompts_per_task, cfg.shard_size):
        hi = min(lo + cfg.shard_size, cfg.prompts_per_task)
        shards.append(dict(task=t, file=f"{t}_{lo:06d}_{hi:06d}.safetensors", lo=lo, hi=hi))


def shard_is_complete(s):
    path = os.path.join(cache_dir, s["file"])
    if not os.path.isfile(path):
        return False
    try:
        _, meta = runs.load_tensors(path)
        info = json.loads(meta["info"])
    except Exception:  # a foreign or corrupt file: regenerate it
        return False
    return info["key"] == keys[s["task"]] and info["prompts"] == items[s["task"]][0][s["lo"]: s["hi"]]


# rank 0's cache alone decides (as evaluate.py's): ranks that read their own could disagree on the work
complete = runs.from_master(dist, [shard_is_complete(s) for s in shards] if dist.master else None)
todo = [s for s, done in zip(shards, complete) if not done]
if dist.master:
    print(f"world {world.name} ({world.kind}) on {dist.device} x {dist.world_size} | tasks {task_weights} | teachers "
          + ", ".join(f"{t}={teacher_files[t]}" for t in task_weights))
    print(f"cache {cache_dir}: {cfg.prompts_per_task} items/task x {len(task_weights)} tasks, best-of-{cfg.best_of}, "
          f"{'ODE' if cfg.sample_noise_level == 0 else f'SDE a={cfg.sample_noise_level}'} {sample_steps} steps, "
          f"CFG {guidance}")
    print(f"cache: reused {len(shards) - len(todo)} of {len(shards)} shards, generating {len(todo)}")

# Shards are dealt round-robin to the ranks; every rank writes its own shards (atomic files) and waits.
mine = todo[dist.rank:: dist.world_size]
loaded_teachers = []
# Every rank learns whether every rank wrote its shards and can read every shard (a node-local --out, or NFS
# attribute caching: a shard written on another node may look missing for a while).
with runs.all_or_none(dist):
    for s in tqdm(mine, desc="teacher samples", disable=not dist.master):
        t = s["task"]
        name = None if teacher_files[t] == "base" else f"teacher_{t}"  # None: adapters disabled, the base samples
        if name is not None and name not in loaded_teachers:
            worlds.load_lora(transformer, teacher_files[t], name, trainable=False)
            loaded_teachers.append(name)
        prompts, metadata, ids = (x[s["lo"]: s["hi"]] for x in items[t])
        n = len(ids)
        # best-of-N: candidates are laid out item-major, (n * N,), candidate c of item k at k * N + c
        cand_prompts = [p for p in prompts for _ in range(cfg.best_of)]
        cand_meta = [m for m in metadata for _ in range(cfg.best_of)]
        seeds = [sde.sample_seed(cfg.seed, world.tasks.index(t), k, c) for k in ids for c in range(cfg.best_of)]
        transformer.eval()
        with worlds.adapter(transformer, name):
            traj = sde.sample(world, cand_prompts, sample_steps, guidance, cfg.sample_noise_level, seeds=seeds,
                              batch_size=cfg.sample_batch)
        reward = (rewards.get_reward(t, world.kind, dist.device)(traj["images"], cand_prompts, cand_meta)
                  .view(n, cfg.best_of))  # (n, N)
        best = reward.argmax(dim=1)  # the first of equal rewards
        x0 = traj["latents"][:, -1].view(n, cfg.best_of, *world.latent_shape)[torch.arange(n), best]  # (n, C, h, w)
        info = dict(key=keys[t], prompts=prompts, metadata=metadata, ids=ids,
                    seeds=[seeds[k * cfg.best_of + int(best[k])] for k in range(n)],
                    reward_mean_of_candidates=reward.mean().item())
        runs.save_tensors(os.path.join(cache_dir, s["file"]), dict(x0=x0, reward=reward[torch.arange(n), best]),
                         metadata={"info": json.dumps(info)})
        if s["lo"] == 0 and dist.master:
            images = world.decode(x0[:16])
            runs.save_grid(images, os.path.join(cache_dir, f"samples_{t}.png"), nrow=8,
                           scale=max(1, 128 // images.shape[-1]))
    if loaded_teachers:  # the teachers are done: only the base and the student remain on the transformer
        with warnings.catch_warnings():  # peft notes which adapter it makes active; the student is set below
            warnings.simplefilter("ignore")
            transformer.delete_adapters(loaded_teachers)
    runs.wait_readable([os.path.join(cache_dir, s["file"]) for s in shards], f"sft_init.py cache {cache_dir}",
                       "put --out (or --cache) on a filesystem that every node shares")

# The whole cache in memory, items in shard order: global item ids 0..M-1; task_ranges[t] = (first id, count).
x0_all, reward_all, prompts_all, meta_all, task_ranges = [], [], [], [], {}
for s in shards:
    tensors, meta = runs.load_tensors(os.path.join(cache_dir, s["file"]))
    info = json.loads(meta["info"])
    start = task_ranges.setdefault(s["task"], (len(prompts_all), 0))[0]
    x0_all.append(tensors["x0"])
    reward_all.append(tensors["reward"])
    prompts_all += info["prompts"]
    meta_all += info["metadata"]
    task_ranges[s["task"]] = (start, len(prompts_all) - start)
x0_all, reward_all = torch.cat(x0_all).float(), torch.cat(reward_all)  # (M, C, h, w), (M,)
runs.assert_finite(x0_all.flatten(1).abs().amax(1), "a cached teacher sample", f"sft_init.py cache {cache_dir}",
                   label=lambda i: f"item {i}, prompt {prompts_all[i]!r}")
if dist.master:
    runs.write_json(os.path.join(cache_dir, "index.json"), dict(
        keys=keys, shards=shards, items=len(prompts_all),
        reward={t: reward_all[a: a + n].mean().item() for t, (a, n) in task_ranges.items()}))

# -----------------------------------------------------------------------------
# 2. The student: a fresh LoRA on the frozen base (or --init), AdamW, EMA

torch.manual_seed(cfg.seed)  # a fresh LoRA's A is random: the same init whether or not teachers were loaded first
if cfg.init:
    worlds.load_lora(transformer, cfg.init, "student", trainable=True)
else:
    worlds.add_lora(transformer, "student", cfg.lora_rank, cfg.lora_alpha)
transformer.set_adapter("student")
params = worlds.lora_parameters(transformer, "student")
for p in params.values():  # float32 even on a bf16 base (worlds.add_lora / load_lora)
    p.requires_grad_(True)
param_list = list(params.values())
optimizer = torch.optim.AdamW(param_list, lr=cfg.lr, weight_decay=cfg.weight_decay)
ema = {k: p.detach().clone().float() for k, p in params.items()}

if dist.master:
    os.makedirs(out, exist_ok=True)
    runs.write_json(os.path.join(out, "config.json"), dict(vars(cfg), out=out, cache=cache_dir, teachers=teacher_files,
                                                           sample_steps=sample_steps, guidance_scale=guidance,
                                                           world_size=dist.world_size))
    print("cache size: " + ", ".join(f"{t} {n} items (teacher reward {reward_all[a: a + n].mean().item():.3f})"
                                      for t, (a, n) in task_ranges.items()))
    print(f"{cfg.steps} steps x {cfg.batch} items = {cfg.steps * cfg.batch / len(prompts_all):.1f} passes over "
          f"{len(prompts_all)} cached items | {n_local} items/rank/step in forwards of {cfg.train_batch} | "
          f"{sum(p.numel() for p in param_list):,} trainable params (r={transformer.peft_config['student'].r}) | "
          f"lr {cfg.lr} | trained guidance {cfg.train_guidance} | cond-dropout {cfg.cond_dropout} | "
          f"base-reg {cfg.base_reg} | "
          f"EMA {cfg.ema_decay} every {cfg.ema_every} | out {out}")
    if cfg.steps < cfg.ema_every:
        print(f"warning: {cfg.steps} steps < --ema-every {cfg.ema_every}: the saved EMA adapter equals the initial one")

# the checkpoint's "epoch" and "opt_step" are both the optimizer step here
start_step, _ = (runs.load_train_state(out, params, ema, optimizer, identity, "steps", dist) if cfg.resume
                 else (0, 0))
if start_step and dist.master:
    print(f"resumed from {out} at step {start_step}")


def draw(step, positions):
    """The items and randomness of global batch positions `positions` at `step`, a function of
    (seed, step, position) only: resume and world size do not change the run.
    Returns (item ids (n,), sigma (n,), noise (n, C, h, w), drop (n,) bool)."""
    ids, sigmas, noises, drops = [], [], [], []
    names = list(task_weights)
    odds = np.array([task_weights[t] for t in names], dtype=np.float64)
    for b in positions:
        rng = np.random.default_rng([cfg.seed, step, b, 1])
        a, n = task_ranges[names[rng.choice(len(names), p=odds / odds.sum())]]
        ids.append(a + int(rng.integers(n)))
        g = torch.Generator().manual_seed(sde.sample_seed(cfg.seed, step, b))
        # logit-normal sigma (SD3, "logit_normal" weighting scheme), then the world's shift as SD3's
        # training scheduler applies it (shift 3.0 on SD3; 1.0 in the tiny world)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g))
        sigmas.append(sde.shift_sigma(u, world.defaults["shift"]))
        noises.append(torch.randn(world.latent_shape, generator=g))
        drops.append(torch.rand((), generator=g).item() < cfg.cond_dropout)
    return torch.tensor(ids), torch.stack(sigmas), torch.stack(noises), torch.tensor(drops, dtype=torch.bool)


def flow_loss(x0, prompts, sigma, noise, drop, base_reg):
    """Per-item losses (n,) of SD3's rectified-flow objective on the guided velocity, and the
    base-regulariser term (n,):
        x_t = (1 - sigma) x_0 + sigma noise,   v* = noise - x_0,   v^g = v_u + g (v_c - v_u),
        L = mean_dims ||v^g_theta(x_t, sigma, c) - v*||^2  +  lambda mean_dims ||v^g_theta - v^g_base||^2
    g = --train-guidance (1: one conditional forward, SD3's loss). Dropped items see the empty prompt
    (their guided velocity is the unconditional one whatever g). x0 (n, C, h, w): the items' cached samples."""
    x0 = x0.to(world.device)
    noise = noise.to(world.device)
    s = sigma.to(world.device).view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    target = noise - x0
    embeds, pooled = world.encode_prompts(["" if d else p for p, d in zip(prompts, drop.tolist())])
    v = sde.predict_velocity(world, x_t, sigma, embeds, pooled, cfg.train_guidance, null)
    loss = ((v - target) ** 2).mean(dim=(1, 2, 3))
    reg = torch.zeros_like(loss)
    if base_reg > 0:
        with torch.no_grad(), worlds.adapter(transformer, None):  # the frozen base: adapters disabled
            v_base = sde.predict_velocity(world, x_t, sigma, embeds, pooled, cfg.train_guidance, null)
        reg = ((v - v_base) ** 2).mean(dim=(1, 2, 3))
    return loss, reg


# The probe is positions 0..probe-1 of step 0's draw: with probe <= batch it is (the start of) the first
# step's own batch, so log.jsonl shows what one step does to the loss of the batch it was computed on.
probe = draw(0, range(cfg.probe)) if cfg.probe else None


@torch.no_grad()
def probe_loss(probe):
    """Flow loss of the current (raw, not EMA) student on the fixed probe items, and of predicting v = 0
    (the scale: 1 - probe / zero is the fraction of the target's energy the student explains)."""
    ids, sigma, noise, drop = probe
    losses = torch.cat([flow_loss(x0_all[ids[c]], [prompts_all[i] for i in ids[c].tolist()], sigma[c], noise[c],
                                  drop[c], 0.0)[0].cpu() for c in torch.arange(len(ids)).split(cfg.train_batch)])
    zero = ((noise - x0_all[ids]) ** 2).mean(dim=(1, 2, 3))
    return losses.mean().item(), zero.mean().item()


def save_outputs(step, ema):
    """The EMA adapter that later stages use, then the exact-resume checkpoint (last, as in
    grpo_expert.py: a kill between the two redoes both), each written atomically (master only)."""
    if not dist.master:
        return
    # save_lora wants peft's state-dict keys, which lack the adapter name that named_parameters() has
    worlds.save_lora(transformer, "student", os.path.join(out, "adapter.safetensors"),
                  state_dict={k.replace(".student.", "."): v for k, v in ema.items()})
    runs.save_train_state(out, step, params, ema, optimizer, step, identity)


# -----------------------------------------------------------------------------
# Training loop. Each rank holds global batch positions [first, first + n_local); it back-propagates
# sum(its losses) / batch, so the summed gradient is the global mean whatever the world size.
#
# Conditioning dropout defaults to 0: SD3 drops captions in pre-training so that ONE network also
# learns the unconditional velocity; here the base already has it, and training the LoRA's
# unconditional branch on the teachers' CFG-sharpened samples would pull v_uncond toward v_cond and
# shrink the guidance direction that produced them. --cond-dropout 0.1 restores SD3's recipe.

track = runs.open_tracker(cfg.tracker, out, vars(cfg), dist)
if dist.master and probe is not None and start_step == 0:
    p, zero = probe_loss(probe)
    runs.log_jsonl(os.path.join(out, "log.jsonl"), dict(step=0, probe_loss=p, probe_zero=zero), echo=False)
    track(dict(step=0, probe_loss=p, probe_zero=zero))
    tqdm.write(f"step 0: probe loss {p:.6f} (v = 0 would give {zero:.4f})")

stats = dict(loss=[], reg=[], grad_norm=[])
for step in tqdm(range(start_step, cfg.steps), desc="sft", disable=not dist.master, initial=start_step,
                 total=cfg.steps):
    timer = runs.Timer()

    # 1. This rank's items of the global batch, with their sigma, noise and dropout
    ids, sigma, noise, drop = draw(step, range(first, first + n_local))

    # 2. Rectified-flow loss (SD3) + optional base regulariser, gradient summed over micro-batches
    transformer.train()
    optimizer.zero_grad(set_to_none=True)
    with timer("training"):
        losses, regs = [], []
        for mb in torch.arange(n_local).split(cfg.train_batch):
            loss, reg = flow_loss(x0_all[ids[mb]], [prompts_all[i] for i in ids[mb].tolist()], sigma[mb], noise[mb],
                                  drop[mb], cfg.base_reg)
            ((loss + cfg.base_reg * reg).sum() / cfg.batch).backward()
            losses.append(loss.detach())
            regs.append(reg.detach())

    # 3. Summed gradients over ranks, clip, AdamW, EMA
    # the loss summed over ranks travels with the gradients: every rank takes the same decision at the same step
    loss_sum = runs.all_reduce_sum(param_list, dist, torch.cat(losses).sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(param_list, cfg.grad_clip)
    runs.assert_finite(grad_norm, "the gradient norm", f"sft_init.py step {step + 1}")  # the same on every rank
    one = dist.world_size == 1  # one process names the item; under torchrun every rank reads the same sum
    runs.assert_finite(torch.cat(losses) if one else loss_sum, "the loss", f"sft_init.py step {step + 1}",
                       label=lambda i: f"item {int(ids[i])}, prompt {prompts_all[int(ids[i])]!r}" if one
                       else "summed over ranks")
    optimizer.step()
    if (step + 1) % cfg.ema_every == 0:
        runs.ema_update(ema, params, cfg.ema_decay, step=step + 1)

    # 4. Log (global means over ranks), probe, checkpoints
    stats["loss"].append(runs.gather_cat(torch.cat(losses), dist).mean().item())
    stats["reg"].append(runs.gather_cat(torch.cat(regs), dist).mean().item())
    stats["grad_norm"].append(grad_norm.item())
    record = {}
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        record = dict(loss=float(np.mean(stats["loss"])), base_reg=float(np.mean(stats["reg"])),
                      grad_norm=float(np.mean(stats["grad_norm"])), **{f"sec_{k}": v for k, v in timer.seconds.items()},
                      **runs.peak_memory(dist.device))
        stats = dict(loss=[], reg=[], grad_norm=[])
    if dist.master:
        if probe is not None and ((step + 1) % cfg.probe_every == 0 or step + 1 == cfg.steps):
            record["probe_loss"], record["probe_zero"] = probe_loss(probe)
        if record:
            runs.log_jsonl(os.path.join(out, "log.jsonl"), dict(step=step + 1, **record), echo=False)
            track(dict(step=step + 1, **record))
            tqdm.write(f"step {step + 1}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items()))
    if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
        save_outputs(step + 1, ema)

runs.end_distributed(dist)
