"""
worlds.py: the two worlds behind one interface, their prompt files, and LoRA adapters on their
transformer. Shared by the stage scripts (the middle floor: it imports tiny_world.py, nothing above).

  1. worlds            the tiny world and SD3.5-Medium behind one interface      World, load_world
  2. prompts           Flow-GRPO's prompt files, teachers, an epoch's prompts    read_prompts, prompt_file,
                                                                                 parse_teachers, draw_prompts
  3. LoRA              peft adapters on the transformer, diffusers-loadable      add_lora, save_lora, load_lora, adapter
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from types import SimpleNamespace

import numpy as np
import torch

import runs

# Quiet the libraries' start-up chatter (torchvision fallbacks, several-adapter notices): the scripts'
# own output is what a reader follows.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# 1. Worlds: the tiny world and Stable Diffusion 3.5 Medium behind one small interface


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
    # the world's sampling defaults: shift, train/eval steps, guidance, resolution, noise level, SDE window
    defaults: dict
    tasks: tuple  # task names with a reward in this world
    source: str = ""  # where the base weights come from (a file or folder): a run's input, checked on resume


# The settings of the paper (Flow-GRPO's): 512 px, shift 3.0, T = 10 SDE steps for training,
# 40 ODE steps for evaluation, CFG 4.5, noise level a = 0.7.
SD3_DEFAULTS = dict(resolution=512, shift=3.0, train_steps=10, eval_steps=40, guidance_scale=4.5, noise_level=0.7,
                    max_sequence_length=128,
                    sde_window=0,  # 0: every step is stochastic (Flow-GRPO, the paper); see sde_window_steps
                    # Flow-GRPO's SD3.5-M batch (config/grpo.py): 48 prompts x 24 images an epoch over all GPUs,
                    # 9 images a forward per GPU. Activations of 9 training images: ~43 GiB without checkpointing
                    # (README).
                    prompts_per_epoch=48, group_size=24, sample_batch=9, train_batch=9)
# the tiny world's batch: minutes on a CPU
TINY_BATCH = dict(prompts_per_epoch=8, group_size=8, sample_batch=16, train_batch=16)
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

    cached_encode.uncached = encode  # encode_once streams many prompts to disk: it must not fill this cache
    return cached_encode


def load_world(name="tiny", device=None, dtype=None):
    """`load_world("tiny")`: the project's tiny world (shipped weights, CPU-friendly); `"tiny:<file>"`:
    the same world with another base (a candidate from tiny_pretrain.py pretrain).
    `load_world(path_or_hub_id)`: Stable Diffusion 3.5 Medium through diffusers. Text encoders and VAE
    are frozen; bf16 on GPU, float32 on CPU unless `dtype` says otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "tiny" or name.startswith("tiny:"):
        import tiny_world

        base = name.partition(":")[2] or tiny_world.CHECKPOINT
        if not os.path.isfile(base):
            raise SystemExit(f"error: tiny-world base {base} does not exist (world {name!r}: 'tiny' or "
                             f"'tiny:<base .safetensors>')")
        # codec: the pixel-unshuffle, or the base's autoencoder
        transformer, encode, codec = tiny_world.load_base(base, device=device)
        transformer.requires_grad_(False)
        latent = tuple(codec.shape) != tiny_world.LATENT_SHAPE  # a base with its own autoencoder samples as SD3 does:
        defaults = dict(                                        # shift 3, noise on every step (the pixel departures go)
            resolution=tiny_world.IMAGE_SIZE, shift=SD3_DEFAULTS["shift"] if latent else tiny_world.SHIFT,
            train_steps=10,
            eval_steps=tiny_world.DEFAULT_STEPS_EVAL, guidance_scale=tiny_world.DEFAULT_GUIDANCE,
            noise_level=tiny_world.DEFAULT_NOISE_LEVEL, sde_window=0 if latent else tiny_world.DEFAULT_SDE_WINDOW,
            **TINY_BATCH)
        decode = lambda latents: codec.decode(latents.float().cpu())
        return World("tiny", name, transformer, _cached(encode), decode, tuple(codec.shape),
                     device, torch.float32, defaults, tuple(tiny_world.TASKS), base)
    return _load_sd3(name, device, dtype)


VAE_SLICE = 2  # images per VAE decode call on SD3: the decode's peak memory does not grow with the batch


def _load_sd3(path, device, dtype):
    from diffusers import StableDiffusion3Pipeline

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SystemExit(f"error: {path} is not a Stable Diffusion 3 pipeline folder (no model_index.json); "
                         f"pass the SD3.5-Medium folder or hub id")
    if not os.path.exists(path) and path.count("/") != 1:
        raise SystemExit(f"error: world {path!r} is neither 'tiny', an existing folder, nor a hub id like "
                         f"stabilityai/stable-diffusion-3.5-medium")
    # FLOWOPD_DTYPE=bfloat16 runs the GPU's precision on a CPU (the tests' check of the bf16 path)
    named = os.environ.get("FLOWOPD_DTYPE")
    if named and not isinstance(getattr(torch, named, None), torch.dtype):
        raise SystemExit(f"error: FLOWOPD_DTYPE={named!r} is not a torch dtype (bfloat16, float16 or float32)")
    dtype = dtype or (getattr(torch, named) if named else torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        # the VAE in float32, as Flow-GRPO decodes (0.17 GB): bf16 decoding shifts the pixels the rewards see
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype={"default": dtype, "vae": torch.float32})
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
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=d["max_sequence_length"])
        return embeds.to(dtype), pooled.to(dtype)

    @torch.no_grad()
    def decode(latents):
        # in slices of VAE_SLICE images: the float32 VAE's activations at 512 px are ~1 GiB an image, so decoding
        # a whole sample batch at once (16 in OPD) would set the peak; each slice's images go to the CPU
        images = []
        for part in latents.split(VAE_SLICE):
            part = part.float() / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            images.append((pipe.vae.decode(part, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(images)

    world = World("sd3", str(path), pipe.transformer, _cached(encode), decode, latent_shape, device, dtype, d, TASKS,
                  str(path))
    world.pipeline = pipe  # kept for users who want the diffusers pipeline (e.g. load_lora_weights)
    return world


def encode_once(world, prompts, cache_dir, batch=64):
    """SD3: encode every prompt a run can use (and the empty one) once, keep them on disk in cache_dir
    (a folder named by the text encoders' and the prompts' identity, reused by later runs), then free the
    three text encoders: T5-XXL alone holds ~9.5 GB of GPU memory in bf16, and every prompt is known
    before training. The tiny world's encoder is a small table: nothing to do.

    At scale: one SD3 prompt embedding is 205 x 4096 bf16, 1.68 MB, so Flow-GRPO's 25,432
    PickScore prompts are ~43 GB. So under torchrun each rank encodes only its own contiguous share of
    the sorted prompts and streams it, batch by batch, into its own shard file (memory does not grow
    with the number of prompts); rank 0 then writes index.json, the cache's commit point. Every rank
    afterwards reads rows from all the shards, memory-mapped: a prompt outside the set is an error.
    The folder must be one that all nodes see (FLOWOPD_PROMPT_CACHE overrides cache_dir): a node-local
    folder is refused with one line on every rank, instead of ranks that disagree."""
    import hashlib

    from safetensors import safe_open

    pipe = getattr(world, "pipeline", None)
    if world.kind != "sd3" or pipe is None or pipe.text_encoder_3 is None and pipe.text_encoder is None:
        return
    cache_dir = os.environ.get("FLOWOPD_PROMPT_CACHE") or str(cache_dir)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    prompts = sorted(set(prompts) | {""})
    ident = hashlib.sha256(json.dumps([world.defaults["max_sequence_length"], str(world.dtype), prompts]).encode())
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        folder = os.path.join(world.name, part)  # configs and file sizes: cheap, and they change with the weights
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            f = os.path.join(folder, name)
            ident.update(f"{part}/{name}:{os.path.getsize(f)}".encode())
            if name.endswith(".json"):
                with open(f, "rb") as g:
                    ident.update(g.read())
    folder = os.path.join(cache_dir, f"prompts-{ident.hexdigest()[:16]}")
    index_path = os.path.join(folder, "index.json")
    encode = getattr(world.encode_prompts, "uncached", world.encode_prompts)  # never the in-memory cache

    dist = SimpleNamespace(world_size=size, rank=rank, device=world.device)

    # rank r's contiguous share of the sorted prompts, and the shard it writes
    shards = [dict(file=f"shard-{r:05d}-of-{size:05d}.safetensors", first=len(prompts) * r // size,
                   count=len(prompts) * (r + 1) // size - len(prompts) * r // size) for r in range(size)]
    # rank 0's index.json alone decides, sent to every rank: another node's copy of the folder may not show it
    # yet (NFS caches attributes), and ranks that decided apart would disagree on the collectives that follow
    index = runs.from_master(dist, _read_json(index_path) if rank == 0 else None)
    if index is None:
        with runs.all_or_none(dist):  # one rank out of memory or disk: every rank stops, with its message
            mine = prompts[shards[rank]["first"]: shards[rank]["first"] + shards[rank]["count"]]
            _write_shard(os.path.join(folder, shards[rank]["file"]), encode, mine, batch,
                         dict(prompts=json.dumps(mine)))
        index = dict(prompts=len(prompts), shards=shards)
    with runs.all_or_none(dist):
        if rank == 0 and not os.path.isfile(index_path):  # the commit point: without index.json, encoded again
            with runs.atomic_file(index_path, "w") as f:
                json.dump(index, f)
        runs.wait_readable([os.path.join(folder, s["file"]) for s in index["shards"]], f"the prompt cache {folder}",
                           "put it on a filesystem that all nodes share (FLOWOPD_PROMPT_CACHE=<shared folder>)")
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
    row, slices = {}, []
    for k, s in enumerate(index["shards"]):
        f = safe_open(os.path.join(folder, s["file"]), "pt")
        slices.append((f.get_slice("embeds"), f.get_slice("pooled")) if s["count"] else (None, None))
        for i, p in enumerate(json.loads(f.metadata()["prompts"])):
            row[p] = (k, i)

    def encode_from_disk(batch_prompts):
        missing = [p for p in batch_prompts if p not in row]
        if missing:
            raise SystemExit(f"error: prompt {missing[0]!r} was not among the {len(row)} prompts encoded at start-up "
                             f"({folder}); "
                             "the text encoders are freed: pass every prompt file the run uses to worlds.encode_once")
        rows = [row[p] for p in batch_prompts]
        return (torch.cat([slices[k][0][i: i + 1] for k, i in rows]).to(world.device, world.dtype),
                torch.cat([slices[k][1][i: i + 1] for k, i in rows]).to(world.device, world.dtype))

    world.encode_prompts = encode_from_disk
    return folder


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _read_json(path):
    """The JSON object in `path`, or None when there is none (or it is unreadable: encoded again)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_shard(path, encode, prompts, batch, metadata):
    """Encode `prompts` batch by batch straight into one safetensors file ('embeds' (n, L, D), 'pooled'
    (n, P)), written in place at each batch's offset and renamed when whole: only one batch is ever in
    memory, however many prompts there are. safetensors is an 8-byte header length, a JSON header with
    every tensor's dtype, shape and byte range, then the raw bytes: simple enough to stream."""
    with runs.atomic_file(path, "wb") as f:
        if not prompts:  # a rank with no share (more ranks than prompts): an empty shard
            header = json.dumps({"__metadata__": metadata}).encode()
            f.write(len(header).to_bytes(8, "little") + header)
        at = None
        for b in range(0, len(prompts), batch):
            embeds, pooled = (t.detach().contiguous().cpu() for t in encode(prompts[b: b + batch]))
            if at is None:  # the first batch tells the shapes: write the header, then fill in place
                e_row, p_row = embeds[0].numel() * embeds.element_size(), pooled[0].numel() * pooled.element_size()
                n = len(prompts)
                header = {"embeds": dict(dtype=_SAFETENSORS_DTYPES[embeds.dtype], shape=[n, *embeds.shape[1:]],
                                         data_offsets=[0, n * e_row]),
                          "pooled": dict(dtype=_SAFETENSORS_DTYPES[pooled.dtype], shape=[n, *pooled.shape[1:]],
                                         data_offsets=[n * e_row, n * e_row + n * p_row]),
                          "__metadata__": metadata}
                header = json.dumps(header).encode()
                header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
                at = 8 + len(header)
                f.write(len(header).to_bytes(8, "little") + header)
                f.truncate(at + n * (e_row + p_row))
            f.seek(at + b * e_row)
            f.write(embeds.view(torch.uint8).numpy().tobytes())
            f.seek(at + n * e_row + b * p_row)
            f.write(pooled.view(torch.uint8).numpy().tobytes())


# -----------------------------------------------------------------------------
# 2. Prompts: Flow-GRPO's prompt files, the teachers' files, the prompts of an epoch


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


def read_test_prompts(path, limit=0):
    """A test file's distinct prompts: (prompts, metadata, how many duplicate lines were merged). One prompt
    written on 4 lines (GenEval's test file) is one prompt: K images, not 4K, and one unit of the standard
    errors, not 4 (4 correlated copies would understate them up to 2x); the same text with other metadata asks
    another question (other GenEval clauses) and is kept apart. limit > 0 keeps that many, evenly spread over
    the file: files are often grouped by category (GenEval's, the tiny OOD set), and a prefix would test only
    the first."""
    lines = list(zip(*read_prompts(path)))  # (prompt, metadata) per line
    distinct = {}  # (prompt, metadata as JSON) -> (prompt, metadata), in order of first appearance
    for prompt, meta in lines:
        distinct.setdefault((prompt, json.dumps(meta, sort_keys=True)), (prompt, meta))
    prompts, metadata = [p for p, _ in distinct.values()], [m for _, m in distinct.values()]
    n = min(limit, len(prompts)) if limit > 0 else len(prompts)
    keep = np.linspace(0, len(prompts) - 1, n).round().astype(int).tolist() if n else []
    return [prompts[i] for i in keep], [metadata[i] for i in keep], len(lines) - len(prompts)


def base_fingerprint(world):
    """A cheap identity of a world's base weights: its name and the first 4096 values of every 8th tensor."""
    h = hashlib.sha256(world.name.encode())
    for i, (n, p) in enumerate(world.transformer.state_dict().items()):
        if i % 8 == 0 and "lora_" not in n:
            h.update(n.encode() + p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


# Where each SD3 prompt file comes from, for the missing-file error (prompts/sd3/README.md has the details).
SD3_PROMPT_SOURCES = {
    "geneval": "Flow-GRPO's dataset/geneval/{split}_metadata.jsonl",
    "ocr": "Flow-GRPO's dataset/ocr/{split}.txt",
    "pickscore": "Flow-GRPO's dataset/pickscore/{split}.txt",
}
SD3_DEQA_SOURCES = {  # not in Flow-GRPO's dataset/: the user supplies them (one prompt per line)
    "test": "DrawBench's 200 prompts (arXiv 2205.11487; e.g. the Hugging Face dataset shunk031/DrawBench, "
            "column 'prompts'), one per line",
    "train": "the paper does not name DeQA's training prompts; Flow-GRPO's general prompts are the stand-in: "
             "cp pickscore_train.txt deqa_train.txt",
}


def prompt_file(world, task, split):
    """Where a task's prompts live: {root}/{world.kind}/{task}_{split}.jsonl or .txt, root = the
    FLOWOPD_PROMPTS environment variable if set, else the repository's prompts/ (prompts/tiny ships;
    prompts/sd3 is filled by `python prompts/get_sd3_prompts.py` from Flow-GRPO's dataset/)."""
    folder = os.path.join(os.environ.get("FLOWOPD_PROMPTS") or os.path.join(HERE, "prompts"), world.kind)
    for ext in (".jsonl", ".txt"):
        path = os.path.join(folder, f"{task}_{split}{ext}")
        if os.path.isfile(path):
            return path
    where = ""
    if world.kind == "sd3" and task in SD3_PROMPT_SOURCES:
        where = (f": copy {SD3_PROMPT_SOURCES[task].format(split=split)} from github.com/yifan123/flow_grpo there "
                 f"(python prompts/get_sd3_prompts.py does it)")
    elif world.kind == "sd3" and task == "deqa":
        where = f": {SD3_DEQA_SOURCES.get(split, SD3_DEQA_SOURCES['test'])}"
    raise SystemExit(f"error: no prompt file for task {task!r} split {split!r} in {folder} "
                     f"(expected {task}_{split}.txt or .jsonl){where}")


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


def parse_models(spec):
    """--models 'base,opd=path/to/adapter.safetensors' -> {label: LoRA file or PEFT folder, None = the base}."""
    models = {}
    for entry in runs.comma_list(spec):
        label, sep, path = entry.partition("=")
        if not sep and label != "base":
            raise SystemExit(f"error: --models entry {entry!r}: write 'base' or label=path/to/adapter.safetensors")
        if sep and not os.path.exists(path):
            raise SystemExit(f"error: --models {label}: LoRA file or PEFT folder {path} does not exist")
        if label in models or not re.fullmatch(r"[\w.+-]+", label):
            raise SystemExit(f"error: --models label {label!r} is repeated or not made of letters, digits, _ . + -")
        models[label] = path or None
    return models


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


# -----------------------------------------------------------------------------
# 3. LoRA adapters (peft, through diffusers' PeftAdapterMixin), saved so that diffusers'
#    StableDiffusion3Pipeline.load_lora_weights reads them; read from those files and from PEFT adapter
#    folders (PeftModel.save_pretrained: Flow-GRPO's released teachers)

# Flow-GRPO's target modules: every attention projection of the joint (image + text) blocks.
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


def add_lora(transformer, name="default", rank=32, alpha=64, targets=LORA_TARGETS, seed=0):
    """Attach a fresh LoRA adapter (A ~ Gaussian from `seed`, B = 0: the model is unchanged) and make it
    the active one. The seed keeps A independent of whatever used the global RNG before. The adapter is
    float32 whatever the base's dtype (it is trained): peft makes it in the base layers' dtype, so on a
    bf16 base A holds bf16-rounded Gaussian values, as peft's own get_peft_model (which then casts to float32)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=name)
    transformer.set_adapter(name)
    params = [p for n, p in transformer.named_parameters() if f".{name}." in n]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return params


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
        StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=weights,
                                                   transformer_lora_adapter_metadata=config)
        with open(os.path.join(tmp, "pytorch_lora_weights.safetensors"), "rb") as f:
            runs.atomic_write(path, runs.sorted_header(f.read()))  # the same adapter, the same bytes


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_files(path):
    """(safetensors file, adapter_config.json beside it or None) of a LoRA path: a file, or a PEFT adapter
    folder. One error line for a missing path or a folder without a readable PEFT adapter."""
    if os.path.isdir(path):
        file, config = os.path.join(path, PEFT_WEIGHTS), os.path.join(path, PEFT_CONFIG)
        if not os.path.isfile(file):
            if os.path.isfile(os.path.join(path, "adapter_model.bin")):
                raise SystemExit(f"error: LoRA folder {path} holds adapter_model.bin (a pickled PEFT adapter), "
                                 f"not {PEFT_WEIGHTS}; "
                                 f"convert it once: safetensors.torch.save_file(torch.load(bin), '{PEFT_WEIGHTS}')")
            raise SystemExit(f"error: LoRA folder {path} has no {PEFT_WEIGHTS}; expected a PEFT adapter folder "
                             f"(PeftModel.save_pretrained)")
        if not os.path.isfile(config):
            raise SystemExit(f"error: LoRA folder {path} has {PEFT_WEIGHTS} but no {PEFT_CONFIG}")
        return file, config
    if not os.path.isfile(path):
        raise SystemExit(f"error: LoRA file {path} does not exist")
    config = os.path.join(os.path.dirname(os.path.abspath(path)), PEFT_CONFIG)
    return path, config if os.path.isfile(config) else None


def adapter_sha256(path):
    """What a LoRA path (file or PEFT folder) computes, as one sha256: its weights by content
    (runs.content_sha256: tensors and metadata, not header order) and, where there is one, its
    adapter_config.json (rank, alpha, targets). Names a teacher in run configs, resume checks and evaluation
    rows: a checkpoint re-uploaded under the same hub name gets another hash."""
    file, config = lora_files(path)
    weights = runs.content_sha256(file)
    return weights if config is None else hashlib.sha256((weights + runs.file_sha256(config)).encode()).hexdigest()


def is_lora(path):
    """Whether `path` is a LoRA that read_lora reads (a diffusers-format file, a PEFT folder or a PEFT
    adapter_model.safetensors), not a full state dict: cheap (reads the header only), never raises."""
    from safetensors import safe_open

    try:
        file, config = lora_files(path)
        with safe_open(file, "pt") as f:
            return ("lora_adapter_metadata" in (f.metadata() or {})
                    or (config is not None and any(".lora_A." in k for k in f.keys())))
    except (SystemExit, Exception):
        return False


def read_lora(path):
    """(weights keyed like peft's state dict, '<module>.lora_A.weight', peft config dict) of a LoRA in either format:
      - diffusers': one safetensors file, keys 'transformer.<module>.lora_A.weight', the LoraConfig in its metadata
        (worlds.save_lora, StableDiffusion3Pipeline.save_lora_weights);
      - peft's (PeftModel.save_pretrained: Flow-GRPO's released checkpoints): the adapter folder, or its
        adapter_model.safetensors with adapter_config.json beside it, keys 'base_model.model.<module>.lora_A.weight'.
    The weights keep the file's dtype. Anything else stops with one error line naming the file."""
    from safetensors import safe_open

    file, config_file = lora_files(path)
    try:
        with safe_open(file, "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SystemExit(f"error: {file} is not a readable safetensors LoRA file ({e})")
    if "lora_adapter_metadata" in meta:
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
        config = {k.removeprefix("transformer."): v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
        return weights, config
    if config_file is None:
        raise SystemExit(f"error: {path} has no LoRA config: no lora_adapter_metadata in the file and no {PEFT_CONFIG} "
                         f"beside it; expected a file written by worlds.save_lora or diffusers' save_lora_weights, "
                         f"or a PEFT adapter folder")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {config_file} is not a readable PEFT adapter config ({e})")
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA" or "r" not in config:
        raise SystemExit(f"error: {config_file} is not a LoRA adapter config "
                         f"(peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}, "
                         f"expected 'LORA' with a rank r)")
    return {k.removeprefix("base_model.model."): v for k, v in weights.items()}, config


def load_lora(transformer, path, name, trainable=False, dtype=None):
    """Attach the LoRA at `path` (any form read_lora reads) as adapter `name`: rank, alpha and targets from
    its config, the weights copied in exactly. The adapter that was active stays active (the first adapter
    loaded becomes the active one); the new adapter is frozen unless `trainable` (teachers are frozen, a
    student initialised from a file is not).

    dtype: the adapter's dtype; None = float32 for a trainable adapter (it holds the file's exact values,
    not values rounded through a bf16 base's dtype), the base layers' dtype for a frozen one (peft runs a
    float32 adapter on a bf16 layer too: it casts the input to lora_A's dtype and the sum back).

    Checked before any weight is used, one error line naming the file: the config targets modules of this
    transformer, and the file holds exactly the adapter's weights with their shapes (rank, in and out
    features). A missing weight is an error, not a silent default (peft would leave that lora_B at zero,
    switching the layer's update off)."""
    from peft import LoraConfig

    weights, config = read_lora(path)
    keep = {f.name for f in dataclasses.fields(LoraConfig)}
    base_model = config.get("base_model_name_or_path")
    names = f" (its config names base model {base_model})" if base_model else ""
    try:
        config = LoraConfig(**{k: v for k, v in config.items()
                               if k in keep and k not in ("peft_type", "task_type", "inference_mode")})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {path} has a LoRA config peft cannot use ({str(e).splitlines()[0]})")
    if name in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"the transformer already has an adapter named {name!r}")
    previous = (list(transformer.active_adapters() or []) if getattr(transformer, "_hf_peft_config_loaded", False)
                else [])
    grads = {n: p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n}
    try:
        transformer.add_adapter(config, adapter_name=name)
    except ValueError as e:  # peft: no module matches the targets; it has made no layer, forget the config it kept
        (getattr(transformer, "peft_config", None) or {}).pop(name, None)
        if not getattr(transformer, "peft_config", None):
            transformer._hf_peft_config_loaded = False
        raise SystemExit(f"error: {path} does not fit this transformer: {str(e).splitlines()[0]}{names}")
    params = lora_parameters(transformer, name)
    expected = {k.replace(f".{name}.", "."): p for k, p in params.items()}  # peft's state-dict keys
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [k for k in sorted(expected.keys() & weights.keys()) if tuple(weights[k].shape) != tuple(expected[k].shape)]
    problem = None
    if wrong:
        k = wrong[0]
        problem = (f"{len(wrong)} weights have the wrong shape, e.g. {k} is {tuple(weights[k].shape)}, expected "
                   f"{tuple(expected[k].shape)} (rank r={config.r} in its config, the layer's in/out features here)")
    elif missing or unexpected:
        targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        parts = ([f"lacks {len(missing)} of their weights (e.g. {missing[0]})"] if missing else []) + \
                ([f"has {len(unexpected)} weights it does not target here (e.g. {unexpected[0]})"]
                 if unexpected else [])
        problem = (f"its config targets {len(expected) // 2} LoRA layers here (target_modules {targets}) but the file "
                   + " and ".join(parts))
    if previous:
        transformer.set_adapter(previous if len(previous) > 1 else previous[0])
    if problem:
        transformer.delete_adapters(name)
    for n, p in transformer.named_parameters():
        if n in grads:
            p.requires_grad_(grads[n])
    if problem:
        raise SystemExit(f"error: {path} does not fit this transformer: {problem}{names}")
    dtype = dtype or (torch.float32 if trainable else None)
    with torch.no_grad():
        for k, p in expected.items():
            if dtype is not None and p.dtype != dtype:
                p.data = p.data.to(dtype)
            p.copy_(weights[k])  # exact when p is float32 (or the file's dtype)
            p.requires_grad_(trainable)
    return params


def _lora_layers(transformer):
    """The transformer's peft LoRA layers, found once per set of adapters and kept on the module: a
    switch then touches only them, never a scan of the whole model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(getattr(transformer, "peft_config", None) or ())
    cached = transformer.__dict__.get("_flowopd_lora_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)])
        transformer.__dict__["_flowopd_lora_layers"] = cached
    return cached[1]


@contextlib.contextmanager
def adapter(transformer, name):
    """Run the transformer as adapter `name` (None = the bare base model), then restore the previous state.

    A switch sets the active adapter and the disabled flag on each LoRA layer, which is all that peft's
    forward reads. peft's own set_adapter / enable_adapters scan every module and flip requires_grad on
    every LoRA weight (which then had to be restored), a large share of an OPD epoch's time (docs/PERFORMANCE.md).
    Here requires_grad is never touched: the trained adapter stays trainable and
    frozen teachers stay frozen."""
    layers = _lora_layers(transformer)
    if name is not None and name not in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"no adapter named {name!r} on this transformer "
                         f"(it has {sorted(getattr(transformer, 'peft_config', None) or {})})")
    previous = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        for layer in layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None
        yield
    finally:
        for layer, (active, disabled) in zip(layers, previous):
            layer._active_adapter, layer._disable_adapters = active, disabled
