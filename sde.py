"""
sde.py: the method of Flow-OPD in one file: the maths and the sampler every stage script shares. Copy
this file to get the method; it imports no other module of this project. Read it next to the paper:

  1. schedule          SD3's shifted flow-matching sigmas                       sd3_sigmas
  2. ODE -> SDE        one Euler-Maruyama step as a Gaussian policy (Flow-GRPO)  sde_step_with_logprob
  3. dense KL          closed-form reverse KL between two such steps (Flow-OPD)  kl_weight, velocity_kl
  4. sampling          CFG velocity and whole SDE/ODE trajectories               predict_velocity, sample
  5. objectives        Flow-GRPO's advantages and clipped surrogate; Flow-OPD's  group_advantages, clipped_surrogate,
                       task routing and distillation loss                        route_targets, opd_pg_loss

A "world" (worlds.py) is anything with the attributes sample() and predict_velocity() read: transformer,
encode_prompts, decode, latent_shape, device, dtype and defaults (shift, train_steps, guidance_scale).

Notation (SD3): x_0 is the image latent, x_1 is noise, x_t = (1 - t) x_0 + t x_1 with t = sigma,
the network predicts the velocity v = x_1 - x_0, and sampling integrates from sigma = 1 to 0, so
every step has dt = sigma_next - sigma < 0.
"""

import math

import numpy as np
import torch

# -----------------------------------------------------------------------------
# 1. Schedule: SD3's shifted sigmas (what FlowMatchEulerDiscreteScheduler.set_timesteps gives)


def shift_sigma(s, shift):
    """SD3's timestep shift: sigma' = shift * s / (1 + (shift - 1) * s). shift > 1 spends more steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sd3_sigmas(steps, shift=3.0):
    """(steps + 1,) float32 sigmas from 1 down to 0, identical to diffusers' scheduler with shift.

    The scheduler builds its training sigmas shifted, takes sigma_min of those (shift(1/1000)), spaces
    `steps` values linearly between 1 and that sigma_min, shifts them again, and appends a final 0.
    Timesteps fed to the transformer are 1000 * sigma.
    """
    sigma_min = shift_sigma(1.0 / 1000, shift)
    s = np.linspace(1.0, sigma_min, steps).astype(np.float32)
    sigmas = torch.from_numpy(shift_sigma(s, shift).astype(np.float32))
    return torch.cat([sigmas, torch.zeros(1)])


# -----------------------------------------------------------------------------
# 2. ODE -> SDE: one denoising step as a Gaussian policy (Flow-GRPO, eq. "SDE sampling")
#
# The probability-flow ODE dx = v dt has the same marginals as the reverse-time SDE
#     dx_t = [ v(x_t, t) + s_t^2 / (2t) * (x_t + (1 - t) v(x_t, t)) ] dt + s_t dw,   s_t = a sqrt(t / (1 - t))
# Its Euler-Maruyama step from sigma to sigma_next is Gaussian:
#     mean = x (1 + s_t^2 dt / (2 sigma)) + v (1 + s_t^2 (1 - sigma) / (2 sigma)) dt
#     std  = s_t sqrt(-dt)
# which is what makes a flow model a policy with a log-probability.


def _as_batch(value, like):
    """A Python float or a (B,) tensor of per-sample sigmas, shaped to broadcast against `like` (B, ...)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def _noise_scale(sigma, sigma_next, noise_level):
    """s_t = a sqrt(sigma / (1 - sigma)). At sigma = 1 the ratio is singular; Flow-GRPO puts the next
    sigma in the denominator there (it uses sigmas[1], the sigma after 1), and so do we."""
    denom = 1 - torch.where(sigma == 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step_with_logprob(velocity, sigma, sigma_next, sample, noise_level=0.7, prev_sample=None, generator=None):
    """One Euler-Maruyama step of the flow SDE and the log-density of its result.

    velocity, sample: (B, ...) model output and current latent x_t (any dtype; computed in float32).
    sigma, sigma_next: Python floats or (B,) tensors (per-sample times).
    prev_sample: the action to score; None draws a fresh one. generator: a torch.Generator, or a list
    of B generators (per-sample seeding: sample i's noise then does not depend on the batch it is in).
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std) all float32; log_prob is the Gaussian
    log-density AVERAGED over the non-batch dimensions (Flow-GRPO's convention, which its clip range
    1e-4 and KL betas assume). noise_level = 0 is exactly the Euler ODE step x + v dt, log_prob = 0.
    """
    v = velocity.float()
    x = sample.float()
    sigma = _as_batch(sigma, x)
    sigma_next = _as_batch(sigma_next, x)
    dt = sigma_next - sigma  # < 0: we integrate from noise (1) to data (0)

    if noise_level == 0:  # deterministic ODE: avoid 0/0 and log(0) below
        mean = x + v * dt
        out = mean if prev_sample is None else prev_sample.float()
        return out, torch.zeros(x.shape[0], device=x.device), mean, torch.zeros_like(dt)

    s_t = _noise_scale(sigma, sigma_next, noise_level)
    mean = x * (1 + s_t**2 / (2 * sigma) * dt) + v * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s_t * torch.sqrt(-dt)

    if prev_sample is None:
        noise = randn_like_per_sample(x, generator)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()

    # log N(prev | mean, std^2), per dimension, then averaged over all non-batch dims.
    # prev_sample is data here: the gradient flows only through mean (i.e. through the velocity).
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - 0.5 * math.log(2 * math.pi)
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, mean, std


def randn_like_per_sample(x, generator=None):
    """Standard normal noise shaped like x. With a list of generators, sample i uses generator i only,
    drawn on the CPU, so it is the same whatever the batch size, the process or the device."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == x.shape[0], f"{len(generator)} generators for a batch of {x.shape[0]}"
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
        return noise.to(x.device, torch.float32)
    return torch.randn(x.shape, generator=generator, device="cpu").to(x.device, torch.float32)


# -----------------------------------------------------------------------------
# 3. The dense signal of Flow-OPD (paper, "Deriving the Dense KL Reward")
#
# Student and teacher steps from the same x_t share std (it depends only on t), and their means
# differ only through v: mean_s - mean_T = (v_s - v_T) (1 + s_t^2 (1 - t) / (2t)) dt. So the KL
# between the two Gaussians is a time-weighted squared velocity distance:
#     KL = ||mean_s - mean_T||^2 / (2 std^2) = w(t) ||v_s - v_T||^2,
#     w(t) = (|dt| / 2) * (s_t (1 - t) / (2t) + 1 / s_t)^2
# (per dimension here: the squared distance is averaged over latent dims, like the log-prob).


def kl_weight(sigma, sigma_next, noise_level=0.7):
    """w(t) of the dense KL. Python floats or tensors in, float32 tensor out (same shape)."""
    if noise_level <= 0:
        raise ValueError(f"the KL between SDE steps needs noise_level > 0 (got {noise_level}): "
                         f"the ODE step has no density")
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    s_t = _noise_scale(sigma, sigma_next, noise_level)
    dt = (sigma_next - sigma).abs()
    return dt / 2 * (s_t * (1 - sigma) / (2 * sigma) + 1 / s_t) ** 2


def velocity_kl(v_student, v_teacher, sigma, sigma_next, noise_level=0.7):
    """KL(pi_student || pi_teacher) of one SDE step, per dimension, shape (B,): w(t) mean((v_s - v_T)^2).

    Gradients flow into whichever velocity requires grad (usually the student's)."""
    diff2 = (v_student.float() - v_teacher.float()) ** 2
    diff2 = diff2.mean(dim=tuple(range(1, diff2.ndim)))
    w = kl_weight(sigma, sigma_next, noise_level).to(diff2.device)
    return w.reshape(-1) * diff2 if w.ndim else w * diff2


# -----------------------------------------------------------------------------
# 4. Sampling: CFG velocity and whole trajectories


def predict_velocity(world, latents, sigma, embeds, pooled, guidance_scale, null=None):
    """v(x_t, t, c) with classifier-free guidance as SD3 does it: one batched forward of [uncond; cond],
    v = v_u + g (v_c - v_u). sigma: float or (B,). null: the empty prompt's (embeds, pooled), (1, ...)
    or (B, ...). Returns float32 (B, C, h, w). Gradients flow when the caller enables them."""
    B = latents.shape[0]
    t = torch.as_tensor(sigma, dtype=torch.float32, device=world.device).expand(B) * 1000
    x = latents.to(world.device, world.dtype)
    embeds, pooled = embeds.to(world.dtype), pooled.to(world.dtype)  # a float32 copy (full fine-tuning) of a bf16 cache
    if guidance_scale is None or guidance_scale <= 1:
        v = world.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                              timestep=t, return_dict=False)[0]
        return v.float()
    if null is None:
        null = world.encode_prompts([""])
    null_embeds, null_pooled = (n.to(world.dtype).expand(B, *n.shape[1:]) for n in null)
    v = world.transformer(
        hidden_states=torch.cat([x, x]),
        encoder_hidden_states=torch.cat([null_embeds, embeds]),
        pooled_projections=torch.cat([null_pooled, pooled]),
        timestep=torch.cat([t, t]),  # float32, as diffusers' pipeline and Flow-GRPO pass it (bf16 rounds 913.35 to 912)
        return_dict=False,
    )[0].float()
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def sample_seed(*parts):
    """A 62-bit seed from integers (run seed, epoch, sample index, ...): sample i of epoch e gets the
    same noise on any rank, in any batch, and after a resume."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint64)[0] >> 2)


def epoch_seeds(seed, epoch, indices, group_size, same_latent=False):
    """The noise seeds of the global samples `indices` of an RL epoch: each sample's own seed (its SDE
    steps' noise, and its initial noise unless shared) and, with same_latent, one initial-noise seed per
    group (sample i is in group i // group_size), else None. Returns (seeds, init_seeds) for sample()."""
    seeds = [sample_seed(seed, epoch, i) for i in indices]
    init_seeds = [sample_seed(seed, epoch, -1000 - i // group_size) for i in indices] if same_latent else None
    return seeds, init_seeds


def seed_generators(seeds):
    """One CPU torch.Generator per sample (per-sample seeding)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sde_window_steps(steps, window, seed, epoch, start=None):
    """Flow-GRPO-Fast's SDE window: only `window` consecutive steps are stochastic (and trained), the
    rest are exact ODE steps. The window starts at a step drawn per epoch (the same on every rank)
    from the first half of the trajectory, where composition is decided, or at `start` when given.
    window 0 = every step (Flow-GRPO). The reward of an image then depends on the noise of those few
    steps only, and no late-step noise is left in the image: credit assignment is far sharper for
    the same samples."""
    if start is not None:
        if not (window and 0 <= start <= steps - window):
            raise ValueError(f"window start {start} needs an SDE window (window > 0) that fits in the {steps} steps")
        return list(range(start, start + window))
    if not window:
        return list(range(steps))
    if window > steps:
        raise ValueError(f"sde window {window} is longer than the trajectory ({steps} steps)")
    last_start = max(steps // 2 - window, 0)
    start = int(torch.randint(0, last_start + 1, (1,),
                              generator=torch.Generator().manual_seed(sample_seed(seed, epoch, -99))))
    return list(range(start, start + window))


@torch.no_grad()
def sample(world, prompts, steps=None, guidance_scale=None, noise_level=0.7, generator=None, seeds=None, decode=True,
           batch_size=None, sde_steps=None, init_seeds=None, on_batch=None):
    """Run the SDE (noise_level > 0) or the ODE (noise_level = 0) from pure noise.

    prompts: list of B strings. seeds: B integers; sample i draws its initial noise and every step's
    noise from its own generator seeded with seeds[i], so it is the same sample whatever batch or
    process it is drawn in (this is what lets distributed runs equal single-process runs). Without
    seeds they are drawn from `generator` (a torch.Generator, or the global RNG). batch_size: images
    per forward (None = all at once). sde_steps: the step indices that use noise_level (None = all);
    the others are deterministic Euler steps with log_prob 0 (sde_window_steps). init_seeds: B integers
    that seed the initial noise x_1 alone (samples given the same one start from the same x_1, as
    Flow-GRPO's same_latent / DanceGRPO's shared group noise); None = x_1 from seeds' generators.
    on_batch(start, images): called with each decoded batch as soon as it exists, so that a caller can
    score it in the background while the next batch samples (Flow-GRPO overlaps the two the same way).
    Returns a dict: latents (B, T+1, C, h, w) float32 on the world's device (x_1 ... x_0),
    log_probs (B, T), sigmas (T+1,), embeds/pooled (the prompts' conditioning), seeds, images
    (B, 3, H, W) float32 in [0, 1] on the CPU when decode."""
    steps = steps or world.defaults["train_steps"]
    guidance_scale = world.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    if seeds is None:
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
    batch_size = batch_size or len(prompts)
    sigmas = sd3_sigmas(steps, world.defaults["shift"])
    null = world.encode_prompts([""])
    parts = []
    for b in range(0, len(prompts), batch_size):
        gens = seed_generators(seeds[b: b + batch_size])
        embeds, pooled = world.encode_prompts(prompts[b: b + batch_size])
        if init_seeds is None:
            x = torch.stack([torch.randn(world.latent_shape, generator=g) for g in gens])  # x_1 ~ N(0, I)
        else:
            x = torch.stack([torch.randn(world.latent_shape, generator=g)
                             for g in seed_generators(init_seeds[b: b + batch_size])])
        x = x.to(world.device)
        latents, log_probs = [x], []
        for i in range(steps):
            v = predict_velocity(world, x, sigmas[i].item(), embeds, pooled, guidance_scale, null)
            a = noise_level if sde_steps is None or i in sde_steps else 0.0
            x, log_prob, _, _ = sde_step_with_logprob(v, sigmas[i].item(), sigmas[i + 1].item(), x, a, generator=gens)
            latents.append(x)
            log_probs.append(log_prob)
        part = dict(latents=torch.stack(latents, dim=1), log_probs=torch.stack(log_probs, dim=1), embeds=embeds,
                    pooled=pooled)
        if decode:
            part["images"] = world.decode(x)
            if on_batch is not None:
                on_batch(b, part["images"])
        parts.append(part)
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out.update(sigmas=sigmas, seeds=list(seeds))
    return out


# -----------------------------------------------------------------------------
# 5. Objectives: Flow-GRPO's policy gradient (grpo_expert.py) and Flow-OPD's distillation (opd.py)


def group_advantages(rewards, groups, std_scope="global", eps=1e-4, clip=5.0):
    """Flow-GRPO's advantage: A_i = (r_i - mean of i's group) / (std + eps), clipped to +-clip.
    rewards (N,), groups (N,) integer group ids (one group = the G images of one prompt). std_scope
    "global" divides by the std of the whole batch (Flow-GRPO's default), "group" by the group's own.
    Returns (advantages (N,), keep (N,) bool): groups whose rewards are all equal carry no signal and
    are skipped (keep = False)."""
    rewards = rewards.float()
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    var = torch.zeros_like(count).index_add_(0, inverse, centred**2) / count
    if std_scope == "global":
        std = rewards.std(unbiased=False).expand_as(rewards)
    elif std_scope == "group":
        std = var.sqrt()[inverse]
    else:
        raise ValueError(f"std_scope must be 'global' or 'group', got {std_scope!r}")
    advantages = (centred / (std + eps)).clamp(-clip, clip)
    keep = var[inverse] > 0
    return advantages, keep


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """PPO's clipped objective as a loss (Flow-GRPO eq. 8): max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),
    rho = exp(log_prob - old_log_prob). Per sample (B,); returns (loss, rho)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def route_targets(tasks, routing, velocity_of):
    """Flow-OPD's task routing: v_target(x_t, c) = sum_k alpha_k(c) v_k(x_t, c). tasks: the B samples'
    task names; routing: {task: {teacher: alpha}} (hard routing is {task: {task: 1}}); velocity_of(teacher,
    rows) -> the teacher's velocities (len(rows), ...) for those samples only. Each teacher is called
    once, batched, on exactly the samples routed to it: never on another task's prompts."""
    target = None
    for teacher in dict.fromkeys(k for t in tasks for k in routing[t]):
        rows = [i for i, t in enumerate(tasks) if teacher in routing[t]]
        alpha = torch.tensor([routing[tasks[i]][teacher] for i in rows])
        v = velocity_of(teacher, rows)
        if target is None:
            target = torch.zeros(len(tasks), *v.shape[1:], dtype=v.dtype, device=v.device)
        target[rows] += alpha.to(v).reshape(-1, *([1] * (v.ndim - 1))) * v
    return target


def opd_pg_loss(kind, v, v_target, x_t, x_next, old_log_prob, sigma, sigma_next, noise_level, clip_range, adv_clip,
                kl_scale=1.0):
    """The policy-gradient readings of Flow-OPD's loss at one step, per sample (B,): PPO's clipped surrogate
    on the sampled action x_next, with an advantage clamped to +-adv_clip
      kind "pg":        r_t = -kl_scale w(t) ||sg(v_theta) - v_T||^2 (the published form; r_t is a function of
                        the state only, so its expected gradient is zero)
      kind "pg-sample": r_t = -(log pi_theta_old(x_next|x_t) - log pi_T(x_next|x_t)) on the sampled action
                        (LLM on-policy distillation)
    v: the student's velocity now (with grad); old_log_prob: the student's log-prob of x_next at sampling.
    The default reading, "direct", is the KL itself: kl_scale * velocity_kl(v, v_target, ...)."""
    _, log_prob, _, _ = sde_step_with_logprob(v, sigma, sigma_next, x_t, noise_level, prev_sample=x_next)
    if kind == "pg":
        advantage = -(kl_scale * velocity_kl(v.detach(), v_target, sigma, sigma_next, noise_level))
    elif kind == "pg-sample":
        _, teacher_log_prob, _, _ = sde_step_with_logprob(v_target, sigma, sigma_next, x_t, noise_level,
                                                          prev_sample=x_next)
        advantage = -(old_log_prob - teacher_log_prob)
    else:
        raise ValueError(f"unknown OPD loss {kind!r}: direct, pg or pg-sample")
    loss, _ = clipped_surrogate(log_prob, old_log_prob, advantage.clamp(-adv_clip, adv_clip), clip_range)
    return loss
