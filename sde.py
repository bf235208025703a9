"""
sde.py: the shared core of Flow-OPD. Every stage script imports this file and nothing else of ours
(besides rewards.py). Read it next to the paper:

  1. schedule         SD3's shifted flow-matching sigmas                      sd3_sigmas
  2. ODE -> SDE        one Euler-Maruyama step as a Gaussian policy (Flow-GRPO)  sde_step_with_logprob
  3. dense KL          closed-form reverse KL between two such steps (Flow-OPD)  kl_weight, velocity_kl
  4. worlds            the tiny world and SD3.5-Medium behind one interface      World, load_world
  5. sampling          CFG velocity and whole SDE/ODE trajectories               predict_velocity, sample
  6. LoRA              peft adapters on the transformer, diffusers-loadable      add_lora, save_lora, load_lora
  7. policy gradient   Flow-GRPO's advantages and PPO-clipped surrogate          group_advantages, clipped_surrogate
  8. run plumbing      settings, torch.distributed, atomic files, checkpoints    parse_settings, setup_distributed, ...

Notation (SD3): x_0 is the image latent, x_1 is noise, x_t = (1 - t) x_0 + t x_1 with t = sigma,
the network predicts the velocity v = x_1 - x_0, and sampling integrates from sigma = 1 to 0, so
every step has dt = sigma_next - sigma < 0.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import tempfile
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch

# Quiet the libraries' start-up chatter (torchvision fallbacks, several-adapter notices): the scripts'
# own output is what a reader follows.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

HERE = os.path.dirname(os.path.abspath(__file__))

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
        raise ValueError(f"the KL between SDE steps needs noise_level > 0 (got {noise_level}): the ODE step has no density")
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
# 4. Worlds: the tiny world and Stable Diffusion 3.5 Medium behind one small interface


@dataclasses.dataclass
class World:
    kind: str  # "tiny" or "sd3"
    name: str  # "tiny" or the pipeline folder / hub id
    transformer: torch.nn.Module  # SD3Transformer2DModel (frozen base; LoRA adapters go on top)
    encode_prompts: callable  # list[str] -> (embeds (B, L, D), pooled (B, P)), cached per prompt
    decode: callable  # latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1] on the CPU
    latent_shape: tuple  # (C, h, w)
    device: torch.device
    dtype: torch.dtype  # the transformer's compute dtype (bf16 on GPU for sd3)
    defaults: dict  # the world's sampling defaults: shift, train/eval steps, guidance, resolution, noise level, SDE window
    tasks: tuple  # task names with a reward in this world


# The settings of the paper (Flow-GRPO's): 512 px, shift 3.0, T = 10 SDE steps for training,
# 40 ODE steps for evaluation, CFG 4.5, noise level a = 0.7.
SD3_DEFAULTS = dict(resolution=512, shift=3.0, train_steps=10, eval_steps=40, guidance_scale=4.5, noise_level=0.7, max_sequence_length=128,
                    sde_window=0)  # 0: every step is stochastic (Flow-GRPO, the paper); see sde_window_steps
TASKS = ("geneval", "ocr", "deqa", "pickscore")


def _cached(encode):
    """Prompt embeddings are computed once per prompt: RL samples the same prompts G times."""
    cache = {}

    def cached_encode(prompts):
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            embeds, pooled = encode(missing)
            for i, p in enumerate(missing):
                cache[p] = (embeds[i], pooled[i])
        return torch.stack([cache[p][0] for p in prompts]), torch.stack([cache[p][1] for p in prompts])

    return cached_encode


def load_world(name="tiny", device=None, dtype=None):
    """`load_world("tiny")`: the project's tiny world (shipped weights, CPU-friendly).
    `load_world(path_or_hub_id)`: Stable Diffusion 3.5 Medium through diffusers. Text encoders and VAE
    are frozen; bf16 on GPU, float32 on CPU unless `dtype` says otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "tiny":
        import tiny_world

        transformer, encode = tiny_world.load_base(device=device)
        transformer.requires_grad_(False)
        defaults = dict(
            resolution=tiny_world.IMAGE_SIZE, shift=tiny_world.SHIFT, train_steps=10,
            eval_steps=tiny_world.DEFAULT_STEPS_EVAL, guidance_scale=tiny_world.DEFAULT_GUIDANCE,
            noise_level=tiny_world.DEFAULT_NOISE_LEVEL, sde_window=tiny_world.DEFAULT_SDE_WINDOW,
        )
        decode = lambda latents: tiny_world.latents_to_images(latents.float().cpu())
        return World("tiny", "tiny", transformer, _cached(encode), decode, tuple(tiny_world.LATENT_SHAPE),
                     device, torch.float32, defaults, tuple(tiny_world.TASKS))
    return _load_sd3(name, device, dtype)


def _load_sd3(path, device, dtype):
    from diffusers import StableDiffusion3Pipeline

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SystemExit(f"error: {path} is not a Stable Diffusion 3 pipeline folder (no model_index.json); pass the SD3.5-Medium folder or hub id")
    if not os.path.exists(path) and path.count("/") != 1:
        raise SystemExit(f"error: world {path!r} is neither 'tiny', an existing folder, nor a hub id like stabilityai/stable-diffusion-3.5-medium")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load an SD3 pipeline from {path!r}: {str(e).splitlines()[0]}")
    pipe.to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
    d = dict(SD3_DEFAULTS)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    d["resolution"] = min(d["resolution"], pipe.transformer.config.sample_size * vae_scale)
    latent_shape = (pipe.transformer.config.in_channels, d["resolution"] // vae_scale, d["resolution"] // vae_scale)

    @torch.no_grad()
    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=d["max_sequence_length"])
        return embeds.to(dtype), pooled.to(dtype)

    @torch.no_grad()
    def decode(latents):
        latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    world = World("sd3", str(path), pipe.transformer, _cached(encode), decode, latent_shape, device, dtype, d, TASKS)
    world.pipeline = pipe  # kept for users who want the diffusers pipeline (e.g. load_lora_weights)
    return world


# -----------------------------------------------------------------------------
# 5. Sampling: CFG velocity and whole trajectories


def predict_velocity(world, latents, sigma, embeds, pooled, guidance_scale, null=None):
    """v(x_t, t, c) with classifier-free guidance as SD3 does it: one batched forward of [uncond; cond],
    v = v_u + g (v_c - v_u). sigma: float or (B,). null: the empty prompt's (embeds, pooled), (1, ...)
    or (B, ...). Returns float32 (B, C, h, w). Gradients flow when the caller enables them."""
    B = latents.shape[0]
    t = torch.as_tensor(sigma, dtype=torch.float32, device=world.device).expand(B) * 1000
    x = latents.to(world.device, world.dtype)
    if guidance_scale is None or guidance_scale <= 1:
        v = world.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                              timestep=t.to(world.dtype), return_dict=False)[0]
        return v.float()
    if null is None:
        null = world.encode_prompts([""])
    null_embeds, null_pooled = (n.expand(B, *n.shape[1:]) for n in null)
    v = world.transformer(
        hidden_states=torch.cat([x, x]),
        encoder_hidden_states=torch.cat([null_embeds, embeds]),
        pooled_projections=torch.cat([null_pooled, pooled]),
        timestep=torch.cat([t, t]).to(world.dtype),
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


def sde_window_steps(steps, window, seed, epoch):
    """Flow-GRPO-Fast's SDE window: only `window` consecutive steps are stochastic (and trained), the
    rest are exact ODE steps. The window starts at a step drawn per epoch (the same on every rank)
    from the first half of the trajectory, where composition is decided. window 0 = every step
    (Flow-GRPO). The reward of an image then depends on the noise of those few steps only, and no
    late-step noise is left in the image: credit assignment is far sharper for the same samples."""
    if not window:
        return list(range(steps))
    if window > steps:
        raise ValueError(f"sde window {window} is longer than the trajectory ({steps} steps)")
    last_start = max(steps // 2 - window, 0)
    start = int(torch.randint(0, last_start + 1, (1,), generator=torch.Generator().manual_seed(sample_seed(seed, epoch, -99))))
    return list(range(start, start + window))


@torch.no_grad()
def sample(world, prompts, steps=None, guidance_scale=None, noise_level=0.7, generator=None, seeds=None, decode=True,
           batch_size=None, sde_steps=None, init_seeds=None):
    """Run the SDE (noise_level > 0) or the ODE (noise_level = 0) from pure noise.

    prompts: list of B strings. seeds: B integers; sample i draws its initial noise and every step's
    noise from its own generator seeded with seeds[i], so it is the same sample whatever batch or
    process it is drawn in (this is what lets distributed runs equal single-process runs). Without
    seeds they are drawn from `generator` (a torch.Generator, or the global RNG). batch_size: images
    per forward (None = all at once). sde_steps: the step indices that use noise_level (None = all);
    the others are deterministic Euler steps with log_prob 0 (sde_window_steps). init_seeds: B integers
    that seed the initial noise x_1 alone (samples given the same one start from the same x_1, as
    Flow-GRPO's same_latent / DanceGRPO's shared group noise); None = x_1 from seeds' generators.
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
            x = torch.stack([torch.randn(world.latent_shape, generator=g) for g in seed_generators(init_seeds[b: b + batch_size])])
        x = x.to(world.device)
        latents, log_probs = [x], []
        for i in range(steps):
            v = predict_velocity(world, x, sigmas[i].item(), embeds, pooled, guidance_scale, null)
            a = noise_level if sde_steps is None or i in sde_steps else 0.0
            x, log_prob, _, _ = sde_step_with_logprob(v, sigmas[i].item(), sigmas[i + 1].item(), x, a, generator=gens)
            latents.append(x)
            log_probs.append(log_prob)
        part = dict(latents=torch.stack(latents, dim=1), log_probs=torch.stack(log_probs, dim=1), embeds=embeds, pooled=pooled)
        if decode:
            part["images"] = world.decode(x)
        parts.append(part)
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out.update(sigmas=sigmas, seeds=list(seeds))
    return out


# -----------------------------------------------------------------------------
# 6. LoRA adapters (peft, through diffusers' PeftAdapterMixin), saved so that diffusers'
#    StableDiffusion3Pipeline.load_lora_weights reads them

# Flow-GRPO's target modules: every attention projection of the joint (image + text) blocks.
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


def add_lora(transformer, name="default", rank=32, alpha=64, targets=LORA_TARGETS, seed=0):
    """Attach a fresh LoRA adapter (A ~ Gaussian from `seed`, B = 0: the model is unchanged) and make it
    the active one. The seed keeps A independent of whatever used the global RNG before."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=name)
    transformer.set_adapter(name)
    return [p for n, p in transformer.named_parameters() if f".{name}." in n]


def lora_parameters(transformer, name):
    """The adapter's parameters, in a fixed order (for the optimizer, all-reduce and checkpoints)."""
    return {n: p for n, p in transformer.named_parameters() if f".{name}." in n and "lora_" in n}


def save_lora(transformer, name, path, state_dict=None):
    """Write adapter `name` of the transformer to `path` (see write_lora). state_dict overrides the
    weights (e.g. the EMA copy), keyed like lora_parameters or like peft's get_peft_model_state_dict."""
    from peft.utils import get_peft_model_state_dict

    if state_dict is None:
        weights = get_peft_model_state_dict(transformer, adapter_name=name)
    else:  # e.g. an EMA copy keyed like lora_parameters ('...lora_A.<name>.weight'): drop the adapter name
        weights = {k.replace(f".{name}.", "."): v for k, v in state_dict.items()}
    write_lora(path, weights, transformer.peft_config[name].to_dict())


def write_lora(path, weights, config):
    """One diffusers-format safetensors file, written atomically: keys 'transformer.<module>.lora_A.weight'
    and the peft LoraConfig (rank, alpha, targets) in the metadata, exactly what
    StableDiffusion3Pipeline.save_lora_weights writes and load_lora_weights reads.
    weights: {'<module>.lora_A.weight': tensor, ...}; config: a LoraConfig as a dict."""
    from diffusers import StableDiffusion3Pipeline

    weights = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    config = dict(config)
    config["target_modules"] = sorted(config["target_modules"])
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=weights, transformer_lora_adapter_metadata=config)
        os.chmod(os.path.join(tmp, "pytorch_lora_weights.safetensors"), 0o644)
        os.replace(os.path.join(tmp, "pytorch_lora_weights.safetensors"), path)


def read_lora(path):
    """(weights keyed like peft's state dict without the 'transformer.' prefix, peft config dict)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SystemExit(f"error: LoRA file {path} does not exist")
    try:
        with safe_open(path, "pt") as f:
            weights = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SystemExit(f"error: {path} is not a readable safetensors LoRA file ({e})")
    if "lora_adapter_metadata" not in meta:
        raise SystemExit(f"error: {path} has no LoRA config in its metadata; expected a file written by sde.save_lora or diffusers' save_lora_weights")
    config = {k.removeprefix("transformer."): v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
    return weights, config


def load_lora(transformer, path, name, trainable=False):
    """Attach the LoRA saved at `path` as adapter `name` (exact weights, rank and alpha from the file).
    The adapter that was active stays active (the first adapter loaded becomes the active one); the new
    adapter is frozen unless `trainable` (teachers are frozen, a student initialised from a file is not)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    weights, config = read_lora(path)
    keep = {f.name for f in dataclasses.fields(LoraConfig)}
    config = LoraConfig(**{k: v for k, v in config.items() if k in keep and k not in ("peft_type", "task_type")})
    previous = list(transformer.active_adapters()) if getattr(transformer, "_hf_peft_config_loaded", False) else []
    grads = {n: p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n}
    transformer.add_adapter(config, adapter_name=name)
    result = set_peft_model_state_dict(transformer, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if result.unexpected_keys or missing:
        transformer.delete_adapters(name)
        raise SystemExit(f"error: {path} does not fit this transformer (unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")
    if previous:
        transformer.set_adapter(previous if len(previous) > 1 else previous[0])
    for n, p in transformer.named_parameters():
        if n in grads:
            p.requires_grad_(grads[n])
    params = lora_parameters(transformer, name)
    for p in params.values():
        p.requires_grad_(trainable)
    return params


@contextlib.contextmanager
def adapter(transformer, name):
    """Run the transformer as adapter `name` (None = the bare base model), then restore the previous one.
    peft's set_adapter also flips requires_grad to the active adapter: we restore that too."""
    grads = {n: p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n}
    previous = list(transformer.active_adapters()) if getattr(transformer, "_hf_peft_config_loaded", False) else []
    try:
        if name is None:
            if previous:
                transformer.disable_adapters()
        else:
            transformer.enable_adapters()
            transformer.set_adapter(name)
        yield
    finally:
        if previous:
            transformer.enable_adapters()
            transformer.set_adapter(previous if len(previous) > 1 else previous[0])
        for n, p in transformer.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])


# -----------------------------------------------------------------------------
# 7. Policy-gradient maths shared by grpo_expert.py (Flow-GRPO) and opd.py's policy-gradient variants


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


def opd_loss(kind, v, v_target, log_prob, old_log_prob, step_reward, sigma, sigma_next, noise_level, clip_range, adv_clip):
    """Flow-OPD's distillation loss at one step, per sample (B,), and the KL it is built from.
    kind "direct":    KL_t = w(t) ||v_theta - v_T||^2 itself (gradient through v_theta)
    kind "pg":        PPO surrogate with advantage r_t = -w(t) ||sg(v_theta) - v_T||^2 (the published form;
                      r_t is a function of the state only, so its expected gradient is zero)
    kind "pg-sample": PPO surrogate with the sampled action's log-ratio step_reward =
                      -(log pi_theta(a|x_t) - log pi_T(a|x_t)) (LLM on-policy distillation)
    log_prob: the student's log-prob of the sampled action now (with grad), old_log_prob: at sampling."""
    kl = velocity_kl(v, v_target, sigma, sigma_next, noise_level)
    if kind == "direct":
        return kl, kl
    if kind == "pg":
        advantage = -kl.detach()
    elif kind == "pg-sample":
        advantage = step_reward
    else:
        raise ValueError(f"unknown OPD loss {kind!r}: direct, pg or pg-sample")
    loss, _ = clipped_surrogate(log_prob, old_log_prob, advantage.clamp(-adv_clip, adv_clip), clip_range)
    return loss, kl


# -----------------------------------------------------------------------------
# 8. Run plumbing shared by the stage scripts: settings, distributed, files, checkpoints, logs


def parse_settings(doc, settings, argv=None):
    """settings: {name: (default, meaning)} or {name: (default, type, meaning)} (when default is None).
    Each becomes `--name-with-dashes`; booleans get --x / --no-x. Returns a SimpleNamespace."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, spec in settings.items():
        default, meaning = spec[0], spec[-1]
        kind = spec[1] if len(spec) == 3 else type(default)
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=meaning)
        else:
            parser.add_argument(flag, default=default, type=kind, help=f"{meaning} (default: {default})")
    return SimpleNamespace(**vars(parser.parse_args(argv)))


def setup_distributed():
    """One code path for 1 process and torchrun: NCCL on GPUs, gloo on CPUs. Returns a namespace with
    rank, world_size, local_rank, device and master (gates printing, saving and logging)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return SimpleNamespace(rank=rank, world_size=world_size, local_rank=local_rank, device=device, master=rank == 0)


def gather_cat(tensor, dist):
    """Concatenate a per-rank tensor over ranks, in rank order (equal sizes on every rank)."""
    if dist.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(params, dist):
    """Sum the gradients of `params` over ranks. Each rank back-propagates sum(its samples' losses) / N,
    N the GLOBAL number of samples, so the sum over ranks is exactly the global mean whatever the world
    size (DDP's hooks assume one forward per step; LoRA training switches adapters between forwards, so
    this is written out). One flat buffer, one collective."""
    if dist.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write(path, data):
    """Write bytes or text to `path` through a temp file + rename: readers never see half a file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results and checkpoints are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_tensors(path, tensors, metadata=None):
    """safetensors file, written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, save(tensors, metadata=metadata))


def load_tensors(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _flatten(obj, prefix, tensors):
    """Split a nested state (dicts, lists, tensors, numbers) into a tensor dict and a JSON skeleton."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(skeleton, tensors):
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict):
        return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(run_dir, step, state, keep=2):
    """Everything needed to resume exactly (trainable weights, EMA, optimizer, RNG, counters), nested
    dicts of tensors and numbers, as run_dir/checkpoints/step_XXXXXX.safetensors. The file is written
    atomically and then `latest` points to it; older checkpoints beyond `keep` are removed."""
    tensors = {}
    skeleton = _flatten(state, "s", tensors)
    folder = os.path.join(run_dir, "checkpoints")
    path = os.path.join(folder, f"step_{step:06d}.safetensors")
    save_tensors(path, tensors, metadata={"state": json.dumps(skeleton)})
    atomic_write(os.path.join(folder, "latest"), os.path.basename(path))
    old = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".safetensors"))
    for f in old[:-keep]:
        os.remove(os.path.join(folder, f))
    return path


def load_checkpoint(run_dir):
    """The state saved by the latest save_checkpoint in run_dir, or None when there is none."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    tensors, meta = load_tensors(path)
    return _unflatten(json.loads(meta["state"]), tensors)


def save_train_state(run_dir, epoch, params, ema, optimizer, opt_step):
    """The RL scripts' checkpoint: trainable weights, their EMA, the optimizer, the counters. Their
    sampling noise and prompt draws derive from (seed, epoch, index), so no RNG state is needed."""
    return save_checkpoint(run_dir, epoch, dict(params={k: p.detach() for k, p in params.items()}, ema=ema,
                                                optimizer=optimizer.state_dict(), epoch=epoch, opt_step=opt_step))


def load_train_state(run_dir, params, ema, optimizer):
    """Restore what save_train_state wrote (in place); returns (epoch, opt_step), (0, 0) when none."""
    state = load_checkpoint(run_dir)
    if state is None:
        return 0, 0
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["params"][k])
        for k, v in ema.items():
            v.copy_(state["ema"][k])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["opt_step"]


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=json.dumps(np.random.get_state()[1].tolist()),
                python=json.dumps(random.getstate()[1]))


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))


def ema_update(ema, params, decay):
    """Exponential moving average of the trainable weights (Flow-GRPO: decay 0.9, every 8 steps)."""
    with torch.no_grad():
        for name, p in params.items():
            ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def log_jsonl(path, record, echo=True):
    """Append one JSON line (logs are append-only; a crash loses at most the line being written)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(record, default=float)
    with open(path, "a") as f:
        f.write(line + "\n")
    if echo:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)


def save_grid(images, path, nrow=8, scale=1):
    """images (N, 3, H, W) in [0, 1] -> one PNG grid, written atomically."""
    import io

    from PIL import Image

    images = (images.clamp(0, 1) * 255).round().byte().cpu()
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((3, nrows * (h + 2), ncol * (w + 2)), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = images[i]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def read_prompts(path):
    """Prompt files in Flow-GRPO's formats: .txt (one prompt per line) or .jsonl (one JSON object per
    line with a "prompt" key; the whole object is the prompt's metadata, e.g. GenEval's tag/include).
    Returns (prompts, metadata)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path} does not exist")
    prompts, metadata = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    item = json.loads(line)
                    prompts.append(item["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f"error: {path}:{n}: expected a JSON object with a \"prompt\" key")
                metadata.append(item)
            else:
                prompts.append(line)
                metadata.append({})
    if not prompts:
        raise SystemExit(f"error: prompt file {path} has no prompts")
    return prompts, metadata


def prompt_file(world, task, split):
    """Where a task's prompts live: prompts/tiny/{task}_{split}.txt in the tiny world, and for SD3
    prompts/sd3/{task}_{split}.jsonl or .txt (copy Flow-GRPO's dataset files there)."""
    folder = os.path.join(HERE, "prompts", world.kind)
    for ext in (".jsonl", ".txt"):
        path = os.path.join(folder, f"{task}_{split}{ext}")
        if os.path.isfile(path):
            return path
    raise SystemExit(f"error: no prompt file for task {task!r} split {split!r} in {folder} (expected {task}_{split}.txt or .jsonl)")


def file_sha256(path):
    """sha256 of a file's bytes: names a checkpoint or prompt file by content (cache keys, cards)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_teachers(spec, world):
    """--teachers 'geneval=a.safetensors,ocr=b.safetensors' -> {task: file}. Empty in the tiny world:
    the shipped experts assets/tiny_experts/<task>.safetensors; empty elsewhere: one error line. The
    file 'base' names the frozen base model itself (opd.py, sft_init.py)."""
    if not spec:
        if world.kind != "tiny":
            raise SystemExit("error: --teachers is required outside the tiny world (task=file pairs)")
        return {t: os.path.join(HERE, "assets", "tiny_experts", f"{t}.safetensors") for t in world.tasks}
    teacher_files = {}
    for part in spec.split(","):
        task, sep, path = part.partition("=")
        if not sep or not path:
            raise SystemExit(f"error: --teachers part {part!r} is not task=file")
        teacher_files[task.strip()] = path.strip()
    return teacher_files


def draw_prompts(task_prompts, task_weights, n, seed, epoch):
    """n (task, prompt, metadata) triples for one epoch, the same on every rank and after a resume (a
    generator seeded by seed and epoch). Each prompt's task is drawn with the weights' odds.
    task_prompts: {task: (prompts, metadata)} as read_prompts returns; task_weights: {task: weight}."""
    rng = np.random.default_rng([seed, epoch])
    names = list(task_weights)
    odds = np.array([task_weights[t] for t in names], dtype=np.float64)
    chosen = []
    for _ in range(n):
        task = names[rng.choice(len(names), p=odds / odds.sum())]
        prompts, metadata = task_prompts[task]
        i = int(rng.integers(len(prompts)))
        chosen.append((task, prompts[i], metadata[i]))
    return chosen


def shard(n_global, dist, what="images per epoch"):
    """This rank's contiguous block [first, first + n_local) of n_global samples."""
    if n_global % dist.world_size:
        raise SystemExit(f"error: {n_global} {what} must be divisible by the {dist.world_size} ranks: change the batch settings or the number of processes")
    n_local = n_global // dist.world_size
    return dist.rank * n_local, n_local


class Timer:
    """Seconds per phase, for the logs: `with timer("sampling"): ...`."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
