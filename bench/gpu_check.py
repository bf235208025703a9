"""
bench/gpu_check.py: the parts of the GPU check (bench/gpu.sh) that are Python, after the offline install
(bench/install_wheels.py). bench/gpu.sh calls them in this order; each is also a command of its own
(python bench/gpu_check.py <command> --help):

  build     a RANDOM-weight StableDiffusion3Pipeline folder (--size medium: SD3.5-Medium's configs, T5 cut to a
            few layers; --size tiny: the same architecture at tiny width, for CPU tests), random teacher LoRAs
            written with worlds.save_lora, small prompt files under <dir>/prompts/sd3 (FLOWOPD_PROMPTS), a random
            PickScore CLIP (CLIP-H at medium size) in <dir>/pickscore (FLOWOPD_PICKSCORE_MODEL / _PROCESSOR), and the
            transformer's FLOPs per image row (counted on the meta device)
  stage     runs ONE stage script (grpo_expert.py, opd.py, ...) in this process, unchanged (runpy, its own argv),
            and records around it: per phase of the script's own timer (runs.Timer) the peak GPU memory, and the
            transformer's forward and backward rows counted by hooks; writes them to --stats
  report    reads the stage scripts' log.jsonl / config.json and the --stats files: s/image per phase, forwards
            and backwards per image, peak memory, model TFLOP/s and MFU; prints a table, writes a JSON

Sizes (--size medium; only the transformer's are the ones that time, the rest are there to be loaded, run
once by worlds.encode_once, and freed as on a real run):
  transformer  SD3.5-Medium's SD3Transformer2DModel config: 24 layers, 24 heads x 64 = 1536 wide, joint_attention_dim
               4096, caption_projection_dim 1536, pooled_projection_dim 2048, 16 latent channels, patch 2,
               sample_size 128, pos_embed_max_size 384, dual attention in layers 0..12, RMS q/k norm: 2.24 B parameters
  CLIP-L / G   their real sizes (768 wide x 12 layers / 1280 wide x 32 layers, vocab 49408); the tokenizers are
               character-level BPE vocabularies built offline (random weights need no real vocabulary)
  T5           d_model 4096, d_ff 10240, 64 heads (T5-XXL's widths) but 2 layers instead of 24 (its 4.7 B weights
               would only add minutes of writing and loading; it runs once per run, before training)
  VAE          SD3's AutoencoderKL config (128/256/512/512 channels, 16 latent channels, scaling 1.5305, shift 0.0609)
  PickScore    CLIP ViT-H/14 (1280 x 32 vision layers, 1024 x 24 text layers, projection 1024), random, float32
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("geneval", "ocr", "deqa", "pickscore")
H100_BF16_PEAK = 989.0  # TFLOP/s, dense bf16, H100 SXM / H200

# -----------------------------------------------------------------------------
# build: a random SD3 pipeline, teachers, prompts, a random PickScore, FLOPs per row

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SIZES = {
    "medium": dict(
        transformer=SD35_MEDIUM,
        clip_l=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                    hidden_act="quick_gelu", vocab_size=49408),
        clip_g=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                    hidden_act="gelu", vocab_size=49408),
        t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu"),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
        pickscore=dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, vocab_size=49408),
                       vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                   image_size=224, patch_size=14), projection_dim=1024, image=224),
        lora_rank=32, text_tokens=77 + 128,
    ),
    "tiny": dict(  # the same architecture (dual attention, RMS q/k norm, 16 latent channels, patch 2) at tiny width
        transformer=dict(SD35_MEDIUM, sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32, dual_attention_layers=(0,)),
        clip_l=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=16, hidden_act="gelu"),
        clip_g=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=16, hidden_act="gelu"),
        t5=dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
        pickscore=dict(text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
                       vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                   patch_size=8), projection_dim=16, image=32),
        lora_rank=4, text_tokens=77 + 128,
    ),
}
PROMPTS = {  # a few per task; OCR's carry their target text in double quotes (rewards.ocr_target)
    "geneval": ["a photo of a cat", "a photo of two dogs", "a photo of a red car and a blue cup"],
    "ocr": ['a sign that says "open"', 'a poster with the word "summer"', 'a shop window marked "sale 50%"'],
    "deqa": ["a castle at sunset", "a bowl of soup on a wooden table", "an old tram in the rain"],
    "pickscore": ["a red apple on a table", "a lighthouse in a storm, oil painting", "a cup of coffee, studio light"],
}
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()%")


def clip_tokenizer():
    """A character-level CLIP BPE tokenizer built offline (no merges): <|startoftext|> = 0, <|endoftext|> = 1."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A character-level Unigram T5 tokenizer built offline (<pad> = 0, </s> = 1, <unk> = 2, as T5's)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


@contextlib.contextmanager
def _quiet_diffusers():
    """No 'modules that should be kept in float32' notices on .to(dtype), no progress bars of save_pretrained."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def build_pipeline(path, size, device, dtype, seed=0):
    """A random StableDiffusion3Pipeline of `size`, created on `device` (no CPU initialisation of 2 B weights on a
    GPU), saved in `dtype` to `path`. Returns the transformer (still on the device)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    s = SIZES[size]
    tok, tok_2, tok_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    clip_ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77, layer_norm_eps=1e-5)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in the saved dtype: half the memory and time of a float32 start
    try:
        with torch.device(device), _quiet_diffusers():
            torch.manual_seed(seed)
            te = CLIPTextModelWithProjection(CLIPTextConfig(**dict(dict(vocab_size=len(tok)), **s["clip_l"]), **clip_ids))
            torch.manual_seed(seed + 1)
            te_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(dict(vocab_size=len(tok_2)), **s["clip_g"]), **clip_ids))
            torch.manual_seed(seed + 2)
            te_3 = T5EncoderModel(T5Config(**dict(dict(vocab_size=len(tok_3)), **s["t5"]), pad_token_id=0, eos_token_id=1,
                                           decoder_start_token_id=0))
            torch.manual_seed(seed + 3)
            transformer = SD3Transformer2DModel(**s["transformer"])
            torch.manual_seed(seed + 4)
            v = s["vae"]
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(v["block_out_channels"]),
                                up_block_types=("UpDecoderBlock2D",) * len(v["block_out_channels"]), latent_channels=16,
                                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609, **v)
    finally:
        torch.set_default_dtype(default_dtype)
    with _quiet_diffusers():
        for m in (te, te_2, te_3, transformer, vae):
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)  # buffers made from numpy are created on the CPU
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        text_encoder=te, tokenizer=tok, text_encoder_2=te_2, tokenizer_2=tok_2,
                                        text_encoder_3=te_3, tokenizer_3=tok_3)
        pipe.save_pretrained(os.fspath(path))
    del pipe, te, te_2, te_3, vae
    return transformer


def write_teachers(transformer, folder, rank, seed=0):
    """One random LoRA per task (A as peft's gaussian init, B ~ N(0, 1e-3^2): each teacher moves the velocity a
    little, so OPD's KL is not zero), written with worlds.save_lora: {task: file}."""
    import torch

    sys.path.insert(0, ROOT)
    import worlds

    files = {}
    for k, task in enumerate(TASKS):
        name = f"teacher_{task}"
        worlds.add_lora(transformer, name, rank, 2 * rank, seed=seed + k)
        g = torch.Generator().manual_seed(seed + 100 + k)
        with torch.no_grad():
            for n, p in worlds.lora_parameters(transformer, name).items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g).mul_(1e-3).to(p.device, p.dtype))
        files[task] = os.path.join(folder, f"{task}.safetensors")
        worlds.save_lora(transformer, name, files[task])
        transformer.delete_adapters(name)
    return files


def write_pickscore(folder, size, device, seed=0):
    """A random CLIP of PickScore's architecture (ViT-H/14 at medium size, float32 as PickScore_v1 ships) and its
    processor in one folder: FLOWOPD_PICKSCORE_MODEL = FLOWOPD_PICKSCORE_PROCESSOR = folder make rewards' PickScore
    load it. Returns its parameter count."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    p = SIZES[size]["pickscore"]
    tok = clip_tokenizer()
    text = dict(dict(vocab_size=len(tok)), **p["text"], max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device(device):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=p["vision"], projection_dim=p["projection_dim"])).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": p["image"]},
                                                                 crop_size={"height": p["image"], "width": p["image"]}),
                              tokenizer=tok)
    with _quiet_diffusers():
        processor.save_pretrained(folder)
        model.to(torch.float32).save_pretrained(folder)
    n = sum(q.numel() for q in model.parameters())
    del model
    return n


def write_prompts(root):
    folder = os.path.join(root, "sd3")
    os.makedirs(folder, exist_ok=True)
    for task, prompts in PROMPTS.items():
        with open(os.path.join(folder, f"{task}_train.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")


def count_flops(size, image, rank):
    """Model FLOPs of the transformer per image row (one CFG half counts as a row), at `image` px, counted with
    torch.utils.flop_counter on the meta device (no memory, no time): a forward with a LoRA of `rank` active, and a
    forward + backward with that LoRA trainable (the backward of a frozen base with a LoRA: input gradients plus the
    LoRA's weight gradients, no base weight gradients)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, ROOT)
    import worlds

    s = SIZES[size]
    cfg = s["transformer"]
    with torch.device("meta"), _quiet_diffusers():
        tr = SD3Transformer2DModel(**cfg)
    tr.to("meta").requires_grad_(False)
    worlds.add_lora(tr, "student", rank, 2 * rank)
    latent = image // 8 if size == "medium" else image // 2
    x = torch.zeros(1, cfg["in_channels"], latent, latent, device="meta")
    kw = dict(hidden_states=x, encoder_hidden_states=torch.zeros(1, s["text_tokens"], cfg["joint_attention_dim"], device="meta"),
              pooled_projections=torch.zeros(1, cfg["pooled_projection_dim"], device="meta"),
              timestep=torch.zeros(1, device="meta"), return_dict=False)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tr(**kw)
    fwd = fc.get_total_flops()
    for p in worlds.lora_parameters(tr, "student").values():
        p.requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        tr(**kw)[0].sum().backward()
    return dict(forward_per_row=fwd, forward_backward_per_row=fc.get_total_flops(), image=image, text_tokens=s["text_tokens"],
                parameters=sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n), lora_rank=rank)


def cmd_build(args):
    import torch

    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    s = SIZES[args.size]
    os.makedirs(args.dir, exist_ok=True)
    pipeline = os.path.join(args.dir, "sd3")
    transformer = build_pipeline(pipeline, args.size, device, dtype)
    t_pipe = time.perf_counter() - start
    teachers = write_teachers(transformer, os.path.join(args.dir, "teachers"), s["lora_rank"])
    del transformer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    write_prompts(os.path.join(args.dir, "prompts"))
    n_pick = write_pickscore(os.path.join(args.dir, "pickscore"), args.size, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    image = min(512, s["transformer"]["sample_size"] * (8 if args.size == "medium" else 2))
    flops = count_flops(args.size, image, 32)  # the stage scripts' student: r = 32
    info = dict(size=args.size, device=str(device), dtype=str(dtype).removeprefix("torch."), pipeline=pipeline, teachers=teachers,
                prompts=os.path.join(args.dir, "prompts"), pickscore=os.path.join(args.dir, "pickscore"), pickscore_parameters=n_pick,
                flops=flops, transformer_config={k: list(v) if isinstance(v, tuple) else v for k, v in s["transformer"].items()},
                t5_layers=s["t5"]["num_layers"], seconds=time.perf_counter() - start, seconds_pipeline=t_pipe,
                pipeline_bytes=sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(pipeline) for f in fs))
    with open(os.path.join(args.dir, "build.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"build: random {args.size} SD3 pipeline ({info['pipeline_bytes'] / 2**20:,.0f} MiB, {info['dtype']}), 4 random r={s['lora_rank']} "
          f"teachers, prompts, random PickScore ({n_pick / 1e6:,.1f} M params) in {info['seconds']:.1f} s "
          f"(pipeline {t_pipe:.1f} s); transformer {flops['parameters'] / 1e6:,.1f} M params, "
          f"{flops['forward_per_row'] / 1e9:,.2f} GFLOP per row forward at {image} px")


# -----------------------------------------------------------------------------
# stage: one stage script in this process, measured around its own timer


def active_adapter(transformer):
    """The adapter the transformer runs as now: its name, or None for the bare base (adapters disabled or none)."""
    sys.path.insert(0, ROOT)
    import worlds

    layers = worlds._lora_layers(transformer) if getattr(transformer, "_hf_peft_config_loaded", False) else []
    if not layers or layers[0]._disable_adapters:
        return None
    active = layers[0]._active_adapter
    return active if isinstance(active, str) else ",".join(active)


class Probe:
    """Per phase of the stage script's own runs.Timer: wall seconds with the GPU synchronised at the phase's end
    (the script's own figures are its log's), peak GPU memory (torch.cuda.max_memory_allocated, reset at each
    phase's start), and the transformer's rows: forwards with and without grad, backwards (a forward hook, and a
    gradient hook on a forward's output that counts the backward reaching it)."""

    def __init__(self, record_calls=False):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.phase = "untimed"  # transformer calls outside the script's timers (sft_init.py's teacher cache)
        self.phases = {}
        self.peak_overall = self.peak_since_script_reset = 0
        self.start = time.perf_counter()
        self.first_phase_at = None
        self.memory_at_first_phase = None
        self.worlds, self.handles = [], []
        self.timers = 0  # runs.Timer objects made so far: the scripts make one per epoch (sft_init.py: per step)
        self.record_calls = record_calls
        self.calls = []  # with record_calls: every transformer call (bench/speed.py's floor replays them)
        self.untimed_span = None  # (first, last) perf_counter of the untimed transformer calls

    def _entry(self, phase):
        return self.phases.setdefault(phase, dict(seconds=0.0, peak_bytes=0, forward_rows_grad=0, forward_rows_no_grad=0,
                                                  backward_rows=0, calls=0))

    def _peak(self):
        """The peak since the probe's last reset, folded into the overall peak and into the peak since the stage
        script's own last reset (runs.peak_memory), which the probe's resets would otherwise cut short."""
        if not self.cuda:
            return 0
        peak = self.torch.cuda.max_memory_allocated()
        self.peak_overall = max(self.peak_overall, peak)
        self.peak_since_script_reset = max(self.peak_since_script_reset, peak)
        return peak

    def script_peak_memory(self, original):
        """runs.peak_memory for the script: its logged peak_mem_gib as without the probe (the max over the probe's
        resets since the script's previous call), then the script's reset."""
        def peak_memory(device, *args, **kwargs):
            peak = self._peak()
            result = original(device, *args, **kwargs)
            if self.cuda and isinstance(result, dict) and "peak_mem_gib" in result:
                result["peak_mem_gib"] = round(max(result["peak_mem_gib"], self.peak_since_script_reset / 2**30, peak / 2**30), 2)
            self.peak_since_script_reset = 0
            return result

        return peak_memory

    @contextlib.contextmanager
    def timer_phase(self, phase, timer_call):
        if self.first_phase_at is None:
            self.first_phase_at = time.perf_counter() - self.start
            self.memory_at_first_phase = self.torch.cuda.memory_allocated() if self.cuda else None
        if self.cuda:
            self.torch.cuda.synchronize()
            self._peak()
            self.torch.cuda.reset_peak_memory_stats()
        previous, self.phase = self.phase, phase
        t0 = time.perf_counter()
        try:
            with timer_call(phase):
                yield
                if self.cuda:
                    self.torch.cuda.synchronize()  # inside the script's own timer: its phase holds its GPU work
        finally:
            e = self._entry(phase)
            e["seconds"] += time.perf_counter() - t0
            e["peak_bytes"] = max(e["peak_bytes"], self._peak())
            self.phase = previous

    def attach(self, world):
        def forward(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rows = int(hidden.shape[0])
            e = self._entry(self.phase)
            e["calls"] += 1
            e["forward_rows_grad" if self.torch.is_grad_enabled() else "forward_rows_no_grad"] += rows
            if self.phase == "untimed":
                now = time.perf_counter()
                self.untimed_span = (self.untimed_span or (now, now))[0], now
            call = None
            if self.record_calls:
                shapes = tuple(tuple(kwargs[k].shape) if self.torch.is_tensor(kwargs.get(k)) else None
                               for k in ("encoder_hidden_states", "pooled_projections"))
                call = dict(epoch=self.timers, phase=self.phase, rows=rows, shape=(tuple(hidden.shape),) + shapes,
                            dtype=str(hidden.dtype).removeprefix("torch."), grad=self.torch.is_grad_enabled(),
                            adapter=active_adapter(module), backward=0)
                self.calls.append(call)
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if self.torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda grad: self._backward(rows, call))

        self.handles.append(world.transformer.register_forward_hook(forward, with_kwargs=True))
        self.worlds.append(world)

    def _backward(self, rows, call):
        self._entry(self.phase)["backward_rows"] += rows
        if call is not None:
            call["backward"] += 1

    def detach(self):
        """Remove the hooks and let go of the worlds (their transformers, adapters, optimizer-held weights)."""
        for h in self.handles:
            h.remove()
        self.handles, self.worlds = [], []

    def result(self):
        self._peak()
        untimed = self.untimed_span[1] - self.untimed_span[0] if self.untimed_span else 0.0
        return dict(phases=self.phases, peak_bytes=self.peak_overall if self.cuda else None, untimed_calls_span_seconds=untimed,
                    timers=self.timers, calls=self.calls,
                    peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    setup_seconds=self.first_phase_at, memory_at_first_phase_bytes=self.memory_at_first_phase,
                    wall_seconds=time.perf_counter() - self.start, cuda=self.cuda,
                    device=self.torch.cuda.get_device_name() if self.cuda else "cpu")


@contextlib.contextmanager
def instrumented(probe):
    """Patch runs.Timer (phases) and worlds.load_world (hooks on the loaded transformer) for the stage script run
    inside: its code is unchanged, it only looks these two up in their modules as it always does."""
    sys.path.insert(0, ROOT)
    import runs
    import worlds

    timer_cls, load_world, peak_memory = runs.Timer, worlds.load_world, getattr(runs, "peak_memory", None)

    class Timer(timer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probe.timers += 1

        def __call__(self, phase):
            return probe.timer_phase(phase, super().__call__)

    def load_world_probed(*args, **kwargs):
        world = load_world(*args, **kwargs)
        probe.attach(world)
        return world

    runs.Timer, worlds.load_world = Timer, load_world_probed
    if peak_memory is not None:
        runs.peak_memory = probe.script_peak_memory(peak_memory)
    try:
        yield
    finally:
        runs.Timer, worlds.load_world = timer_cls, load_world
        if peak_memory is not None:
            runs.peak_memory = peak_memory


def run_stage_script(script, argv, probe):
    """Run `script` (a path from the repository root) as __main__ with `argv`, under the probe; returns its exit code."""
    import runpy

    path = script if os.path.isabs(script) else os.path.join(ROOT, script)
    saved = sys.argv
    sys.argv = [path, *argv]
    code = 0
    try:
        with instrumented(probe):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code not in (None, 0) and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    finally:
        sys.argv = saved
    return code


def cmd_stage(args):
    probe = Probe(record_calls=True)
    code = 1
    try:
        code = run_stage_script(args.script, args.args, probe)
    finally:
        result = dict(probe.result(), script=args.script, argv=args.args, exit_code=code)
        os.makedirs(os.path.dirname(os.path.abspath(args.stats)), exist_ok=True)
        with open(args.stats, "w") as f:
            json.dump(result, f, indent=2)
    sys.exit(code)


# -----------------------------------------------------------------------------
# report


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_report(run_dir, stats_path, flops, peak_tflops):
    """One stage's figures from its own log.jsonl (the last epoch: the first holds the first-call costs), its
    config.json and the probe's stats."""
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    log = _read_jsonl(os.path.join(run_dir, "log.jsonl"))
    stats = json.load(open(stats_path)) if os.path.isfile(stats_path) else {}
    last = log[-1]
    images = cfg["prompts_per_epoch"] * cfg["group_size"]
    phases = {k[4:]: v for k, v in last.items() if k.startswith("sec_")}
    total = sum(phases.values())
    out = dict(images_per_epoch=images, epochs_logged=len(log), phases_seconds=phases,
               seconds_per_image={k: v / images for k, v in phases.items()}, total_seconds=total,
               total_seconds_per_image=total / images, first_epoch_seconds=sum(v for k, v in log[0].items() if k.startswith("sec_")),
               log_fields=sorted(last), settings={k: cfg.get(k) for k in ("steps", "guidance_scale", "sde_window", "prompts_per_epoch",
                                                                       "group_size", "sample_batch", "train_batch", "updates_per_epoch",
                                                                       "gradient_checkpointing", "task", "teachers")})
    for k in ("peak_mem_gib", "peak_mem_gb"):  # the script's own (runs.peak_memory: the epoch's peak)
        if k in last:
            out["logged_peak_memory"] = {k: last[k]}
    logged_forwards = {k[9:]: v for k, v in last.items() if k.startswith("forwards_")}
    if logged_forwards:
        out["logged_forwards_per_image"] = logged_forwards
    if stats:
        # the last epoch's transformer calls (the probe numbers the script's runs.Timer objects: one per epoch)
        calls = [c for c in stats.get("calls", []) if c["epoch"] == stats.get("timers")]
        counted, model_flops = {}, 0.0
        for c in calls:
            e = counted.setdefault(c["phase"], dict(forwards_per_image=0.0, backwards_per_image=0.0))
            e["forwards_per_image"] += c["rows"] / images
            e["backwards_per_image"] += c["rows"] * c["backward"] / images
            if flops:
                model_flops += c["rows"] * flops["forward_per_row"]
                model_flops += c["rows"] * c["backward"] * (flops["forward_backward_per_row"] - flops["forward_per_row"])
        out["counted_per_image"] = counted
        out["forwards_per_image"] = sum(c["forwards_per_image"] for c in counted.values())
        out["backwards_per_image"] = sum(c["backwards_per_image"] for c in counted.values())
        out["peak_memory_gib"] = stats["peak_bytes"] / 2**30 if stats.get("peak_bytes") is not None else None
        out["peak_memory_gib_by_phase"] = ({p: e["peak_bytes"] / 2**30 for p, e in stats.get("phases", {}).items() if p != "untimed"}
                                           if stats.get("cuda") else None)
        out["memory_after_setup_gib"] = stats["memory_at_first_phase_bytes"] / 2**30 if stats.get("memory_at_first_phase_bytes") else None
        out["peak_rss_gib"] = stats["peak_rss_bytes"] / 2**30
        out["setup_seconds"] = stats.get("setup_seconds")
        out["wall_seconds"] = stats.get("wall_seconds")
        out["device"] = stats.get("device")
        if flops and total:
            out["model_tflop_per_epoch"] = model_flops / 1e12
            out["model_tflops_per_s"] = model_flops / total / 1e12  # the last epoch's model FLOPs over its logged seconds
            if stats.get("cuda") and peak_tflops:
                out["mfu"] = out["model_tflops_per_s"] / peak_tflops
    return out


def cmd_report(args):
    build = json.load(open(os.path.join(args.dir, "build.json"))) if os.path.isfile(os.path.join(args.dir, "build.json")) else {}
    flops = build.get("flops")
    peak = args.peak_tflops or H100_BF16_PEAK
    result = dict(build={k: build.get(k) for k in ("size", "device", "dtype", "seconds", "pipeline_bytes", "t5_layers",
                                                    "transformer_config", "flops", "pickscore_parameters")},
                  peak_tflops=peak, stages={}, missing_log_fields=[])
    for name in args.stages.split(","):
        run_dir = os.path.join(args.dir, "runs", name)
        if not os.path.isfile(os.path.join(run_dir, "log.jsonl")):
            result["stages"][name] = dict(error=f"no log.jsonl in {run_dir} (the stage failed or was cut off: see its log)")
            continue
        result["stages"][name] = stage_report(run_dir, os.path.join(args.dir, f"stats_{name}.json"), flops, peak)
    for name, st in result["stages"].items():
        if "log_fields" in st and "logged_peak_memory" not in st and (result["build"].get("device") or "").startswith("cuda"):
            result["missing_log_fields"].append(f"{name}: peak_mem_gib (measured here by the probe instead)")
        if "log_fields" in st and "logged_forwards_per_image" not in st:
            result["missing_log_fields"].append(f"{name}: forwards_* / backwards_* per image (counted here by hooks instead)")
    if {"grpo", "opd"} <= set(result["stages"]) and all("total_seconds_per_image" in result["stages"][k] for k in ("grpo", "opd")):
        g, o = result["stages"]["grpo"], result["stages"]["opd"]
        result["opd_over_grpo_per_image"] = o["total_seconds_per_image"] / g["total_seconds_per_image"]
        no_reward = lambda st: sum(v for k, v in st["seconds_per_image"].items() if k != "reward")  # opd.py runs --no-score here
        result["opd_over_grpo_per_image_without_reward"] = no_reward(o) / no_reward(g)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print_report(result)


def print_report(r):
    b = r["build"]
    print(f"\n== GPU check: {b.get('size')} random SD3 on {b.get('device')} ({b.get('dtype')}); figures of each stage's last epoch "
          f"(its own log.jsonl timers)")
    for name, st in r["stages"].items():
        if "error" in st:
            print(f"{name}: {st['error']}")
            continue
        per = " ".join(f"{k} {v:.3f}" for k, v in st["seconds_per_image"].items())
        print(f"{name}: {st['images_per_epoch']} images/epoch, {st['total_seconds']:.2f} s/epoch = {st['total_seconds_per_image']:.3f} s/image "
              f"[{per}] (first epoch {st['first_epoch_seconds']:.2f} s; set-up {st.get('setup_seconds') or 0:.1f} s)")
        counted = " ".join(f"{p} {c['forwards_per_image']:g}/{c['backwards_per_image']:g}" for p, c in st.get("counted_per_image", {}).items())
        print(f"   forwards / backwards per image (CFG rows count 2): {st.get('forwards_per_image', 0):g} / {st.get('backwards_per_image', 0):g} "
              f"[{counted}]" + (f"; logged forwards_*: {st['logged_forwards_per_image']}" if "logged_forwards_per_image" in st else ""))
        mem = st.get("peak_memory_gib")
        if mem is not None:
            by = " ".join(f"{p} {v:.1f}" for p, v in (st.get("peak_memory_gib_by_phase") or {}).items())
            print(f"   peak GPU memory {mem:.1f} GiB (after set-up {st.get('memory_after_setup_gib') or 0:.1f}; by phase: {by})")
        else:
            print(f"   peak RSS {st.get('peak_rss_gib', 0):.2f} GiB (CPU)")
        if "model_tflops_per_s" in st:
            mfu = f", MFU {100 * st['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s" if "mfu" in st else ""
            print(f"   model {st['model_tflop_per_epoch']:.2f} TFLOP in the epoch, {st['model_tflops_per_s']:.2f} TFLOP/s over its logged seconds{mfu}")
    if "opd_over_grpo_per_image" in r:
        print(f"OPD / GRPO s/image: {r['opd_over_grpo_per_image']:.2f}; without the reward phase (OPD runs --no-score here): "
              f"{r['opd_over_grpo_per_image_without_reward']:.2f}")
    if r["missing_log_fields"]:
        print("not in the stage logs yet: " + "; ".join(r["missing_log_fields"]))


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="random SD3 pipeline, teachers, prompts, PickScore, FLOPs")
    p.add_argument("--dir", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="medium")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="the pipeline's dtype (default: bfloat16 on CUDA, float32 elsewhere, as worlds.load_world)")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("stage", help="run one stage script under the probe")
    p.add_argument("--stats", required=True)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("report", help="the table and JSON from the stages' logs")
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="grpo,opd")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
