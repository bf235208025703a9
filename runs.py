"""
runs.py: the run plumbing the stage scripts share: settings, torch.distributed, atomic files,
safetensors checkpoints and exact resume, logs, sample grids, timers. Nothing of the method is here
(that is sde.py); it imports no other module of this project.
"""

import contextlib
import json
import math
import os
import random
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Settings, distributed, files, checkpoints, logs


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


def file_sha256(path):
    """sha256 of a file's bytes: names a checkpoint or prompt file by content (cache keys, cards)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
