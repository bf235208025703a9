"""
bench/speed.py: where the time of one iteration of each stage goes, and how far it is from the floor
(issue #16). A benchmark script, not a timed test.

The stage scripts (grpo_expert.py, sft_init.py, opd.py) are top-level scripts, so this file re-creates
ONE iteration of each from the same sde / worlds / rewards calls, in the same order, with the same
batch sizes, steps, CFG, trained / distilled steps, teacher routing and MAR anchor (the functions
grpo_iteration, sft_iteration, opd_iteration below follow the scripts' loops line by line as of commit
6969c5b, divergence guard and SD3's encode-once prompt cache included; keep them in step when a script
changes). Left out: checkpoints, logs, grids, the SFT cache's shard files, and opd.py's fewer-calls options
(--distil-steps, the anchor's reuse on samples routed to it): this times the paper's setting, and
bench/gain_per_call.py weighs those options' calls against the gain they keep. On one world and one
transformer it measures, per stage:

  phases     wall seconds of sampling, rewards, frozen forwards (GRPO's KL reference, OPD's teachers
             + MAR anchor, SFT's base regulariser) and training (forward, backward, optimizer, EMA)
  counts     transformer forwards and backwards per image, COUNTED by a forward hook on the
             transformer and a gradient hook on its output (rows: CFG's [uncond; cond] batch counts
             2 per image), beside the same count at the paper's settings (T = 10, 9 trained steps,
             CFG, SDE on every step, 4 teachers + anchor: PAPER-NOTES' ~74 forwards + 18 backwards
             per image for OPD)
  floor      the same transformer calls alone: every distinct call (input shapes, grad or not,
             back-propagated or not, active adapter) timed in a tight loop on random inputs (median
             of --floor-reps), times the number of such calls the iteration made
  ratios     iteration / floor per stage (target <= 1.10 on CPU), OPD / GRPO iteration at equal
             batch (target <= 1.3)
  memory     the 4 teachers + a MAR anchor (+ the student) as LoRA adapters on one base against
             separate full copies: parameter + buffer bytes (exact), the RSS (CPU) or CUDA memory
             that loading them took, peak RSS / torch.cuda.max_memory_allocated per stage, and the
             same byte count at SD3.5-Medium's size (meta device, no memory; target <= 1.2x one model)
  FLOPs      torch.utils.flop_counter.FlopCounterMode on one call of every distinct kind: model
             TFLOP/s of the iteration and of the floor, and the MFU against --peak-tflops (GPU)
  profile    a stage above the 1.10 target is run once more under cProfile with the profiler
             switched off inside the transformer's forward and backward: what is left is the
             non-model cost, listed as file:function, seconds

Worlds
  tiny                 the project's tiny world (shipped base and experts; tiny rewards)
  sd3-tiny             a tiny RANDOM SD3 pipeline (tests/sd3_tiny.build_tiny_sd3) built in a temp dir,
                       loaded through diffusers like SD3.5-M (random LoRA teachers, stub rewards)
  sd3-random-medium    a random-weight SD3Transformer2DModel with SD3.5-Medium's config (--scale full)
                       or the same architecture at tiny width (--scale tiny, for CPU tests), random text
                       embeddings of SD3's shapes, a stub decoder and stub rewards (no weights needed)
  <folder>             an SD3 pipeline folder (random LoRA teachers unless --teachers; stub rewards
                       unless --rewards real, which needs the reward servers / models)

Commands (from the repository root)
  tiny world, CPU (~2 min):        python bench/speed.py
  tiny random SD3 pipeline, CPU:   python bench/speed.py --world sd3-tiny
  SD3.5-M-sized, one GPU:          bash bench/gpu.sh      (see there: <= 8 minutes on one H100 / H200)
  the GPU check's code on a CPU:   python bench/speed.py --world sd3-random-medium --scale tiny --device cpu
Writes --out (default results/bench/speed_<world>.json).
"""

import contextlib
import copy
import cProfile
import functools
import math
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: bench/ sits above nothing
import rewards  # noqa: E402
import runs  # noqa: E402
import sde  # noqa: E402
import worlds  # noqa: E402

SETTINGS = dict(
    world=("tiny", "tiny | sd3-tiny | sd3-random-medium | an SD3 pipeline folder (see the docstring)"),
    scale=("full", "sd3-random-medium: 'full' (SD3.5-Medium's transformer config) or 'tiny' (the same architecture at tiny width)"),
    device=(None, str, "cpu | cuda (default: cuda when available)"),
    stages=("grpo,sft,opd", "stages to time, in this order"),
    iters=(1, "measured iterations per stage (the table shows their mean)"),
    warmup=(1, "unmeasured short iterations per stage first (the same batches with 2 steps: first-call costs of kernel choice, allocator, caches)"),
    out=(None, str, "JSON output (default results/bench/speed_<world>.json)"),
    # the stages' batch settings: the scripts' defaults
    prompts_per_epoch=(8, "RL stages: prompts per iteration (grpo_expert.py / opd.py --prompts-per-epoch)"),
    group_size=(8, "RL stages: images per prompt (--group-size)"),
    sample_batch=(16, "images per sampling forward (--sample-batch; sft_init.py's too)"),
    train_batch=(16, "RL stages: images per training / teacher forward (--train-batch)"),
    updates_per_epoch=(2, "RL stages: optimizer steps per iteration (--updates-per-epoch)"),
    sft_batch=(None, int, "SFT: items per optimizer step (default: prompts-per-epoch x group-size, the RL stages' batch); the iteration also generates the teacher cache of that many items"),
    sft_train_batch=(32, "SFT: items per training forward (sft_init.py --train-batch)"),
    sft_sample_steps=(None, int, "SFT: teacher sampling steps (default: the world's eval steps, as sft_init.py)"),
    steps=(None, int, "T: SDE steps (default: the world's, 10)"),
    sde_window=(None, int, "SDE window (default: the world's: 2 tiny, 0 = every step on SD3)"),
    guidance_scale=(None, float, "CFG scale (default: the world's)"),
    grpo_task=("geneval", "GRPO: the task trained (grpo_expert.py --task; sets the KL beta)"),
    grpo_window0=(True, "when the world's SDE window is not 0, also time GRPO training every step (grpo-w0): the OPD / GRPO ratio at equal trained steps, as on SD3.5-M"),
    mar_weight=(0.02, "OPD: MAR lambda (opd.py --mar-weight; > 0 adds the anchor's forwards)"),
    teachers=("", "task=file LoRA teachers (default: the tiny world's shipped experts; random LoRAs elsewhere)"),
    rewards=("auto", "auto: the scripts' reward functions in the tiny world, a stub (mean pixel) elsewhere | stub | real"),
    lora_rank=(32, "LoRA rank of fresh adapters (students, random teachers)"),
    lora_alpha=(64, "LoRA alpha"),
    dtype=(None, str, "float32 | bfloat16 (default: bf16 on CUDA, float32 on CPU, as worlds.load_world)"),
    gradient_checkpointing=(False, "recompute each block's activations in the backward pass (the stage scripts' --gradient-checkpointing)"),
    floor_reps=(3, "timed repetitions of every distinct transformer call for the floor (median)"),
    flops=(True, "count FLOPs (FlopCounterMode) of every distinct call"),
    peak_tflops=(None, float, "the device's dense peak for the MFU (default 989 = H100 SXM / H200 bf16 on CUDA; none on CPU)"),
    profile=("auto", "auto: cProfile the stages above the iteration/floor target | all | none"),
    paper_counts=(True, "also count the forwards / backwards per image at the paper's settings (small batch, counted, not timed)"),
    memory=(True, "measure adapters vs separate copies (+ the SD3.5-M projection on the meta device)"),
    threads=(0, "CPU threads (0 = all cores, or 1 when the load average shows other jobs at the start)"),
    seed=(0, "seed of prompts and noise"),
)

TARGET_FLOOR = 1.10  # iteration / floor, every stage (issue #16, CPU)
TARGET_OPD_GRPO = 1.3  # OPD / GRPO iteration at equal batch
TARGET_MEMORY = 1.2  # 4 teachers + anchor as adapters, in units of one model
H100_BF16_PEAK = 989.0  # TFLOP/s, dense bf16, H100 SXM / H200
PHASES = ("sampling", "rewards", "frozen", "training")
DEFAULT_BETA = {"geneval": 0.04, "ocr": 0.04, "pickscore": 0.01, "deqa": 0.01}  # grpo_expert.py's

# SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# The same architecture (dual attention on the first half of the blocks, RMS q/k norm, 16 latent channels,
# patch 2) at tiny width, for CPU tests of the GPU check's code
SD35_MEDIUM_TINY = dict(SD35_MEDIUM, sample_size=16, num_layers=4, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32,
                        dual_attention_layers=(0, 1))
SD3_TEXT_TOKENS = 77 + worlds.SD3_DEFAULTS["max_sequence_length"]  # CLIP's 77 + T5's 128 (Flow-GRPO's max_sequence_length)

# -----------------------------------------------------------------------------
# Worlds


def _random_sd3_world(device, dtype, scale):
    """A World around a random-weight SD3Transformer2DModel of SD3.5-Medium's shape (scale 'full': 512 px,
    latents 16x64x64, 205 text tokens of width 4096, pooled 2048) or the same architecture at tiny width.
    Text embeddings are random but fixed per prompt; decode is a stub (no VAE): its images are the
    first three latent channels squashed to [0, 1]."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    config = SD35_MEDIUM if scale == "full" else SD35_MEDIUM_TINY
    latent = 64 if scale == "full" else 16
    tokens = SD3_TEXT_TOKENS if scale == "full" else 16
    torch.manual_seed(0)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(bf16)
    try:
        with torch.device(device):  # parameters are created on the device: no CPU init of 2.2B weights
            transformer = SD3Transformer2DModel(**config)
        transformer.to(device=device, dtype=dtype).eval().requires_grad_(False)  # buffers made from numpy land on the CPU
    finally:
        diffusers_logging.set_verbosity(verbosity)

    def encode(prompts):
        embeds, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            embeds.append(torch.randn(tokens, config["joint_attention_dim"], generator=g))
            pooled.append(torch.randn(config["pooled_projection_dim"], generator=g))
        return torch.stack(embeds).to(device, dtype), torch.stack(pooled).to(device, dtype)

    decode = lambda latents: (latents[:, :3].float().tanh() / 2 + 0.5).cpu()
    defaults = dict(worlds.SD3_DEFAULTS, resolution=latent * 8)
    world = worlds.World("sd3", f"sd3-random-medium-{scale}", transformer, worlds._cached(encode), decode,
                         (config["in_channels"], latent, latent), device, dtype, defaults, worlds.TASKS)
    world.transformer_config = dict(config)
    return world


def build_world(name, device, scale="full", dtype=None):
    """(world, cleanup) for the benchmark's world names; cleanup removes a temporary pipeline folder."""
    device = torch.device(device)
    if name == "tiny":
        world = worlds.load_world("tiny", device)
        if dtype is not None and dtype != world.dtype:
            raise SystemExit("error: the tiny world runs in float32 only")
        return world, lambda: None
    if name == "sd3-random-medium":
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return _random_sd3_world(device, dtype, scale), lambda: None
    if name == "sd3-tiny":
        from tests.sd3_tiny import build_tiny_sd3

        tmp = tempfile.TemporaryDirectory(prefix="sd3-tiny-")
        build_tiny_sd3(tmp.name)
        world = worlds.load_world(tmp.name, device, dtype)
        world.display = "sd3-tiny"
        return world, tmp.cleanup
    return worlds.load_world(name, device, dtype), lambda: None


def prompt_file(world, task):
    """The world's training prompts for the task; SD3 worlds without prompts/sd3 files borrow the tiny
    world's (plain English captions: only their count and length matter here)."""
    try:
        return worlds.prompt_file(world, task, "train")
    except SystemExit:
        return os.path.join(ROOT, "prompts", "tiny", f"{task}_train.txt")


def finite_guard(values, counter):
    """runs.assert_finite's work (the stages' divergence guard: a NaN or inf stops a run), counted instead of
    raised: random-weight worlds may produce non-finite values, and the benchmark times, it does not train."""
    values = torch.as_tensor(values).detach().float().reshape(-1).cpu()
    counter["nonfinite"] = counter.get("nonfinite", 0) + len((~torch.isfinite(values)).nonzero())


def stub_reward(images, prompts, metadata=None):
    """A stand-in reward for worlds without reward models: the mean pixel, plus a tiny offset per position so
    that every group has spread (GRPO trains every group) even if a random model's pixels are all NaN or equal."""
    return images.float().mean(dim=(1, 2, 3)).nan_to_num(0.0).cpu() + 1e-3 * torch.arange(len(images))


# -----------------------------------------------------------------------------
# Counting and timing


def active_adapter(transformer):
    """The adapter the transformer runs as now: its name, or None for the bare base (adapters disabled or none)."""
    layers = worlds._lora_layers(transformer) if getattr(transformer, "_hf_peft_config_loaded", False) else []
    if not layers or layers[0]._disable_adapters:
        return None
    active = layers[0]._active_adapter
    return active if isinstance(active, str) else ",".join(active)


class CallCounter:
    """Every transformer call, recorded by a forward hook: phase, rows (images x CFG copies), input shapes,
    dtype, grad mode, active adapter. A forward whose output needs grad gets a gradient hook on that
    output, which counts the backward that reaches it: the counts are what ran, not what the code says."""

    def __init__(self, transformer, timed=None):
        self.phase = "other"
        self.calls = []
        self.enabled = True
        self.backward_seconds = {}
        device = next(transformer.parameters()).device
        self.timed = device.type == "cpu" if timed is None else timed  # on a GPU a per-call time would need a sync per call
        self._start = None
        self._handles = [transformer.register_forward_pre_hook(self._pre),
                         transformer.register_forward_hook(self._forward, with_kwargs=True)]

    def _pre(self, module, args):
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def timing_backwards(self):
        """Time every autograd backward (torch.autograd.backward, which Tensor.backward calls) per phase: with the
        forwards' own times, the model's time INSIDE the iteration, to set against the floor."""
        original = torch.autograd.backward

        def backward(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.backward_seconds[self.phase] = self.backward_seconds.get(self.phase, 0.0) + time.perf_counter() - start

        torch.autograd.backward = backward if self.timed else original
        try:
            yield
        finally:
            torch.autograd.backward = original

    def _forward(self, module, args, kwargs, output):
        if not self.enabled:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        shapes = tuple(tuple(kwargs[k].shape) if torch.is_tensor(kwargs.get(k)) else None
                       for k in ("encoder_hidden_states", "pooled_projections"))
        call = dict(phase=self.phase, rows=int(hidden.shape[0]), shape=(tuple(hidden.shape),) + shapes, dtype=str(hidden.dtype).removeprefix("torch."),
                    grad=torch.is_grad_enabled(), adapter=active_adapter(module), backward=0,
                    seconds=time.perf_counter() - self._start if self.timed and self._start is not None else None)
        self.calls.append(call)
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(functools.partial(self._backward, call))

    def _backward(self, call, grad):
        call["backward"] += 1

    def take(self):
        calls, self.calls = self.calls, []
        self.backward_seconds = {}
        return calls

    def remove(self):
        for h in self._handles:
            h.remove()


def count_summary(calls, images):
    """Forward and backward rows per image, in total and per phase, and the number of calls."""
    out = dict(calls=len(calls), forwards_per_image=sum(c["rows"] for c in calls) / images,
               backwards_per_image=sum(c["rows"] * c["backward"] for c in calls) / images, by_phase={})
    for phase in dict.fromkeys(c["phase"] for c in calls):
        mine = [c for c in calls if c["phase"] == phase]
        out["by_phase"][phase] = dict(calls=len(mine), forwards_per_image=sum(c["rows"] for c in mine) / images,
                                      backwards_per_image=sum(c["rows"] * c["backward"] for c in mine) / images)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Wall seconds per phase, exclusive (a nested phase's time is not also its parent's), and the
    counter's phase label for the calls made inside."""

    def __init__(self, counter, device):
        self.counter, self.device = counter, device
        self.seconds = {}
        self._stack = []

    @contextlib.contextmanager
    def __call__(self, name):
        _sync(self.device)
        start, previous = time.perf_counter(), self.counter.phase
        self.counter.phase = name
        self._stack.append(0.0)
        try:
            yield
        finally:
            _sync(self.device)
            elapsed = time.perf_counter() - start
            child = self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - child
            if self._stack:
                self._stack[-1] += elapsed
            self.counter.phase = previous

    def take(self):
        seconds, self.seconds = self.seconds, {}
        return seconds


def call_signature(call):
    return (call["shape"], call["dtype"], call["grad"], call["adapter"], call["backward"] > 0)


def _signature_inputs(world, shape):
    (hidden, embeds, pooled) = shape
    rows = hidden[0]
    g = torch.Generator().manual_seed(0)
    make = lambda s: torch.randn(s, generator=g).to(world.device, world.dtype)
    return dict(hidden_states=make(hidden), encoder_hidden_states=make(embeds), pooled_projections=make(pooled),
                timestep=(torch.rand(rows, generator=g) * 1000).to(world.device, world.dtype))


def measure_floor(world, calls, reps=3, flops=True):
    """The iteration's transformer calls alone: each distinct (shapes, dtype, grad, adapter, backward)
    call timed `reps` times after one warm-up call on random inputs (median), times how often the
    iteration made it. Returns per-signature rows, the floor in seconds (total and per phase) and FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = world.transformer
    groups = {}
    for c in calls:
        groups.setdefault(call_signature(c), []).append(c)
    rows, per_phase, per_phase_flops = [], {}, {}
    for sig, members in groups.items():
        shape, dtype, grad, name, backward = sig
        inputs = _signature_inputs(world, shape)

        def one_call():
            with torch.set_grad_enabled(grad):
                out = transformer(**inputs, return_dict=False)[0]
                if backward:
                    out.float().square().mean().backward()
            return out

        with worlds.adapter(transformer, name) if name is None or "," not in name else contextlib.nullcontext():
            one_call()
            times = []
            faults = minor_faults()
            for _ in range(reps):
                _sync(world.device)
                start = time.perf_counter()
                one_call()
                _sync(world.device)
                times.append(time.perf_counter() - start)
            faults = (minor_faults() - faults) / reps
            n_flops = None
            if flops:
                with FlopCounterMode(display=False) as counter:
                    one_call()
                n_flops = counter.get_total_flops()
        seconds = statistics.median(times)
        rows.append(dict(shape=[list(s) if s else None for s in shape], dtype=dtype, grad=grad, adapter=name, backward=backward,
                         count=len(members), seconds_per_call=seconds, flops_per_call=n_flops, minor_page_faults_per_call=faults))
        for c in members:
            per_phase[c["phase"]] = per_phase.get(c["phase"], 0.0) + seconds
            if n_flops is not None:
                per_phase_flops[c["phase"]] = per_phase_flops.get(c["phase"], 0) + n_flops
    for p in transformer.parameters():  # the floor's backwards must not leak into the next iteration
        p.grad = None
    total_flops = sum(per_phase_flops.values()) if flops else None
    return dict(seconds=sum(per_phase.values()), by_phase=per_phase, flops=total_flops, signatures=rows,
                minor_page_faults=sum(r["count"] * r["minor_page_faults_per_call"] for r in rows))


@contextlib.contextmanager
def model_time_excluded(profiler, transformer):
    """cProfile sees everything but the model: off inside the transformer's forward (pre-hook / hook) and
    inside every autograd backward (torch.autograd.backward, which Tensor.backward calls)."""
    device = next(transformer.parameters()).device

    def resume(*args):  # on a GPU the model's kernels finish inside the excluded time, not at the next .item()
        _sync(device)
        profiler.enable()

    pre = transformer.register_forward_pre_hook(lambda *a: profiler.disable())
    post = transformer.register_forward_hook(resume)
    original = torch.autograd.backward

    def backward(*args, **kwargs):
        profiler.disable()
        try:
            return original(*args, **kwargs)
        finally:
            resume()

    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original
        pre.remove()
        post.remove()


def _where(func):
    filename, line, name = func
    if filename == "~":
        return name  # a builtin: "{method 'item' of 'torch._C.TensorBase' objects}"
    for prefix in (ROOT + os.sep, *(p + os.sep for p in sys.path if p and "site-packages" in p)):
        if filename.startswith(prefix):
            filename = filename[len(prefix):]
            break
    return f"{filename}:{line}:{name}"


def non_model_profile(run, transformer, top=12):
    """Run `run()` under cProfile with the model's time excluded; the top non-model costs by own time
    (file:line:function, seconds, calls) and the project's functions by cumulative time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    with model_time_excluded(profiler, transformer):
        profiler.enable()
        try:
            run()
        finally:
            profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    entries = [(func, tt, ct, nc) for func, (cc, nc, tt, ct, callers) in stats.items()]
    own = sorted(entries, key=lambda e: -e[1])[:top]
    project = [e for e in entries if e[0][0].startswith(ROOT) and "site-packages" not in e[0][0]
               and not e[0][0].endswith(os.path.join("bench", "speed.py"))]
    project = sorted(project, key=lambda e: -e[2])[:top]
    return dict(wall_seconds_profiled=wall, non_model_seconds=sum(e[1] for e in entries),
                top_own=[dict(where=_where(f), seconds=tt, calls=nc) for f, tt, ct, nc in own],
                top_project_cumulative=[dict(where=_where(f), seconds=ct, calls=nc) for f, tt, ct, nc in project])


def rss_bytes():
    """The process's resident memory now (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def minor_faults():
    """Minor page faults of the process so far: fresh pages the allocator had to map (CPU tensors of a few MB
    come from mmap in glibc's malloc, and every new page costs a fault and a zeroing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def module_bytes(module, keep=lambda name: True):
    """Bytes of the module's parameters and buffers whose name passes `keep`."""
    total = 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if keep(name):
            total += t.numel() * t.element_size()
    return total


def adapter_bytes(transformer, name):
    return module_bytes(transformer, lambda n: "lora_" in n and f".{name}." in n)


def base_bytes(transformer):
    return module_bytes(transformer, lambda n: "lora_" not in n)


# -----------------------------------------------------------------------------
# The benchmark's state: the world, the adapters of all three stages on its one transformer, optimizers


class Bench:
    def __init__(self, cfg):
        self.cfg = cfg
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu":
            torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        start = time.perf_counter()
        self.world, self._cleanup = build_world(cfg.world, device, cfg.scale, dtype)
        self.device = device
        world = self.world
        self.transformer = world.transformer
        self.counter = CallCounter(self.transformer)
        self.phases = Phases(self.counter, device)
        self.tasks = list(world.tasks)
        self.train_prompts = {t: worlds.read_prompts(prompt_file(world, t)) for t in self.tasks}
        use_real = cfg.rewards == "real" or (cfg.rewards == "auto" and world.kind == "tiny")
        self.reward_kind = f"{world.kind} (the scripts' rewards.get_reward)" if use_real else "stub (mean pixel)"
        self.reward_fns = {t: rewards.get_reward(t, world.kind) if use_real else stub_reward for t in self.tasks}
        self.opt_step = {}
        self.memory = {}
        self.guard = {}
        self._setup_adapters()
        # as the stage scripts since 6843fdf: SD3 pipelines encode every prompt once and free the text encoders
        self._prompt_cache = tempfile.TemporaryDirectory(prefix="speed-prompts-")
        worlds.encode_once(world, [p for prompts, _ in self.train_prompts.values() for p in prompts], self._prompt_cache.name)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.setup_seconds = time.perf_counter() - start

    def _random_teacher(self, name, seed):
        """A random LoRA teacher (worlds without trained experts): fresh A, and B drawn too so it differs from the base."""
        worlds.add_lora(self.transformer, name, self.cfg.lora_rank, self.cfg.lora_alpha, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in worlds.lora_parameters(self.transformer, name).items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)

    def _setup_adapters(self):
        """As opd.py: the teachers (and, for the memory measurement, a MAR anchor that is its own LoRA)
        on the shared frozen base, then the students: opd.py's 'student', grpo_expert.py's 'policy',
        sft_init.py's 'sft' (fresh LoRAs, float32 weights, AdamW, EMA)."""
        cfg, tr, world = self.cfg, self.transformer, self.world
        on_cuda = self.device.type == "cuda"
        bare = copy.deepcopy(tr) if cfg.memory else None  # the bare base, for the separate-copies measurement
        if on_cuda:
            torch.cuda.synchronize()
        rss0, cuda0 = rss_bytes(), torch.cuda.memory_allocated(self.device) if on_cuda else None
        teacher_files = worlds.parse_teachers(cfg.teachers, world) if (cfg.teachers or world.kind == "tiny") else {}
        self.teacher_adapter = {t: f"teacher_{t}" for t in self.tasks}
        frozen = list(self.teacher_adapter.values())
        for k, t in enumerate(self.tasks):
            if t in teacher_files and teacher_files[t] != "base":
                worlds.load_lora(tr, teacher_files[t], f"teacher_{t}", trainable=False)
            else:
                self._random_teacher(f"teacher_{t}", seed=100 + k)
        if cfg.memory:  # a MAR anchor given as its own LoRA file (opd.py --mar-teacher <file>): one more frozen adapter
            if "deqa" in teacher_files and teacher_files["deqa"] != "base":
                worlds.load_lora(tr, teacher_files["deqa"], "anchor", trainable=False)  # the paper anchors to its DeQA expert
            else:
                self._random_teacher("anchor", seed=200)
            frozen.append("anchor")
        if on_cuda:
            torch.cuda.synchronize()
        rss1, cuda1 = rss_bytes(), torch.cuda.memory_allocated(self.device) if on_cuda else None

        self.params, self.optim, self.ema = {}, {}, {}
        lr = dict(student=1e-4, policy=3e-4, sft=3e-4)  # opd.py, grpo_expert.py, sft_init.py defaults
        for name in ("student", "policy", "sft"):
            torch.manual_seed(cfg.seed)  # sft_init.py seeds before its fresh LoRA (add_lora forks the RNG anyway)
            worlds.add_lora(tr, name, cfg.lora_rank, cfg.lora_alpha)
        for name in ("student", "policy", "sft"):
            params = worlds.lora_parameters(tr, name)
            for p in params.values():  # LoRA weights train in float32 even when the base is bf16
                p.data = p.data.float()
            self.params[name] = params
            self.optim[name] = torch.optim.AdamW(list(params.values()), lr=lr[name], weight_decay=1e-4)
            self.ema[name] = {k: p.detach().clone().float() for k, p in params.items()}
            self.opt_step[name] = 0
        trainable = {n for name in self.params for n in self.params[name]}
        for n, p in tr.named_parameters():  # peft's set_adapter flips requires_grad: students train, the rest is frozen
            p.requires_grad_(n in trainable)

        if cfg.memory:
            one = base_bytes(tr)
            frozen_bytes = {name: adapter_bytes(tr, name) for name in frozen}
            student = adapter_bytes(tr, "student")
            shared = one + sum(frozen_bytes.values()) + student
            separate = one * (len(frozen) + 1) + student  # each frozen model a full copy, the student's own base + LoRA
            copies_measured = {}
            if on_cuda:
                torch.cuda.synchronize()
            rss2, cuda2 = rss_bytes(), torch.cuda.memory_allocated(self.device) if on_cuda else None
            copies = [copy.deepcopy(bare) for _ in frozen]
            if on_cuda:
                torch.cuda.synchronize()
            rss3, cuda3 = rss_bytes(), torch.cuda.memory_allocated(self.device) if on_cuda else None
            del copies, bare
            if on_cuda:
                torch.cuda.empty_cache()
            if rss0 is not None:
                copies_measured["rss_frozen_adapters"] = rss1 - rss0
                copies_measured["rss_frozen_copies"] = rss3 - rss2
            if on_cuda:
                copies_measured["cuda_frozen_adapters"] = cuda1 - cuda0
                copies_measured["cuda_frozen_copies"] = cuda3 - cuda2
            self.memory = dict(
                one_model_bytes=one, frozen_adapters={k: v for k, v in frozen_bytes.items()}, student_adapter_bytes=student,
                adapters_bytes=shared, separate_copies_bytes=separate,
                adapters_ratio=shared / one, separate_copies_ratio=separate / one, target_ratio=TARGET_MEMORY,
                what=f"{len(frozen) - 1} teachers + a MAR anchor as LoRA adapters + the student's LoRA on one base, against each frozen model as its own full copy + the student's base and LoRA",
                measured=copies_measured, note="measured: the allocation that loading the frozen adapters took, and that making the same number of full copies took")

    def close(self):
        self.counter.remove()
        self._prompt_cache.cleanup()
        self._cleanup()


def stage_settings(b, paper=False):
    """The settings one iteration of each stage reads: the scripts' defaults and the world's, or (paper)
    the paper's: T = 10, SDE on every step (9 trained), CFG 4.5, 40 teacher sampling steps, at a small batch."""
    cfg, world = b.cfg, b.world
    d = world.defaults
    s = dict(steps=cfg.steps or d["train_steps"],
             guidance=d["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale,
             noise_level=d["noise_level"], sde_window=d["sde_window"] if cfg.sde_window is None else cfg.sde_window,
             prompts_per_epoch=cfg.prompts_per_epoch, group_size=cfg.group_size, sample_batch=cfg.sample_batch,
             train_batch=cfg.train_batch, updates_per_epoch=cfg.updates_per_epoch, timestep_fraction=0.99,
             sft_batch=cfg.sft_batch or cfg.prompts_per_epoch * cfg.group_size, sft_train_batch=cfg.sft_train_batch,
             sft_sample_steps=cfg.sft_sample_steps or d["eval_steps"], mar_weight=cfg.mar_weight, grpo_task=cfg.grpo_task,
             seed=cfg.seed, same_latent=False, reward_fns=b.reward_fns)
    if paper:
        s.update(steps=10, guidance=4.5, sde_window=0, prompts_per_epoch=2, group_size=2, sample_batch=4, train_batch=4,
                 updates_per_epoch=1, sft_batch=4, sft_train_batch=4, sft_sample_steps=40, mar_weight=max(cfg.mar_weight, 0.02),
                 reward_fns={t: stub_reward for t in b.tasks})  # the stub has spread: GRPO keeps (trains) every group
    return SimpleNamespace(**s)


# -----------------------------------------------------------------------------
# The stages' iterations, following the scripts' loops (single process: rank 0 of 1, first = 0)


def grpo_iteration(b, epoch, s):
    """One epoch of grpo_expert.py's loop (LoRA policy, base = adapters disabled as the KL reference)."""
    world, transformer, timer = b.world, b.transformer, b.phases
    params, optimizer, ema = b.params["policy"], b.optim["policy"], b.ema["policy"]
    param_list = list(params.values())
    task_weights = {s.grpo_task: 1.0}
    task_reward = {t: s.reward_fns[t] for t in task_weights}
    beta = DEFAULT_BETA[s.grpo_task]
    steps, guidance = s.steps, s.guidance
    n_trained = int(math.floor(steps * s.timestep_fraction))
    N = s.prompts_per_epoch * s.group_size
    first, n_local = 0, N

    @torch.no_grad()
    def reference_velocity(x_t, j, mb):
        with worlds.adapter(transformer, None):
            return sde.predict_velocity(world, x_t, sigmas[j].item(), embeds[mb], pooled[mb], guidance)

    with worlds.adapter(transformer, "policy"):  # grpo_expert.py's only adapter, active throughout
        chosen = worlds.draw_prompts(b.train_prompts, task_weights, s.prompts_per_epoch, s.seed, epoch)
        index = torch.arange(first, first + n_local)
        tasks = [chosen[i // s.group_size][0] for i in index.tolist()]
        prompts = [chosen[i // s.group_size][1] for i in index.tolist()]
        metadata = [chosen[i // s.group_size][2] for i in index.tolist()]
        seeds, init_seeds = sde.epoch_seeds(s.seed, epoch, index.tolist(), s.group_size, s.same_latent)
        sde_steps = sde.sde_window_steps(steps, s.sde_window, s.seed, epoch)
        train_steps = sde_steps if s.sde_window else list(range(n_trained))

        transformer.eval()
        with timer("sampling"):
            traj = sde.sample(world, prompts, steps, guidance, s.noise_level, seeds=seeds, batch_size=s.sample_batch,
                              sde_steps=sde_steps, init_seeds=init_seeds)
            latents, old_log_probs = traj["latents"], traj["log_probs"]
            embeds, pooled, sigmas = traj["embeds"], traj["pooled"], traj["sigmas"]
            images = traj["images"]

        with timer("rewards"):
            reward = rewards.score_by_task(task_reward, images, prompts, metadata, tasks)
            all_reward = reward.to(world.device).cpu()
            all_task = torch.tensor([list(task_weights).index(t) for t in tasks], device=world.device).cpu()
            per_task = {f"reward_{t}": all_reward[all_task == k].mean().item() for k, t in enumerate(task_weights) if (all_task == k).any()}
            finite_guard(all_reward, b.guard)

        groups = torch.arange(N) // s.group_size
        advantages, keep = sde.group_advantages(all_reward, groups, "global", clip=5.0)
        kept = keep.nonzero().squeeze(1)

        transformer.train()
        stats = dict(loss=[], policy=[], kl=[], ratio=[], clipfrac=[])
        with timer("training"):
            shuffle = torch.Generator().manual_seed(sde.sample_seed(s.seed, epoch, -1))
            perm = kept[torch.randperm(len(kept), generator=shuffle)]
            for chunk in (perm.chunk(s.updates_per_epoch) if len(perm) else []):
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=world.device)  # the divergence guard's summed loss
                n_chunk = len(chunk)
                mine = chunk[(chunk >= first) & (chunk < first + n_local)] - first
                for mb in mine.split(s.train_batch) if len(mine) else []:
                    adv = advantages[mb + first].to(world.device)
                    for j in train_steps:
                        x_t, x_next = latents[mb, j], latents[mb, j + 1]
                        v = sde.predict_velocity(world, x_t, sigmas[j].item(), embeds[mb], pooled[mb], guidance)
                        _, log_prob, _, _ = sde.sde_step_with_logprob(v, sigmas[j].item(), sigmas[j + 1].item(), x_t,
                                                                      s.noise_level, prev_sample=x_next)
                        policy_loss, ratio = sde.clipped_surrogate(log_prob, old_log_probs[mb, j], adv, 1e-4)
                        kl = torch.zeros_like(policy_loss)
                        if beta > 0:
                            with timer("frozen"):
                                v_ref = reference_velocity(x_t, j, mb)
                            kl = sde.velocity_kl(v, v_ref, sigmas[j].item(), sigmas[j + 1].item(), s.noise_level)
                            kl = kl * (sigmas[j] - sigmas[j + 1]).item()
                        loss = policy_loss + beta * kl
                        (loss.sum() / (n_chunk * len(train_steps))).backward()
                        step_loss += loss.detach().sum()
                        stats["loss"].append(loss.detach().mean().item())
                        stats["policy"].append(policy_loss.detach().mean().item())
                        stats["kl"].append(kl.detach().mean().item())
                        stats["ratio"].extend(ratio.detach().tolist())
                        stats["clipfrac"].append(((ratio - 1).abs() > 1e-4).float().mean().item())
                grad_norm = torch.nn.utils.clip_grad_norm_(param_list, 1.0)
                finite_guard(grad_norm, b.guard)
                finite_guard(step_loss, b.guard)
                optimizer.step()
                b.opt_step["policy"] += 1
                if b.opt_step["policy"] % 8 == 0:
                    runs.ema_update(ema, params, 0.9)
    return dict(images=N, kept=len(kept), trained_steps=len(train_steps), reward=all_reward.mean().item(), **per_task)


def sft_iteration(b, step, s):
    """sft_init.py for one optimizer step at batch M: first its teacher cache for M items (M / 4 per task:
    each task's teacher samples its items with the ODE at the world's eval steps, scored by the task's
    reward as best-of-1 does), then one step of its training loop on M items drawn from that cache.
    In a run the cache is made once and reused (sft_init.py defaults: 1024 items, 1000 x 32 draws), so
    the table also shows the iteration with the cache amortised."""
    world, transformer, timer = b.world, b.transformer, b.phases
    params, optimizer, ema = b.params["sft"], b.optim["sft"], b.ema["sft"]
    param_list = list(params.values())
    task_weights = {t: 1.0 for t in b.tasks}
    guidance, sample_steps, M = s.guidance, s.sft_sample_steps, s.sft_batch
    per_task = max(1, M // len(task_weights))
    null = world.encode_prompts([""])

    # 1. the teacher cache: items step * per_task ... of every task (a new block per iteration, as a run's next shards)
    x0_all, prompts_all, task_ranges = [], [], {}
    for t in task_weights:
        prompts_t, metadata_t = b.train_prompts[t]
        perm = np.random.default_rng([s.seed, world.tasks.index(t)]).permutation(len(prompts_t))
        ids = list(range(step * per_task, (step + 1) * per_task))
        prompts = [prompts_t[perm[k % len(prompts_t)]] for k in ids]
        metadata = [metadata_t[perm[k % len(prompts_t)]] for k in ids]
        n = len(ids)
        seeds = [sde.sample_seed(s.seed, world.tasks.index(t), k, 0) for k in ids]  # best-of-1
        transformer.eval()
        with timer("sampling"), worlds.adapter(transformer, b.teacher_adapter[t]):
            traj = sde.sample(world, prompts, sample_steps, guidance, 0.0, seeds=seeds, batch_size=s.sample_batch)
        with timer("rewards"):
            reward = s.reward_fns[t](traj["images"], prompts, metadata).view(n, 1)
            best = reward.argmax(dim=1)
            x0 = traj["latents"][:, -1].view(n, 1, *world.latent_shape)[torch.arange(n), best]
        task_ranges[t] = (len(prompts_all), n)
        x0_all.append(x0.cpu())
        prompts_all += prompts
    x0_all = torch.cat(x0_all).float()
    finite_guard(x0_all.flatten(1).abs().amax(1), b.guard)

    def draw(step, positions):  # sft_init.py's draw()
        ids, sigmas, noises, drops = [], [], [], []
        names = list(task_weights)
        odds = np.array([task_weights[t] for t in names], dtype=np.float64)
        for pos in positions:
            rng = np.random.default_rng([s.seed, step, pos, 1])
            a, n = task_ranges[names[rng.choice(len(names), p=odds / odds.sum())]]
            ids.append(a + int(rng.integers(n)))
            g = torch.Generator().manual_seed(sde.sample_seed(s.seed, step, pos))
            u = torch.sigmoid(0.0 + 1.0 * torch.randn((), generator=g))
            sigmas.append(sde.shift_sigma(u, world.defaults["shift"]))
            noises.append(torch.randn(world.latent_shape, generator=g))
            drops.append(torch.rand((), generator=g).item() < 0.0)
        return torch.tensor(ids), torch.stack(sigmas), torch.stack(noises), torch.tensor(drops, dtype=torch.bool)

    def flow_loss(ids, sigma, noise, drop, base_reg):  # sft_init.py's flow_loss()
        x0 = x0_all[ids].to(world.device)
        noise = noise.to(world.device)
        sig = sigma.to(world.device).view(-1, 1, 1, 1)
        x_t = (1 - sig) * x0 + sig * noise
        target = noise - x0
        embeds, pooled = world.encode_prompts(["" if d else prompts_all[i] for i, d in zip(ids.tolist(), drop.tolist())])
        v = sde.predict_velocity(world, x_t, sigma, embeds, pooled, 1.0, null)  # --train-guidance 1 (the default)
        loss = ((v - target) ** 2).mean(dim=(1, 2, 3))
        reg = torch.zeros_like(loss)
        if base_reg > 0:
            with timer("frozen"), torch.no_grad(), worlds.adapter(transformer, None):
                v_base = sde.predict_velocity(world, x_t, sigma, embeds, pooled, 1.0, null)
            reg = ((v - v_base) ** 2).mean(dim=(1, 2, 3))
        return loss, reg

    # 2. one step of the training loop
    with worlds.adapter(transformer, "sft"):
        ids, sigma, noise, drop = draw(step, range(M))
        transformer.train()
        optimizer.zero_grad(set_to_none=True)
        with timer("training"):
            losses, regs = [], []
            for mb in torch.arange(M).split(s.sft_train_batch):
                loss, reg = flow_loss(ids[mb], sigma[mb], noise[mb], drop[mb], 0.0)  # --base-reg 0 (the default)
                (loss.sum() / M).backward()
                losses.append(loss.detach())
                regs.append(reg.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(param_list, 1.0)
            finite_guard(grad_norm, b.guard)
            finite_guard(torch.cat(losses), b.guard)
            optimizer.step()
            b.opt_step["sft"] += 1
            if b.opt_step["sft"] % 8 == 0:
                runs.ema_update(ema, params, 0.9)
            loss_mean = torch.cat(losses).mean().item()
            grad_norm = grad_norm.item()
    # sft_init.py's defaults: 256 items per task cached once, 1000 steps x 32 items drawn from them
    reuse = 1000 * 32 / (256 * len(task_weights))
    return dict(images=M, cache_items=len(prompts_all), sample_steps=sample_steps, loss=loss_mean, cache_reuse_at_defaults=reuse)


def opd_iteration(b, epoch, s):
    """One epoch of opd.py's loop, --opd-loss direct (the default): the student samples, each prompt's task
    routes it to that task's teacher (hard routing), the MAR anchor (the base: --mar-teacher base, the
    default) labels every sample, the student regresses onto both at every distilled step."""
    world, transformer, timer = b.world, b.transformer, b.phases
    params, optimizer, ema = b.params["student"], b.optim["student"], b.ema["student"]
    param_list = list(params.values())
    task_weights = {t: 1.0 for t in b.tasks}
    task_reward = {t: s.reward_fns[t] for t in task_weights}
    routing = {t: {t: 1.0} for t in task_weights}
    teacher_adapter = b.teacher_adapter
    anchor = None  # --mar-teacher base: adapters disabled
    steps, guidance = s.steps, s.guidance
    first_steps = list(range(int(math.floor(steps * s.timestep_fraction))))
    N = s.prompts_per_epoch * s.group_size
    first, n_local = 0, N

    @torch.no_grad()
    def frozen_velocities(name, rows, steps_, latents, embeds, pooled):
        context = worlds.adapter(transformer, name)
        rows = torch.as_tensor(rows)
        out = torch.zeros(len(rows), len(steps_), *world.latent_shape)
        with context:
            for jj, j in enumerate(steps_):
                for k, mb in zip(torch.arange(len(rows)).split(s.train_batch), rows.split(s.train_batch)):
                    out[k, jj] = sde.predict_velocity(world, latents[mb, j], sigmas[j].item(), embeds[mb], pooled[mb], guidance).cpu()
        return out

    chosen = worlds.draw_prompts(b.train_prompts, task_weights, s.prompts_per_epoch, s.seed, epoch)
    index = range(first, first + n_local)
    tasks = [chosen[i // s.group_size][0] for i in index]
    prompts = [chosen[i // s.group_size][1] for i in index]
    metadata = [chosen[i // s.group_size][2] for i in index]
    seeds = [sde.sample_seed(s.seed, epoch, i) for i in index]
    sde_steps = sde.sde_window_steps(steps, s.sde_window, s.seed, epoch)
    train_steps = first_steps  # direct distils every first step

    with timer("sampling"), worlds.adapter(transformer, "student"):
        traj = sde.sample(world, prompts, steps, guidance, s.noise_level, seeds=seeds, batch_size=s.sample_batch, sde_steps=sde_steps)
    latents, old_log_probs = traj["latents"], traj["log_probs"]
    embeds, pooled, sigmas = traj["embeds"], traj["pooled"], traj["sigmas"]

    with timer("frozen"):
        v_target = sde.route_targets(tasks, routing, lambda teacher, rows: frozen_velocities(
            teacher_adapter[teacher], rows, train_steps, latents, embeds, pooled))
        v_anchor = frozen_velocities(anchor, range(n_local), train_steps, latents, embeds, pooled) if s.mar_weight > 0 else None
        worst = torch.stack([v.flatten(1).abs().amax(1) for v in (v_target, v_anchor) if v is not None]).amax(0)
        finite_guard(worst.to(world.device), b.guard)  # opd.py gathers it over ranks first

    with timer("rewards"):
        scores = rewards.score_by_task(task_reward, traj["images"], prompts, metadata, tasks)

    stats = dict(loss=[])
    kl_sample, mar_sample = torch.zeros(n_local), torch.zeros(n_local)
    with timer("training"), worlds.adapter(transformer, "student"):
        shuffle = torch.Generator().manual_seed(sde.sample_seed(s.seed, epoch, -1))
        perm = torch.randperm(N, generator=shuffle)
        for chunk in perm.chunk(s.updates_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=world.device)
            mine = chunk[(chunk >= first) & (chunk < first + n_local)] - first
            for mb in mine.split(s.train_batch) if len(mine) else []:
                for jj, j in enumerate(train_steps):
                    s_, s_next, x_t = sigmas[j].item(), sigmas[j + 1].item(), latents[mb, j]
                    v = sde.predict_velocity(world, x_t, s_, embeds[mb], pooled[mb], guidance)
                    target = v_target[mb, jj].to(v.device)
                    distill, kl = sde.opd_loss("direct", v, target, None, old_log_probs[mb, j], None, s_, s_next,
                                               s.noise_level, 1e-4, 5.0)
                    loss = distill
                    if v_anchor is not None:
                        mar = sde.velocity_kl(v, v_anchor[mb, jj].to(v.device), s_, s_next, s.noise_level)
                        loss = loss + s.mar_weight * mar
                        mar_sample[mb] += mar.detach().cpu() / len(train_steps)
                    (loss.sum() / (N * len(train_steps))).backward()
                    step_loss += loss.detach().sum()
                    stats["loss"].append(loss.detach().mean().item())
                    kl_sample[mb] += kl.detach().cpu() / len(train_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(param_list, 1.0)
            finite_guard(grad_norm, b.guard)
            finite_guard(step_loss, b.guard)
            optimizer.step()
            b.opt_step["student"] += 1
            if b.opt_step["student"] % 8 == 0:
                runs.ema_update(ema, params, 0.9)
    gathered = torch.stack([scores, kl_sample, mar_sample], 1).cpu()
    return dict(images=N, distilled_steps=len(train_steps), teachers_used=len(set(tasks)), kl=gathered[:, 1].mean().item(),
                mar=gathered[:, 2].mean().item())


STAGES = {"grpo": grpo_iteration, "grpo-w0": grpo_iteration, "sft": sft_iteration, "opd": opd_iteration}


def expected_counts(stage, s, kept=None, cache_items=None, cfg_rows=2):
    """The forwards / backwards per image the scripts' loops make by construction (rows, CFG = 2 per image):
    what the hook counts are checked against (tests/test_bench_speed.py)."""
    T, S = s.steps, int(math.floor(s.steps * s.timestep_fraction))
    c = cfg_rows if s.guidance and s.guidance > 1 else 1
    if stage in ("grpo", "grpo-w0"):
        trained = s.sde_window if s.sde_window else S
        frac = 1.0 if kept is None else kept / (s.prompts_per_epoch * s.group_size)
        return dict(forwards=c * T + frac * trained * 2 * c, backwards=frac * trained * c)  # policy + KL reference
    if stage == "opd":
        anchor = 1 if s.mar_weight > 0 else 0
        return dict(forwards=c * T + c * S * (1 + anchor) + c * S, backwards=c * S)  # student samples, teacher (+ anchor), student trains
    if stage == "sft":  # the teachers' ODE with CFG for each cached item, then one conditional forward (+ backward) per trained item
        cached = s.sft_batch if cache_items is None else cache_items
        return dict(forwards=c * s.sft_sample_steps * cached / s.sft_batch + 1, backwards=1)
    raise ValueError(stage)


# -----------------------------------------------------------------------------
# Running a stage: warm-up, measured iterations, counts, floor, FLOPs, profile


def run_stage(b, stage, s, iters, warmup, log=print):
    fn = STAGES[stage]
    if stage == "grpo-w0":
        s = copy.copy(s)
        s.sde_window = 0
    on_cuda = b.device.type == "cuda"
    b.counter.enabled = False
    short = copy.copy(s)  # warm-up: the same batches (the same call shapes), 2 steps
    short.steps = short.sft_sample_steps = 2
    short.sde_window = min(s.sde_window, 1)
    for w in range(warmup):
        fn(b, 1000 + w, short)  # epochs the measured iterations do not use
        b.phases.take()
    b.counter.enabled = True
    b.counter.take()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
    results, all_calls = [], []
    for it in range(iters):
        _sync(b.device)
        faults = minor_faults()
        start = time.perf_counter()
        with b.counter.timing_backwards():
            info = fn(b, it, s)
        _sync(b.device)
        total = time.perf_counter() - start
        faults = minor_faults() - faults
        seconds = b.phases.take()
        backward_seconds = dict(b.counter.backward_seconds)
        calls = b.counter.take()
        all_calls += calls
        results.append(dict(total=total, phases=seconds, info=info, calls=calls, faults=faults, backward_seconds=backward_seconds))
    images = results[0]["info"]["images"]
    mean = lambda xs: sum(xs) / len(xs)
    phases = {p: mean([r["phases"].get(p, 0.0) for r in results]) for p in PHASES}
    total = mean([r["total"] for r in results])
    phases["other"] = max(0.0, total - sum(phases.values()))
    out = dict(stage=stage, iterations=iters, images=images, total_seconds=total, seconds_per_image=total / images,
               phases=phases, phases_per_image={k: v / images for k, v in phases.items()},
               iteration_seconds=[r["total"] for r in results], info=[r["info"] for r in results],
               settings=dict(steps=s.steps, sde_window=s.sde_window, guidance=s.guidance, prompts_per_epoch=s.prompts_per_epoch,
                             group_size=s.group_size, sample_batch=s.sample_batch, train_batch=s.train_batch,
                             updates_per_epoch=s.updates_per_epoch, sft_batch=s.sft_batch, sft_train_batch=s.sft_train_batch,
                             sft_sample_steps=s.sft_sample_steps, mar_weight=s.mar_weight))
    out["counts"] = count_summary(all_calls, images * iters)
    kept = mean([r["info"]["kept"] for r in results]) if "kept" in results[0]["info"] else None
    out["counts"]["expected"] = expected_counts(stage, s, kept, results[0]["info"].get("cache_items"))
    out["peak_rss_bytes"] = peak_rss_bytes()
    if on_cuda:
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(b.device)
    b.counter.enabled = False
    floor = measure_floor(b.world, all_calls, reps=b.cfg.floor_reps, flops=b.cfg.flops)
    b.counter.enabled = True
    floor["seconds"] /= iters  # per iteration, like the times
    floor["by_phase"] = {k: v / iters for k, v in floor["by_phase"].items()}
    floor["flops"] = floor["flops"] / iters if floor["flops"] is not None else None
    out["floor_seconds"] = floor["seconds"]
    out["floor_by_phase"] = floor["by_phase"]
    out["floor_signatures"] = floor["signatures"]
    out["minor_page_faults"] = dict(iteration=mean([r["faults"] for r in results]), floor=floor["minor_page_faults"] / iters)
    if b.counter.timed:  # the model's own time inside the iteration (forward hooks + timed backwards) against the floor
        fwd = sum(c["seconds"] for c in all_calls) / iters
        bwd = sum(sum(r["backward_seconds"].values()) for r in results) / iters
        out["model_in_iteration"] = dict(forward_seconds=fwd, backward_seconds=bwd, seconds=fwd + bwd,
                                         over_floor=(fwd + bwd) / floor["seconds"] if floor["seconds"] else None,
                                         non_model_seconds=total - fwd - bwd, iteration_over_model=total / (fwd + bwd) if fwd + bwd else None)
    out["iteration_over_floor"] = total / floor["seconds"] if floor["seconds"] else None
    model = sum(phases[p] for p in ("sampling", "frozen", "training"))
    out["model_phases_over_floor"] = model / floor["seconds"] if floor["seconds"] else None  # rewards and other left out
    out["phase_over_floor"] = {p: phases[p] / floor["by_phase"][p] for p in floor["by_phase"] if floor["by_phase"][p] > 0 and p in phases}
    if floor["flops"] is not None:
        out["model_flops"] = floor["flops"]
        out["model_tflops_per_s_iteration"] = floor["flops"] / total / 1e12
        out["model_tflops_per_s_floor"] = floor["flops"] / floor["seconds"] / 1e12
        peak = b.cfg.peak_tflops or (H100_BF16_PEAK if on_cuda else None)
        if peak:
            out["peak_tflops"] = peak
            out["mfu_iteration"] = out["model_tflops_per_s_iteration"] / peak
            out["mfu_floor"] = out["model_tflops_per_s_floor"] / peak
    if stage == "sft":  # the cache amortised over its reuse at sft_init.py's defaults
        reuse = results[0]["info"]["cache_reuse_at_defaults"]
        cache = phases["sampling"] + phases["rewards"]
        cache_floor = floor["by_phase"].get("sampling", 0.0)
        out["amortised"] = dict(cache_reuse=reuse, total_seconds=total - cache + cache / reuse,
                                floor_seconds=floor["seconds"] - cache_floor + cache_floor / reuse)
        out["amortised"]["iteration_over_floor"] = out["amortised"]["total_seconds"] / out["amortised"]["floor_seconds"]
    profile = b.cfg.profile
    if profile == "all" or (profile == "auto" and out["iteration_over_floor"] and out["iteration_over_floor"] > TARGET_FLOOR):
        b.counter.enabled = False
        out["profile"] = non_model_profile(lambda: fn(b, 2000, s), b.transformer)
        b.phases.take()
        b.counter.enabled = True
        out["profile"]["non_model_seconds_measured"] = total - floor["seconds"]
    return out


def paper_counts(b, stages):
    """Forwards / backwards per image COUNTED at the paper's settings (small batch; counts per image do
    not depend on the batch), with what the loops make by construction."""
    s = stage_settings(b, paper=True)
    out = {}
    for stage in stages:
        if stage == "grpo-w0":
            continue
        b.counter.take()
        info = STAGES[stage](b, 3000, s)
        b.phases.take()
        counts = count_summary(b.counter.take(), info["images"])
        counts["expected"] = expected_counts(stage, s, info.get("kept"), info.get("cache_items"))
        out[stage] = counts
    out["settings"] = dict(steps=s.steps, trained_steps=int(math.floor(s.steps * s.timestep_fraction)), sde_window=s.sde_window,
                           guidance=s.guidance, sft_sample_steps=s.sft_sample_steps, mar_weight=s.mar_weight, teachers=len(b.tasks),
                           images=s.prompts_per_epoch * s.group_size, note="counted with the stub reward so that GRPO keeps every group")
    out["paper_notes"] = "PAPER-NOTES: about 74 forwards + 18 backwards per image for OPD at 10 steps / 9 trained / CFG with teachers + anchor"
    return out


def sd35_medium_memory(rank=32, alpha=64, frozen=5):
    """Parameter + buffer bytes at SD3.5-Medium's size, on the meta device (no memory): the bf16 base, the
    frozen LoRAs as peft makes them on it, the student's LoRA in float32 as the scripts keep it."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            tr = SD3Transformer2DModel(**SD35_MEDIUM)
        tr.to(torch.bfloat16)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    names = [f"frozen{k}" for k in range(frozen)] + ["student"]
    for name in names:
        worlds.add_lora(tr, name, rank, alpha)
        for p in worlds.lora_parameters(tr, name).values():  # on a real device peft makes every adapter in the base's
            p.data = p.data.to(torch.bfloat16)               # dtype; on the meta device it leaves all but the first in float32
    for p in worlds.lora_parameters(tr, "student").values():
        p.data = p.data.float()
    one = base_bytes(tr)
    frozen_b = sum(adapter_bytes(tr, n) for n in names[:-1])
    student = adapter_bytes(tr, "student")
    return dict(parameters=sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n),
                one_model_bytes=one, frozen_adapter_bytes_each=frozen_b / frozen, student_adapter_bytes=student,
                adapters_ratio=(one + frozen_b + student) / one, separate_copies_ratio=((frozen + 1) * one + student) / one,
                what=f"SD3.5-Medium transformer in bf16 + {frozen} frozen r={rank} LoRAs (4 teachers + anchor) + the float32 student LoRA, vs full copies")


# -----------------------------------------------------------------------------
# Report


def load_info():
    """The 1, 5 and 15 minute load averages: other jobs on the machine show here."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def b_is_cpu(result):
    return result["world"]["device"].startswith("cpu")


def print_table(result, log=print):
    w = result["world"]
    log(f"\nworld {w['name']} ({w['kind']}) on {w['device']} {w['dtype']}, {w['threads']} threads | load average before {result['load_before']} after {result['load_after']}")
    log(f"rewards: {result['rewards']} | times: mean of {result['iters']} iteration(s) after {result['warmup']} warm-up; floor: median of {result['floor_reps']} reps per distinct call")
    head = f"{'stage':<8}{'imgs':>5}{'sampling':>9}{'rewards':>8}{'frozen':>8}{'training':>9}{'other':>7}{'total':>8}{'s/img':>8}{'floor':>8}{'it/floor':>9}{'it/model':>9}{'fwd/img':>8}{'bwd/img':>8}{'paper f/b':>10}"
    log(head)
    for st in result["stages"].values():
        p = st["phases"]
        paper = result.get("paper_counts", {}).get(st["stage"].removesuffix("-w0"))
        paper_txt = f"{paper['forwards_per_image']:.0f}/{paper['backwards_per_image']:.0f}" if paper and st["stage"] != "grpo-w0" else ""
        flag = "" if st["iteration_over_floor"] <= TARGET_FLOOR else "!"
        c = st["counts"]
        own = st.get("model_in_iteration")
        own_txt = f"{st['total_seconds'] / own['seconds']:.3f}" if own and own["seconds"] else "-"
        log(f"{st['stage']:<8}{st['images']:>5}{p['sampling']:>9.2f}{p['rewards']:>8.2f}{p['frozen']:>8.2f}{p['training']:>9.2f}{p['other']:>7.2f}"
            f"{st['total_seconds']:>8.2f}{st['seconds_per_image']:>8.3f}{st['floor_seconds']:>8.2f}{st['iteration_over_floor']:>8.2f}{flag:1}{own_txt:>9}"
            f"{c['forwards_per_image']:>8.1f}{c['backwards_per_image']:>8.1f}{paper_txt:>10}")
    log(f"(seconds per iteration; frozen = GRPO's KL reference / OPD's teachers + MAR anchor / SFT's base regulariser; '!' = above the {TARGET_FLOOR} target;\n"
        f" it/model = the iteration over its own transformer calls timed inside it (hooks): measured at the same moment, so other jobs' load cancels)")
    for st in result["stages"].values():
        extra = []
        if "phase_over_floor" in st:
            extra.append("per phase / floor: " + " ".join(f"{k} {v:.2f}" for k, v in st["phase_over_floor"].items()))
        if st.get("model_phases_over_floor"):
            extra.append(f"model phases / floor {st['model_phases_over_floor']:.2f}")
        if "model_in_iteration" in st:
            m = st["model_in_iteration"]
            extra.append(f"model calls inside the iteration {m['seconds']:.2f} s = {m['over_floor']:.2f} x floor, the rest {m['non_model_seconds']:.2f} s")
        if "minor_page_faults" in st and b_is_cpu(result):
            f = st["minor_page_faults"]
            extra.append(f"page faults {f['iteration'] / 1e3:.0f}k (floor {f['floor'] / 1e3:.0f}k)")
        if "model_tflops_per_s_iteration" in st:
            mfu = f", MFU {st['mfu_iteration']:.1%} (floor {st['mfu_floor']:.1%}) of {st['peak_tflops']:.0f}" if "mfu_iteration" in st else ""
            extra.append(f"{st['model_flops'] / st['images'] / 1e12:.4g} TFLOP/img, {st['model_tflops_per_s_iteration']:.3g} TFLOP/s{mfu}")
        if "cuda_max_memory_allocated_bytes" in st:
            extra.append(f"peak CUDA {st['cuda_max_memory_allocated_bytes'] / 2**30:.2f} GiB")
        if "amortised" in st:
            a = st["amortised"]
            extra.append(f"cache amortised x{a['cache_reuse']:.0f}: {a['total_seconds']:.2f} s, floor {a['floor_seconds']:.2f} s, {a['iteration_over_floor']:.2f}")
        log(f"  {st['stage']}: " + " | ".join(extra))
    for key, ratio in result.get("ratios", {}).items():
        log(f"{key}: {ratio['value']:.2f} (target <= {ratio['target']}) {'ok' if ratio['value'] <= ratio['target'] else 'ABOVE TARGET'}")
    m = result.get("memory")
    if m:
        log(f"memory: one model {m['one_model_bytes'] / 2**20:.2f} MiB; {m['what']}: {m['adapters_bytes'] / 2**20:.2f} MiB = "
            f"{m['adapters_ratio']:.2f}x (target <= {TARGET_MEMORY}) {'ok' if m['adapters_ratio'] <= TARGET_MEMORY else 'ABOVE TARGET'}; "
            f"separate copies {m['separate_copies_bytes'] / 2**20:.2f} MiB = {m['separate_copies_ratio']:.2f}x")
        if "cuda_peak_opd_bytes" in m:
            log(f"  OPD iteration peak CUDA memory {m['cuda_peak_opd_bytes'] / 2**30:.2f} GiB with adapters; with separate copies it would be "
                f"{m['cuda_peak_opd_separate_copies_estimate_bytes'] / 2**30:.2f} GiB")
        if m.get("measured"):
            log("  measured: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in m["measured"].items()) + f"; peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")
        mm = result.get("memory_sd35_medium")
        if mm:
            log(f"  at SD3.5-M size (meta device): one model {mm['one_model_bytes'] / 2**30:.2f} GiB ({mm['parameters'] / 1e9:.2f} B params), "
                f"frozen LoRA {mm['frozen_adapter_bytes_each'] / 2**20:.1f} MiB each, student {mm['student_adapter_bytes'] / 2**20:.1f} MiB: "
                f"adapters {mm['adapters_ratio']:.3f}x, separate copies {mm['separate_copies_ratio']:.2f}x")
    pc = result.get("paper_counts")
    if pc:
        log(f"counted at the paper's settings ({pc['settings']['steps']} steps, {pc['settings']['trained_steps']} trained, CFG {pc['settings']['guidance']}, "
            f"SDE window {pc['settings']['sde_window']}, SFT teacher {pc['settings']['sft_sample_steps']} steps): "
            + ", ".join(f"{k} {v['forwards_per_image']:.0f} fwd + {v['backwards_per_image']:.0f} bwd" for k, v in pc.items() if k not in ("settings", "paper_notes"))
            + " per image; " + pc["paper_notes"])
    for st in result["stages"].values():
        prof = st.get("profile")
        if prof:
            log(f"profile {st['stage']} (model excluded): non-model {prof['non_model_seconds']:.2f} s in the profile vs iteration - floor "
                f"{prof['non_model_seconds_measured']:.2f} s; top own time:")
            for e in prof["top_own"][:8]:
                log(f"    {e['seconds']:7.3f} s {e['calls']:>7} calls  {e['where']}")
            log("  project functions, cumulative (model excluded):")
            for e in prof["top_project_cumulative"][:6]:
                log(f"    {e['seconds']:7.3f} s {e['calls']:>7} calls  {e['where']}")


def main(argv=None):
    cfg = runs.parse_settings(__doc__, SETTINGS, argv)
    stages = [x for x in cfg.stages.split(",") if x]
    bad = [x for x in stages if x not in STAGES]
    if bad:
        raise SystemExit(f"error: unknown stage(s) {bad}; known: {', '.join(STAGES)}")
    if cfg.scale not in ("full", "tiny"):
        raise SystemExit(f"error: --scale must be full or tiny, got {cfg.scale!r}")
    if cfg.iters < 1 or cfg.warmup < 0:
        raise SystemExit("error: --iters must be >= 1 and --warmup >= 0")
    wall = time.perf_counter()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    load_before = load_info()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    on_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    if on_cpu and busy > 0.5 * (os.cpu_count() or 1):
        if not cfg.threads:  # measured here: on 2 shared cores, 2 threads ran a tiny model's ops up to 7x slower than 1
            cfg.threads = 1
        print(f"warning: load average {busy:.1f} on {os.cpu_count()} cores: other jobs are running, so CPU times are inflated and noisy; "
              f"{cfg.threads} thread(s) (--threads 0 picks 1 under load: several threads then wait on each other's descheduled ones)", flush=True)
    b = Bench(cfg)
    s = stage_settings(b)
    if "grpo" in stages and cfg.grpo_window0 and s.sde_window and "grpo-w0" not in stages:
        stages.insert(stages.index("grpo") + 1, "grpo-w0")
    world_tag = cfg.world if cfg.world in ("tiny", "sd3-tiny") else ("sd3-random-medium" + ("-tiny" if cfg.scale == "tiny" else "")
                                                                  if cfg.world == "sd3-random-medium" else os.path.basename(os.path.normpath(cfg.world)))
    out_path = cfg.out or os.path.join(ROOT, "results", "bench", f"speed_{world_tag}.json")
    result = dict(world=dict(name=getattr(b.world, "display", b.world.name), kind=b.world.kind, device=str(b.device), dtype=str(b.world.dtype).removeprefix("torch."),
                             threads=torch.get_num_threads(), latent_shape=list(b.world.latent_shape),
                             transformer_parameters=sum(p.numel() for n, p in b.transformer.named_parameters() if "lora_" not in n),
                             transformer_config=getattr(b.world, "transformer_config", None)),
                  command=" ".join([os.path.basename(sys.executable), "bench/speed.py", *(sys.argv[1:] if argv is None else argv)]),
                  torch=torch.__version__, cuda_device=torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else None,
                  rewards=b.reward_kind, iters=cfg.iters, warmup=cfg.warmup, floor_reps=cfg.floor_reps, load_before=load_before,
                  setup_seconds=b.setup_seconds, targets=dict(iteration_over_floor=TARGET_FLOOR, opd_over_grpo=TARGET_OPD_GRPO, memory=TARGET_MEMORY),
                  stages={}, memory=b.memory, nonfinite_values_seen=b.guard)
    print(f"world {result['world']['name']} on {b.device} ({result['world']['transformer_parameters']:,} transformer parameters), set-up {b.setup_seconds:.1f} s, "
          f"stages {stages}", flush=True)
    try:
        for stage in stages:
            t0 = time.perf_counter()
            st, retries = None, []
            while st is None:
                try:
                    st = run_stage(b, stage, s, cfg.iters, cfg.warmup)
                except torch.cuda.OutOfMemoryError as e:  # a GPU smaller than the batch: halve the training forwards and retry
                    if s.train_batch == 1 and s.sft_train_batch == 1:
                        raise
                    retries.append(dict(train_batch=s.train_batch, sft_train_batch=s.sft_train_batch, error=str(e).splitlines()[0]))
                    print(f"  {stage}: out of memory at train batch {s.train_batch} / SFT {s.sft_train_batch}: retrying at half", flush=True)
                    s = copy.copy(s)
                    s.train_batch, s.sft_train_batch = max(1, s.train_batch // 2), max(1, s.sft_train_batch // 2)
                    b.counter.take()
                    b.phases.take()
                    for p in b.transformer.parameters():
                        p.grad = None
                    torch.cuda.empty_cache()
            if retries:
                st["out_of_memory_retries"] = retries
            result["stages"][stage] = st
            print(f"  {stage}: {st['total_seconds']:.2f} s/iteration ({st['images']} images), floor {st['floor_seconds']:.2f} s, "
                  f"{st['counts']['forwards_per_image']:.1f} fwd + {st['counts']['backwards_per_image']:.1f} bwd per image "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            runs.write_json(out_path, result)  # partial results survive a time-out
        if cfg.paper_counts:
            result["paper_counts"] = paper_counts(b, stages)
        ratios = {}
        st = result["stages"]
        if "opd" in st and "grpo" in st:
            ratios["OPD / GRPO iteration (equal batch, each stage's defaults)"] = dict(
                value=st["opd"]["total_seconds"] / st["grpo"]["total_seconds"], target=TARGET_OPD_GRPO)
        if "opd" in st and "grpo-w0" in st:
            ratios["OPD / GRPO iteration (equal batch, GRPO trains every step like OPD: SDE window 0)"] = dict(
                value=st["opd"]["total_seconds"] / st["grpo-w0"]["total_seconds"], target=TARGET_OPD_GRPO)
        if "opd" in st and "grpo" in st:
            ratios["OPD / GRPO floor (equal batch, defaults)"] = dict(value=st["opd"]["floor_seconds"] / st["grpo"]["floor_seconds"], target=TARGET_OPD_GRPO)
        for g in ("grpo", "grpo-w0"):  # counted work: immune to other jobs' load; what a compute-bound GPU's times approach
            if "opd" in st and g in st and st["opd"].get("model_flops") and st[g].get("model_flops"):
                ratios[f"OPD / {g.upper()} model FLOPs (equal batch{', GRPO window 0' if g == 'grpo-w0' else ''})"] = dict(
                    value=st["opd"]["model_flops"] / st[g]["model_flops"], target=TARGET_OPD_GRPO)
        result["ratios"] = ratios
        if cfg.memory:
            result["memory_sd35_medium"] = sd35_medium_memory(cfg.lora_rank, cfg.lora_alpha)
            if "opd" in st and "cuda_max_memory_allocated_bytes" in st["opd"]:  # the same OPD iteration with full copies
                m = result["memory"]
                peak = st["opd"]["cuda_max_memory_allocated_bytes"]
                m["cuda_peak_opd_bytes"] = peak
                m["cuda_peak_opd_separate_copies_estimate_bytes"] = peak + m["separate_copies_bytes"] - m["adapters_bytes"]
    finally:
        result["peak_rss_bytes"] = peak_rss_bytes()
        result["load_after"] = load_info()
        result["wall_seconds"] = time.perf_counter() - wall
        result["nonfinite_values_seen"] = dict(b.guard)  # what the stages' divergence guard would have stopped on
        for stage in result["stages"].values():  # keep the JSON readable: signatures stay, raw calls do not
            stage.pop("calls", None)
        runs.write_json(out_path, result)
        b.close()
    print_table(result)
    print(f"\nwrote {out_path} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
