"""
bench/speed.py: where the time of an epoch of each stage goes, and how far it is from the floor (issue #16; issue 26
item 7), measured on the STAGE SCRIPTS THEMSELVES: grpo_expert.py, sft_init.py and opd.py run unchanged, one after
the other in this one process (runpy, each with its own command line), for --epochs epochs each (default 2: the first
warms up, the figures are the last one's). Nothing of their loops is copied here, so nothing here can drift from them.

  phases     the scripts' own per-phase timers (their log.jsonl's sec_*: GRPO sampling / reward / training, OPD
             sampling / teachers / reward / training, SFT training per optimizer step); SFT's teacher cache, which no
             timer of its own covers, is the span of its transformer calls before training
  counts     transformer forwards and backwards per image (CFG's [uncond; cond] rows count 2), COUNTED per phase by
             bench/gpu_check.py's probe (a forward hook on the transformer, a gradient hook on each output), beside
             what the loops make by construction (expected_counts) and opd.py's own forwards_* fields. At SD3's
             settings (T = 10, 9 trained steps, CFG, SDE on every step, 4 teachers + the MAR anchor) they are
             PAPER-NOTES' figures: OPD 74 forwards + 18 backwards per image, GRPO 56 + 18, SFT 80 per cached item + 1 + 1
             per trained item (81 + 1 when each cached item is trained once)
  floor      every distinct transformer call of the measured epoch (input shapes, grad or not, back-propagated or
             not, active adapter) timed alone on random inputs after one warm-up call (median of --floor-reps), times
             how often the epoch made it; iteration / floor per stage (target <= 1.10)
  FLOPs      torch.utils.flop_counter on one call of each kind: model TFLOP/s of the epoch and of the floor, and
             the MFU against --peak-tflops on a GPU
  memory     peak GPU memory per stage (the probe, around each phase of the script's timer; the script's own
             peak_mem_gib where it logs one) or the process's peak RSS; OPD's transformer after its run (the teachers
             as LoRA adapters + the student on one frozen base) in bytes, against separate full copies; the same at
             SD3.5-Medium's size on the meta device (target <= 1.2 models)
  ratios     OPD / GRPO epoch at equal batch (target <= 1.3): seconds, floor, model FLOPs; where the world's SDE window
             is not 0 (the tiny world's 2), also against grpo_expert.py --sde-window 0 (grpo-w0: every step trained, as OPD)

Worlds
  tiny          the project's tiny world: its shipped experts are the teachers, its rewards score
  sd3-random    a random SD3 pipeline built in a temp folder by bench/gpu_check.py (--scale tiny: SD3.5-Medium's
                architecture at tiny width, for CPUs; --scale full: SD3.5-Medium's configs, for a GPU), its random
                teacher LoRAs, and PickScore on a random CLIP as GRPO's reward (it runs here without a server); OPD
                runs with --no-score and SFT with --task pickscore (the GenEval / DeQA servers are not here)
  <folder>      an SD3 pipeline folder (--teachers task=file,... for sft and opd)

Commands (from the repository root)
  tiny world, CPU:                      python bench/speed.py
  random SD3 at tiny width, CPU:        python bench/speed.py --world sd3-random --scale tiny
  SD3.5-M-sized, one GPU:               python bench/speed.py --world sd3-random --scale full
                                        (bench/gpu.sh is the time-boxed GPU check of grpo and opd, with the same probe)
Writes --out (default results/bench/speed_<world>.json).
"""

import contextlib
import gc
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402
import runs  # noqa: E402
import worlds  # noqa: E402

SETTINGS = dict(
    world=("tiny", "tiny | sd3-random (sd3-tiny = sd3-random --scale tiny) | an SD3 pipeline folder (see the docstring)"),
    scale=("tiny", "sd3-random: 'tiny' (SD3.5-Medium's architecture at tiny width) or 'full' (SD3.5-Medium's configs)"),
    device=(None, str, "cpu | cuda (default: cuda when available)"),
    stages=("grpo,sft,opd", "stages to run, in this order"),
    epochs=(2, "epochs of grpo / opd, optimizer steps of sft; the figures are the last one's (the first warms up)"),
    # the stages' batch settings (the scripts' defaults)
    prompts_per_epoch=(8, "grpo / opd --prompts-per-epoch"),
    group_size=(8, "grpo / opd --group-size"),
    sample_batch=(16, "--sample-batch of all three"),
    train_batch=(16, "grpo / opd --train-batch"),
    updates_per_epoch=(2, "grpo / opd --updates-per-epoch"),
    steps=(None, int, "T: grpo / opd --steps (default: the world's, 10)"),
    sft_batch=(None, int, "sft_init.py --batch (default: prompts-per-epoch x group-size, the RL stages' batch)"),
    sft_train_batch=(32, "sft_init.py --train-batch"),
    sft_items=(None, int, "sft_init.py --prompts-per-task: cached teacher samples per task (default: a quarter of the SFT batch)"),
    sft_sample_steps=(None, int, "sft_init.py --sample-steps (default: the world's eval steps, 40 on SD3)"),
    grpo_window0=(True, "where the world's SDE window is not 0 (the tiny world's 2), also run grpo_expert.py --sde-window 0 "
                        "(grpo-w0): the OPD / GRPO ratio at equal trained steps, as on SD3.5-M"),
    grpo_task=(None, str, "grpo_expert.py --task (default: geneval on the tiny world, pickscore on SD3)"),
    sft_task=(None, str, "sft_init.py --task (default: its own, all four tasks, on the tiny world; pickscore on SD3: its cache scores "
                         "every sample, and the GenEval / DeQA servers are not here)"),
    teachers=("", "task=file LoRA teachers for sft / opd (default: the tiny world's shipped experts; sd3-random's random ones)"),
    mar_weight=(0.02, "opd.py --mar-weight"),
    gradient_checkpointing=(False, "the stage scripts' --gradient-checkpointing"),
    floor_reps=(3, "timed repetitions of every distinct transformer call for the floor (median)"),
    flops=(True, "count FLOPs (FlopCounterMode) of every distinct call"),
    peak_tflops=(None, float, "the device's dense peak for the MFU (default 989 = H100 SXM / H200 bf16 on CUDA; none on CPU)"),
    memory=(True, "adapters vs separate copies in bytes (+ SD3.5-M's on the meta device)"),
    threads=(0, "CPU threads (the scripts' --threads; 0 = theirs)"),
    seed=(0, "the scripts' --seed"),
    out=(None, str, "JSON output (default results/bench/speed_<world>.json)"),
)

TARGET_FLOOR = 1.10  # iteration / floor, every stage (issue #16, CPU)
TARGET_OPD_GRPO = 1.3  # OPD / GRPO epoch at equal batch
TARGET_MEMORY = 1.2  # 4 teachers + anchor as adapters, in units of one model
SCRIPTS = {"grpo": "grpo_expert.py", "grpo-w0": "grpo_expert.py", "sft": "sft_init.py", "opd": "opd.py"}

# -----------------------------------------------------------------------------
# Worlds


@contextlib.contextmanager
def world_setup(cfg, device):
    """(world argument for the scripts, teachers spec, environment for them) for the benchmark's world names; a
    sd3-random world is built in a temp folder (removed at the end)."""
    if cfg.world == "tiny":
        yield dict(world="tiny", teachers=cfg.teachers, env={}, kind="tiny")
        return
    if cfg.world != "sd3-random":
        if not os.path.isfile(os.path.join(cfg.world, "model_index.json")):
            raise SystemExit(f"error: --world {cfg.world!r} is neither tiny, sd3-random nor an SD3 pipeline folder")
        yield dict(world=cfg.world, teachers=cfg.teachers, env={}, kind="sd3")
        return
    size = {"tiny": "tiny", "full": "medium"}[cfg.scale]
    tmp = tempfile.mkdtemp(prefix="speed-sd3-")
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        transformer = gpu_check.build_pipeline(os.path.join(tmp, "sd3"), size, device, dtype)
        teachers = gpu_check.write_teachers(transformer, os.path.join(tmp, "teachers"), gpu_check.SIZES[size]["lora_rank"])
        del transformer
        gpu_check.write_prompts(os.path.join(tmp, "prompts"))
        gpu_check.write_pickscore(os.path.join(tmp, "pickscore"), size, device)
        env = dict(FLOWOPD_PROMPTS=os.path.join(tmp, "prompts"), FLOWOPD_PICKSCORE_MODEL=os.path.join(tmp, "pickscore"),
                   FLOWOPD_PICKSCORE_PROCESSOR=os.path.join(tmp, "pickscore"))
        yield dict(world=os.path.join(tmp, "sd3"), teachers=cfg.teachers or ",".join(f"{t}={f}" for t, f in teachers.items()),
                   env=env, kind="sd3", transformer_config={k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in gpu_check.SIZES[size]["transformer"].items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def environment(values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -----------------------------------------------------------------------------
# The stages' command lines


def stage_argv(stage, cfg, w, out):
    common = ["--world", w["world"], "--seed", str(cfg.seed), "--no-resume", "--out", out]
    common += ["--threads", str(cfg.threads)] if cfg.threads else []
    common += ["--gradient-checkpointing"] if cfg.gradient_checkpointing else []
    rl = ["--epochs", str(cfg.epochs), "--prompts-per-epoch", str(cfg.prompts_per_epoch), "--group-size", str(cfg.group_size),
          "--sample-batch", str(cfg.sample_batch), "--train-batch", str(cfg.train_batch), "--updates-per-epoch", str(cfg.updates_per_epoch),
          "--grid-every", "0", "--save-every", str(cfg.epochs)]
    rl += ["--steps", str(cfg.steps)] if cfg.steps else []
    teachers = ["--teachers", w["teachers"]] if w["teachers"] else []
    if stage in ("grpo", "grpo-w0"):
        task = cfg.grpo_task or ("geneval" if w["kind"] == "tiny" else "pickscore")
        return common + rl + ["--task", task] + (["--sde-window", "0"] if stage == "grpo-w0" else [])
    if stage == "opd":
        return common + rl + teachers + ["--mar-weight", str(cfg.mar_weight)] + (["--no-score"] if w["kind"] != "tiny" else [])
    batch = cfg.sft_batch or cfg.prompts_per_epoch * cfg.group_size
    items = cfg.sft_items or max(1, math.ceil(batch / 4))
    sft = ["--steps", str(cfg.epochs), "--batch", str(batch), "--train-batch", str(cfg.sft_train_batch), "--prompts-per-task", str(items),
           "--sample-batch", str(cfg.sample_batch), "--log-every", "1", "--save-every", str(cfg.epochs), "--probe", "0"]
    sft += ["--sample-steps", str(cfg.sft_sample_steps)] if cfg.sft_sample_steps else []
    task = cfg.sft_task or (None if w["kind"] == "tiny" else "pickscore")
    sft += ["--task", task] if task else []
    return common + teachers + sft


def expected_counts(stage, config, log):
    """Forwards / backwards per image that the scripts' loops make by construction (rows; CFG counts 2), from the
    run's own config.json and last log record: what the hook counts are checked against. SFT: per trained item,
    and per cached item under 'cache'."""
    T = config.get("steps")
    c = 2 if (config.get("guidance_scale") or 0) > 1 else 1
    if stage in ("grpo", "grpo-w0"):
        S = int(math.floor(T * config["timestep_fraction"]))
        trained = config["sde_window"] or S
        kept = log.get("kept", 1.0)
        reference = 1 if (config.get("beta") or 0) > 0 else 0
        return dict(forwards=c * T + kept * trained * c * (1 + reference), backwards=kept * trained * c)
    if stage == "opd":
        S = int(math.floor(T * config["timestep_fraction"]))
        k = config.get("distil_steps") or S
        anchor = 1 if config.get("mar_weight", 0) > 0 else 0
        return dict(forwards=c * T + c * k * (1 + anchor) + c * k, backwards=c * k)
    if stage == "sft":
        c_train = 2 if (config.get("train_guidance") or 1) > 1 else 1
        per_item = c_train * (2 if config.get("base_reg") else 1)
        c_sample = 2 if (config.get("guidance_scale") or 0) > 1 else 1
        return dict(forwards=per_item, backwards=c_train, cache=dict(forwards_per_item=c_sample * config["sample_steps"] * config.get("best_of", 1)))
    raise ValueError(stage)


# -----------------------------------------------------------------------------
# The floor: the epoch's transformer calls, each kind timed alone


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_signature(call):
    return (call["shape"], call["dtype"], call["grad"], call["adapter"], call["backward"] > 0)


def _signature_inputs(world, shape):
    hidden, embeds, pooled = shape
    g = torch.Generator().manual_seed(0)
    make = lambda s: torch.randn(s, generator=g).to(world.device, world.dtype)
    return dict(hidden_states=make(hidden), encoder_hidden_states=make(embeds), pooled_projections=make(pooled),
                timestep=(torch.rand(hidden[0], generator=g) * 1000).to(world.device))  # float32, as sde.predict_velocity


def measure_floor(world, calls, reps=3, flops=True):
    """Each distinct (shapes, dtype, grad, adapter, backward) call timed `reps` times after one warm-up call on random
    inputs (median), times how often `calls` made it. Returns per-signature rows, seconds (total and per phase), FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = world.transformer
    groups = {}
    for c in calls:
        groups.setdefault(call_signature(c), []).append(c)
    rows, per_phase, total_flops = [], {}, 0 if flops else None
    for sig, members in groups.items():
        shape, dtype, grad, name, backward = sig
        inputs = _signature_inputs(world, shape)

        def one_call():
            with torch.set_grad_enabled(grad):
                out = transformer(**inputs, return_dict=False)[0]
                if backward:
                    out.float().square().mean().backward()

        with worlds.adapter(transformer, name):
            one_call()
            times = []
            for _ in range(reps):
                _sync(world.device)
                start = time.perf_counter()
                one_call()
                _sync(world.device)
                times.append(time.perf_counter() - start)
            n_flops = None
            if flops:
                with FlopCounterMode(display=False) as counter:
                    one_call()
                n_flops = counter.get_total_flops()
                total_flops += n_flops * len(members)
        seconds = statistics.median(times)
        rows.append(dict(shape=[list(s) if s else None for s in shape], dtype=dtype, grad=grad, adapter=name, backward=backward,
                         count=len(members), seconds_per_call=seconds, flops_per_call=n_flops))
        for c in members:
            per_phase[c["phase"]] = per_phase.get(c["phase"], 0.0) + seconds
    for p in transformer.parameters():
        p.grad = None
    return dict(seconds=sum(per_phase.values()), by_phase=per_phase, flops=total_flops, signatures=rows)


def count_summary(calls, images):
    """Forward and backward rows per image, in total and per phase, and the number of calls."""
    out = dict(calls=len(calls), forwards_per_image=sum(c["rows"] for c in calls) / images,
               backwards_per_image=sum(c["rows"] * c["backward"] for c in calls) / images, by_phase={})
    for phase in dict.fromkeys(c["phase"] for c in calls):
        mine = [c for c in calls if c["phase"] == phase]
        out["by_phase"][phase] = dict(calls=len(mine), forwards_per_image=sum(c["rows"] for c in mine) / images,
                                      backwards_per_image=sum(c["rows"] * c["backward"] for c in mine) / images)
    return out


# -----------------------------------------------------------------------------
# Memory


def module_bytes(module, keep=lambda name: True):
    return sum(t.numel() * t.element_size() for name, t in list(module.named_parameters()) + list(module.named_buffers()) if keep(name))


def adapter_bytes(transformer, name):
    return module_bytes(transformer, lambda n: "lora_" in n and f".{name}." in n)


def base_bytes(transformer):
    return module_bytes(transformer, lambda n: "lora_" not in n)


def adapters_vs_copies(transformer, frozen, student="student"):
    """The frozen adapters + the student's on one base, against each frozen model as a full copy + the student's base."""
    one = base_bytes(transformer)
    each = {name: adapter_bytes(transformer, name) for name in frozen}
    stu = adapter_bytes(transformer, student)
    shared = one + sum(each.values()) + stu
    separate = one * (len(frozen) + 1) + stu
    return dict(one_model_bytes=one, frozen_adapters=each, student_adapter_bytes=stu, adapters_bytes=shared,
                separate_copies_bytes=separate, adapters_ratio=shared / one, separate_copies_ratio=separate / one, target_ratio=TARGET_MEMORY,
                what=f"{len(frozen)} frozen LoRAs (opd.py's teachers; its MAR anchor is the base) + the student's LoRA on one base, "
                     "against each frozen model as its own full copy + the student's base and LoRA")


def sd35_medium_memory(rank=32, alpha=64, frozen=5):
    """Parameter + buffer bytes at SD3.5-Medium's size, on the meta device (no memory): the bf16 base, `frozen` LoRAs
    (4 teachers + the paper's DeQA anchor) as peft makes them on it, the student's LoRA in float32 as the scripts keep it."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"), gpu_check._quiet_diffusers():
        tr = SD3Transformer2DModel(**gpu_check.SD35_MEDIUM)
        tr.to(torch.bfloat16)
    names = [f"frozen{k}" for k in range(frozen)] + ["student"]
    for name in names:
        worlds.add_lora(tr, name, rank, alpha)
        for p in worlds.lora_parameters(tr, name).values():  # peft makes every adapter in the base's dtype on a real device
            p.data = p.data.to(torch.bfloat16)
    for p in worlds.lora_parameters(tr, "student").values():
        p.data = p.data.float()
    out = adapters_vs_copies(tr, names[:-1])
    out.update(parameters=sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n),
               what=f"SD3.5-Medium's transformer in bf16 + {frozen} frozen r={rank} LoRAs (4 teachers + an anchor) + the float32 student LoRA, vs full copies")
    return out


# -----------------------------------------------------------------------------
# One stage


def run_stage(stage, cfg, w, folder, device):
    """Run the stage's script under the probe, then time the floor of its last epoch on the transformer it used."""
    out_dir = os.path.join(folder, stage)
    argv = stage_argv(stage, cfg, w, out_dir)
    probe = gpu_check.Probe(record_calls=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with environment(w["env"]):
        code = gpu_check.run_stage_script(SCRIPTS[stage], argv, probe)
    stats = probe.result()
    st = dict(script=SCRIPTS[stage], command=" ".join(["python", SCRIPTS[stage], *argv]), exit_code=code)
    log_path = os.path.join(out_dir, "log.jsonl")
    if code != 0 or not os.path.isfile(log_path):
        probe.detach()
        st["error"] = f"{SCRIPTS[stage]} exited {code} (its output above says why)"
        return st, None
    with open(log_path) as f:
        log = [json.loads(line) for line in f if line.strip()]
    log = [r for r in log if any(k.startswith("sec_") for k in r)]
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    last = log[-1]
    if stage == "sft":  # its config.json keeps None for the world's defaults
        images = config["batch"]
        defaults = probe.worlds[0].defaults
        config["sample_steps"] = config.get("sample_steps") or defaults["eval_steps"]
        config["guidance_scale"] = defaults["guidance_scale"] if config.get("guidance_scale") is None else config["guidance_scale"]
    else:
        images = config["prompts_per_epoch"] * config["group_size"]
    phases = {k[4:]: v for k, v in last.items() if k.startswith("sec_")}
    total = sum(phases.values())
    measured = [c for c in probe.calls if c["epoch"] == probe.timers]  # the last epoch's (sft: the last step's) calls
    st.update(images=images, epochs=len(log), total_seconds=total, seconds_per_image=total / images, phases=phases,
              phases_per_image={k: v / images for k, v in phases.items()},
              first_epoch_seconds=sum(v for k, v in log[0].items() if k.startswith("sec_")), log_fields=sorted(last),
              settings={k: config.get(k) for k in ("steps", "guidance_scale", "sde_window", "timestep_fraction", "prompts_per_epoch",
                                                   "group_size", "sample_batch", "train_batch", "updates_per_epoch", "batch",
                                                   "prompts_per_task", "sample_steps", "mar_weight", "task", "beta", "gradient_checkpointing")},
              setup_seconds=stats["setup_seconds"], wall_seconds=stats["wall_seconds"], peak_rss_bytes=stats["peak_rss_bytes"])
    st["counts"] = count_summary(measured, images)
    st["counts"]["expected"] = expected_counts(stage, config, last)
    if "kept" in last:
        st["counts"]["kept"] = last["kept"]
    logged = {k[9:]: v for k, v in last.items() if k.startswith("forwards_")}
    if logged:
        st["counts"]["logged_forwards_per_image"] = logged
    if stage == "sft":  # the teacher cache: the calls before training, per cached item
        cache = [c for c in probe.calls if c["phase"] == "untimed"]
        n_items = config["prompts_per_task"] * len(config["task"].split(","))
        st["cache"] = dict(items=n_items, seconds=stats["untimed_calls_span_seconds"], forwards_per_item=sum(c["rows"] for c in cache) / n_items,
                           note="sft_init.py times no phase of its cache: seconds = the span of its transformer calls (sampling and rewards)")
    if stats["cuda"]:
        st["peak_memory_bytes"] = stats["peak_bytes"]
        st["peak_memory_bytes_by_phase"] = {p: e["peak_bytes"] for p, e in stats["phases"].items() if p != "untimed"}
    if "peak_mem_gib" in last:
        st["logged_peak_mem_gib"] = last["peak_mem_gib"]
    world = probe.worlds[0]
    floor = measure_floor(world, measured, reps=cfg.floor_reps, flops=cfg.flops)
    st.update(floor_seconds=floor["seconds"], floor_by_phase=floor["by_phase"], floor_signatures=floor["signatures"],
              iteration_over_floor=total / floor["seconds"] if floor["seconds"] else None)
    if floor["flops"] is not None:
        st["model_flops"] = floor["flops"]
        st["model_tflops_per_s_iteration"] = floor["flops"] / total / 1e12
        st["model_tflops_per_s_floor"] = floor["flops"] / floor["seconds"] / 1e12
        peak = cfg.peak_tflops or (gpu_check.H100_BF16_PEAK if device.type == "cuda" else None)
        if peak:
            st.update(peak_tflops=peak, mfu_iteration=st["model_tflops_per_s_iteration"] / peak,
                      mfu_floor=st["model_tflops_per_s_floor"] / peak)
    memory = None
    if stage == "opd" and cfg.memory:
        frozen = [f"teacher_{t}" for t in (config.get("teachers") or {}) if f"teacher_{t}" in (world.transformer.peft_config or {})]
        memory = adapters_vs_copies(world.transformer, frozen)
    probe.detach()
    return st, memory


# -----------------------------------------------------------------------------
# Report


def print_table(result, log=print):
    w = result["world"]
    log(f"\nworld {w['name']} on {w['device']} | each stage script run for {result['epochs']} epoch(s), the figures of the last; "
        f"floor: median of {result['floor_reps']} reps per distinct call")
    log(f"{'stage':<8}{'imgs':>5}  {'phases (s, the script timers)':<44}{'total':>8}{'s/img':>8}{'floor':>8}{'it/floor':>9}"
        f"{'fwd/img':>8}{'bwd/img':>8}{'expected':>10}")
    for name, st in result["stages"].items():
        if "error" in st:
            log(f"{name:<8} {st['error']}")
            continue
        phases = " ".join(f"{k} {v:.2f}" for k, v in st["phases"].items())
        c, e = st["counts"], st["counts"]["expected"]
        flag = "" if (st["iteration_over_floor"] or 0) <= TARGET_FLOOR else "!"
        log(f"{name:<8}{st['images']:>5}  {phases:<44}{st['total_seconds']:>8.2f}{st['seconds_per_image']:>8.3f}{st['floor_seconds']:>8.2f}"
            f"{st['iteration_over_floor']:>8.2f}{flag:1}{c['forwards_per_image']:>8.1f}{c['backwards_per_image']:>8.1f}"
            f"{e['forwards']:>6.1f}/{e['backwards']:<3.0f}")
    for name, st in result["stages"].items():
        if "error" in st:
            continue
        extra = ["per phase: " + " ".join(f"{p} {b['forwards_per_image']:g}/{b['backwards_per_image']:g}" for p, b in st["counts"]["by_phase"].items())]
        if "logged_forwards_per_image" in st["counts"]:
            extra.append(f"logged forwards_* {st['counts']['logged_forwards_per_image']}")
        if "model_tflops_per_s_iteration" in st:
            mfu = f", MFU {st['mfu_iteration']:.1%} (floor {st['mfu_floor']:.1%}) of {st['peak_tflops']:g}" if "mfu_iteration" in st else ""
            extra.append(f"{st['model_flops'] / st['images'] / 1e12:.4g} TFLOP/img, {st['model_tflops_per_s_iteration']:.3g} TFLOP/s{mfu}")
        if "peak_memory_bytes" in st:
            extra.append(f"peak GPU {st['peak_memory_bytes'] / 2**30:.2f} GiB")
        if "cache" in st:
            extra.append(f"cache {st['cache']['items']} items {st['cache']['seconds']:.2f} s, {st['cache']['forwards_per_item']:g} fwd/item "
                         f"(expected {st['counts']['expected']['cache']['forwards_per_item']:g})")
        log(f"  {name}: " + " | ".join(extra))
    for key, ratio in result.get("ratios", {}).items():
        log(f"{key}: {ratio['value']:.2f} (target <= {ratio['target']}) {'ok' if ratio['value'] <= ratio['target'] else 'ABOVE TARGET'}")
    m = result.get("memory")
    if m:
        log(f"memory: one model {m['one_model_bytes'] / 2**20:.2f} MiB; {m['what']}: {m['adapters_ratio']:.2f}x (target <= {TARGET_MEMORY}), "
            f"separate copies {m['separate_copies_ratio']:.2f}x")
    mm = result.get("memory_sd35_medium")
    if mm:
        log(f"  at SD3.5-M size (meta device): one model {mm['one_model_bytes'] / 2**30:.2f} GiB ({mm['parameters'] / 1e9:.2f} B params): "
            f"adapters {mm['adapters_ratio']:.3f}x, separate copies {mm['separate_copies_ratio']:.2f}x")
    log(f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")


def main(argv=None):
    cfg = runs.parse_settings(__doc__, SETTINGS, argv)
    if cfg.world in ("sd3-tiny", "sd3-random-medium"):  # the names of the earlier speed.py
        cfg.world, cfg.scale = "sd3-random", "tiny" if cfg.world == "sd3-tiny" else cfg.scale
    stages = [x for x in cfg.stages.split(",") if x]
    if "grpo" in stages and cfg.grpo_window0 and cfg.world == "tiny" and "grpo-w0" not in stages:  # the tiny world's window is 2
        stages.insert(stages.index("grpo") + 1, "grpo-w0")
    bad = [x for x in stages if x not in SCRIPTS]
    if bad:
        raise SystemExit(f"error: unknown stage(s) {bad}; known: {', '.join(SCRIPTS)}")
    if cfg.scale not in ("full", "tiny"):
        raise SystemExit(f"error: --scale must be full or tiny, got {cfg.scale!r}")
    if cfg.epochs < 1:
        raise SystemExit("error: --epochs must be >= 1")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    wall = time.perf_counter()
    tag = (cfg.world if cfg.world == "tiny" else {"tiny": "sd3-tiny", "full": "sd3-random-medium"}[cfg.scale] if cfg.world == "sd3-random"
           else os.path.basename(os.path.normpath(cfg.world)))
    out_path = cfg.out or os.path.join(ROOT, "results", "bench", f"speed_{tag}.json")
    result = dict(command=" ".join(["python", "bench/speed.py", *(sys.argv[1:] if argv is None else argv)]), torch=torch.__version__,
                  epochs=cfg.epochs, floor_reps=cfg.floor_reps, stages={},
                  targets=dict(iteration_over_floor=TARGET_FLOOR, opd_over_grpo=TARGET_OPD_GRPO, memory=TARGET_MEMORY))
    with world_setup(cfg, device) as w, tempfile.TemporaryDirectory(prefix="speed-runs-") as folder:
        result["world"] = dict(name=tag, kind=w["kind"], device=str(device), transformer_config=w.get("transformer_config"),
                               cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        for stage in stages:
            t0 = time.perf_counter()
            st, memory = run_stage(stage, cfg, w, folder, device)
            result["stages"][stage] = st
            if memory:
                result["memory"] = memory
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "error" not in st:
                print(f"  {stage}: {st['total_seconds']:.2f} s/epoch ({st['images']} images), floor {st['floor_seconds']:.2f} s, "
                      f"{st['counts']['forwards_per_image']:g} fwd + {st['counts']['backwards_per_image']:g} bwd per image "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            runs.write_json(out_path, result)  # partial results survive a time-out
    st = {k: v for k, v in result["stages"].items() if "error" not in v}
    ratios = {}
    if "opd" in st and "grpo" in st:
        ratios["OPD / GRPO epoch (equal batch)"] = dict(value=st["opd"]["total_seconds"] / st["grpo"]["total_seconds"], target=TARGET_OPD_GRPO)
        ratios["OPD / GRPO floor (equal batch)"] = dict(value=st["opd"]["floor_seconds"] / st["grpo"]["floor_seconds"], target=TARGET_OPD_GRPO)
        if st["opd"].get("model_flops") and st["grpo"].get("model_flops"):
            ratios["OPD / GRPO model FLOPs (equal batch)"] = dict(value=st["opd"]["model_flops"] / st["grpo"]["model_flops"], target=TARGET_OPD_GRPO)
    if "opd" in st and "grpo-w0" in st:
        ratios["OPD / GRPO epoch (equal batch, GRPO trains every step like OPD: --sde-window 0)"] = dict(
            value=st["opd"]["total_seconds"] / st["grpo-w0"]["total_seconds"], target=TARGET_OPD_GRPO)
        if st["opd"].get("model_flops") and st["grpo-w0"].get("model_flops"):
            ratios["OPD / GRPO model FLOPs (equal batch, GRPO --sde-window 0)"] = dict(
                value=st["opd"]["model_flops"] / st["grpo-w0"]["model_flops"], target=TARGET_OPD_GRPO)
    result["ratios"] = ratios
    if cfg.memory:
        result["memory_sd35_medium"] = sd35_medium_memory()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["wall_seconds"] = time.perf_counter() - wall
    runs.write_json(out_path, result)
    print_table(result)
    print(f"\nwrote {out_path} ({result['wall_seconds']:.0f} s)")
    if any("error" in v for v in result["stages"].values()):
        raise SystemExit(f"error: stage(s) {[k for k, v in result['stages'].items() if 'error' in v]} failed (see above)")
    return result


if __name__ == "__main__":
    main()
