"""
runs.py: the run plumbing the stage scripts share: settings, torch.distributed, atomic files,
safetensors checkpoints and exact resume, logs, sample grids, timers. Nothing of the method is here
(that is sde.py); it imports no other module of this project.
"""

import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
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


def comma_list(spec):
    """'a, b,,c' -> ['a', 'b', 'c']: a comma-separated setting's non-empty parts, stripped."""
    return [part.strip() for part in spec.split(",") if part.strip()]


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
    # float32 matmuls (the LoRA, AdamW, the KL in float32) on TensorFloat-32 cores, as Flow-GRPO's allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not torch.distributed.is_initialized():
        # torchrun --max-restarts keeps its store across restarts, and a restarted process group writes its
        # peers' addresses under the same keys as the dead one: a fast peer could read a dead address
        # (gloo: "connectFullMesh failed ... Connection refused"; pytorch/pytorch#167288). A prefix per
        # restart keeps each round's keys apart.
        store, _, _ = next(torch.distributed.rendezvous("env://"))
        store = torch.distributed.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        # device_id binds the NCCL communicator to this rank's GPU now, instead of NCCL guessing it at the first
        # collective (where a wrong guess surfaces late, as a hang or a misleading error)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                             world_size=world_size,
                                             timeout=datetime.timedelta(minutes=dist_timeout_minutes()),
                                             device_id=device if device.type == "cuda" else None)
        watch_for_failures(rank, world_size, store.clone())
    return SimpleNamespace(rank=rank, world_size=world_size, local_rank=local_rank, device=device, master=rank == 0)


FAILED_KEY = "flowopd-failed"


def _one_line(kind, value):
    """'<type>: <first line of the message>': what every rank prints of another rank's exception."""
    return f"{kind.__name__}: {(str(value).strip().splitlines() or [''])[0]}"


def _leave(line):
    """Print one error line and exit with status 1 at once, without waiting for background threads (a scoring
    thread inside a reward-server request). One write: ranks sharing a log never interleave inside a line."""
    sys.stdout.flush()
    os.write(2, f"{line}\n".encode())
    os._exit(1)


def watch_for_failures(rank, world_size, store):
    """The failures all_or_none cannot reach: an exception anywhere else (a CUDA out-of-memory in a forward, a
    bug), which leaves the other ranks inside their next collective until the process-group timeout under NCCL.
    The failing rank's uncaught exception writes its message to the rendezvous store (which the launcher holds,
    so it outlives the rank) and the rank leaves at once; a daemon thread on every rank looks for that message
    once a second and, when it appears, prints it and leaves. A rank whose own collective broke because a peer
    died prints the peer's message, not its connection error. `store`: this rank's own client of the store."""
    import threading

    def hook(kind, value, tb):
        if kind is KeyboardInterrupt:
            return sys.__excepthook__(kind, value, tb)
        mine = f"rank {rank} of {world_size} failed: {_one_line(kind, value)}"
        try:  # the first failure wins: a later one is usually a collective that the first one broke
            message = store.compare_set(FAILED_KEY, "", mine).decode()
        except Exception:  # the store is gone: the launcher is tearing the job down
            message = mine
        if message == mine:
            sys.__excepthook__(kind, value, tb)  # the traceback, on the failing rank only
        _leave(f"\nerror: {message}")

    def watch():
        while True:
            time.sleep(1)
            try:
                if store.check([FAILED_KEY]):
                    _leave(f"\nerror: {store.get(FAILED_KEY).decode()}")
            except Exception:
                return

    sys.excepthook = hook
    threading.Thread(target=watch, name="failure-watch", daemon=True).start()


def dist_timeout_minutes():
    """How long a collective waits for the slowest rank before the job fails: FLOWOPD_DIST_TIMEOUT minutes,
    default 120. NCCL's default, 10 minutes, is shorter than phases that run on one rank's CPU while the
    others wait (PickScore shards of sft_init.py --best-of 4, encoding 25k prompts, a first checkpoint)."""
    value = os.environ.get("FLOWOPD_DIST_TIMEOUT", "120")
    try:
        minutes = float(value)
        assert minutes > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: FLOWOPD_DIST_TIMEOUT={value!r}: expected a number of minutes > 0") from None
    return minutes


def end_distributed(dist):
    """The last line of a torchrun process: wait for every rank (the master's last writes included), tear the
    process group down, and exit at once, without the interpreter's and C++'s exit-time destructors. With
    gloo, a rank that returns normally from here can abort in static destruction ('terminate called without
    an active exception', SIGABRT, after Python has finalised; docs/FAILURES.md), so that torchrun reports a
    failed run whose outputs are complete. A single process returns."""
    if dist.world_size == 1:
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


MESSAGE_BYTES = 1024  # of a failing rank's one line, sent to every rank


@contextlib.contextmanager
def all_or_none(dist):
    """`with runs.all_or_none(dist): <work one rank may fail alone>`: the block's failure on any rank becomes the
    same stop on every rank, within seconds. At the end of the block every rank all-gathers a flag and its
    message (one collective of MESSAGE_BYTES a rank); where some rank failed, every rank prints
    `error: rank R of W failed: <R's message>` and exits with status 1 at once (os._exit: no wait for
    background threads, such as a scoring thread still inside a reward-server request).
    Without it, under NCCL the healthy ranks wait in their next collective for the process-group timeout
    (FLOWOPD_DIST_TIMEOUT, 120 minutes) and their logs do not say why. The block must make no collective
    call itself (a rank that failed before it would leave the others inside it). One process: the
    exception is raised as it is."""
    if dist.world_size == 1:
        yield
        return
    failure = ""
    try:
        yield
    except (Exception, SystemExit) as e:
        if isinstance(e, SystemExit) and isinstance(e.code, str):
            failure = e.code.strip().splitlines()[0] if e.code.strip() else "exited"
            failure = failure[len("error: "):] if failure.startswith("error: ") else failure
        else:  # a bug or a library's error: its traceback on the failing rank, its last line on every rank
            traceback.print_exc()
            failure = _one_line(type(e), e) if not isinstance(e, SystemExit) else f"exit status {e.code}"
        failure = failure or type(e).__name__
    stop_unless_all_fine(dist, failure)


def agree(dist, fn, *args, **kwargs):
    """fn(*args, **kwargs) under all_or_none: its result, once every rank knows that every rank got one."""
    with all_or_none(dist):
        return fn(*args, **kwargs)


def stop_unless_all_fine(dist, failure=""):
    """Every rank passes its failure ('' = fine). If any rank failed, every rank prints the first failing
    rank's message and exits with status 1; else returns. One all-gather of (flag, message): the flag is
    what a MIN all-reduce would give, and the message comes in the same call."""
    mine = torch.zeros(1 + MESSAGE_BYTES, dtype=torch.uint8)
    data = failure.encode()[:MESSAGE_BYTES]
    mine[0] = 1 if failure else 0
    if data:
        mine[1: 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = gather_cat(mine[None].to(dist.device), dist).cpu()  # (world_size, 1 + MESSAGE_BYTES)
    failed = every[:, 0].nonzero().flatten().tolist()
    if not failed:
        return
    message = bytes(every[failed[0], 1:].tolist()).rstrip(b"\0").decode(errors="replace")
    more = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
    start = "\n" if dist.master else ""  # the master's progress bar holds its line open
    _leave(f"{start}error: rank {failed[0]} of {dist.world_size} failed{more}: {message}")


def fs_wait_seconds():
    """How long a rank waits for a file that another node wrote to appear on its own: FLOWOPD_FS_WAIT seconds,
    default 90 (NFS caches a folder's attributes for up to 60 s by default, acdirmax)."""
    value = os.environ.get("FLOWOPD_FS_WAIT", "90")
    try:
        seconds = float(value)
        assert seconds >= 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: FLOWOPD_FS_WAIT={value!r}: expected a number of seconds >= 0") from None
    return seconds


def wait_readable(paths, what, hint):
    """Wait until this rank can open every file in `paths` (written by any rank), polling once a second for up to
    fs_wait_seconds(); else one error line naming the first missing file. Opening, not stat: NFS revalidates a
    file's attributes on open (close-to-open consistency), so a retry sees a file the attribute cache hid.
    Local: call it inside all_or_none, so that every rank learns that one rank cannot read."""
    deadline = time.monotonic() + fs_wait_seconds()
    while True:
        missing = []
        for p in paths:
            try:
                with open(p, "rb"):
                    pass
            except OSError:
                missing.append(p)
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if missing:
        raise SystemExit(f"error: {what}: {missing[0]} ({len(missing)} of {len(paths)} files) cannot be read on this "
                         f"rank after {fs_wait_seconds():g} s (FLOWOPD_FS_WAIT): {hint}")


def from_master(dist, obj):
    """Rank 0's obj on every rank (the others' obj is ignored)."""
    if dist.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=dist.device)
    return box[0]


def set_threads(threads, dist):
    """CPU torch threads per process: --threads, else OMP_NUM_THREADS where it is set (torchrun sets 1 for
    several processes a node; the test suite sets 1 when it runs tests side by side), else the cores
    shared out between the ranks."""
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
                          or max(1, (os.cpu_count() or 1) // dist.world_size))


def gather_cat(tensor, dist):
    """Concatenate a per-rank tensor over ranks, in rank order (equal sizes on every rank)."""
    if dist.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_indexed(rows, ids, dist):
    """Every rank's rows (n_local, ...), the first len(ids) of them those of the global indices ids, the rest
    padding (ranks can hold one unit fewer): [(index, row)] over all ranks, in rank order, padding dropped."""
    ids = torch.tensor(ids + [-1] * (len(rows) - len(ids)))  # -1 = padding row
    all_rows = gather_cat(rows.to(dist.device), dist).cpu()  # (n_local * world_size, ...)
    all_ids = gather_cat(ids.to(dist.device), dist).cpu()
    return [(i, row) for i, row in zip(all_ids.tolist(), all_rows) if i >= 0]


BUCKET_ELEMENTS = 2**25  # 128 MB of float32 gradients per collective


def all_reduce_sum(params, dist, extra=None):
    """Sum the gradients of `params` over ranks, in place. Each rank back-propagates sum(its samples' losses) / N,
    N the GLOBAL number of samples, so the sum over ranks is exactly the global mean whatever the world
    size (DDP's hooks assume one forward per step; LoRA training switches adapters between forwards, so
    this is written out). `extra` (a tensor of this rank's sums, e.g. its step loss) travels in the last
    bucket and comes back summed over ranks, so that the divergence guard decides on the same numbers on
    every rank; returned (extra itself with one process).
    Buckets of BUCKET_ELEMENTS: a full fine-tune's ~2.5 B gradients then need no full-size flat copy
    (10 GB of float32 plus a clone per parameter); a gradient that fills a bucket alone is reduced where it is."""
    if dist.world_size == 1:
        return extra
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    tensors = [p.grad for p in params]
    if extra is not None:
        extra = extra.detach().to(dist.device, torch.float32).clone()  # its own buffer: summed in place
        tensors.append(extra)
    bucket, size = [], 0
    for k, t in enumerate(tensors):
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    _reduce_bucket(bucket)
    return extra


def _reduce_bucket(tensors):
    if len(tensors) == 1 and tensors[0].is_contiguous():
        torch.distributed.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def barrier(dist):
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """A file opened at a temp path beside `path` and renamed to it when the block ends, removed if it raises:
    readers never see half a file, and a file can be streamed (a shard written batch by batch)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results and checkpoints are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, data):
    """Write bytes or text to `path` through a temp file + rename: readers never see half a file."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_tensors(path, tensors, metadata=None):
    """safetensors file, written atomically, its header sorted: the same state is the same bytes."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, sorted_header(save(tensors, metadata=metadata)))


def sorted_header(data):
    """The same safetensors bytes with the JSON header's keys sorted. safetensors keeps the metadata in a
    Rust HashMap whose order is seeded afresh for every map, so several metadata keys (diffusers' 'format'
    and 'lora_adapter_metadata') come out in either order: sorted, the same tensors and metadata are the
    same bytes, and a file hash means the model. Data offsets count from the end of the header, so they
    stay valid."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8: 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


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


def load_checkpoint(run_dir, tensors=True):
    """The state saved by the latest save_checkpoint in run_dir, or None when there is none. tensors=False:
    its numbers and strings only, every tensor None, from the file's header alone (a cheap identity check)."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    if not tensors:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return _unflatten(json.loads(f.metadata()["state"]), collections.defaultdict(lambda: None))
    data, meta = load_tensors(path)
    return _unflatten(json.loads(meta["state"]), data)


def save_train_state(run_dir, epoch, params, ema, optimizer, opt_step, identity=None):
    """The RL scripts' checkpoint: trainable weights, their EMA, the optimizer, the counters, and the
    run's identity (run_identity: what the run is, checked on resume). Their sampling noise and prompt
    draws derive from (seed, epoch, index), so no RNG state is needed."""
    return save_checkpoint(run_dir, epoch, dict(params={k: p.detach() for k, p in params.items()}, ema=ema,
                                                optimizer=optimizer.state_dict(), epoch=epoch, opt_step=opt_step,
                                                identity=json.dumps(identity)))


def load_train_state(run_dir, params, ema, optimizer, identity=None, length="epochs", dist=None):
    """Restore what save_train_state wrote (in place) after check_resume has compared its identity with
    this run's identity; returns (epoch, opt_step), (0, 0) when there is no checkpoint. Under torchrun
    every rank loads on its own, then all ranks compare what they hold (agree_across_ranks)."""
    with all_or_none(dist) if dist is not None else contextlib.nullcontext():  # a changed run on one node: all stop
        state = load_checkpoint(run_dir)
        if state is not None:
            check_resume(run_dir, state, identity, length, state["epoch"])
    done = (0, 0)
    if state is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["params"][k])
            for k, v in ema.items():
                v.copy_(state["ema"][k])
        optimizer.load_state_dict(state["optimizer"])
        done = (state["epoch"], state["opt_step"])
    if dist is not None:
        agree_across_ranks(dist, f"{run_dir} (the resumed epoch and weights)", done, params)
    return done


def agree_across_ranks(dist, what, numbers, tensors=None):
    """Stop every rank with one line unless all ranks hold the same `numbers` (ints) and `tensors` ({name:
    tensor}, hashed). A node-local --out would otherwise let rank 0 resume at epoch k while the others start
    fresh, and train diverged ranks without a hang."""
    if dist.world_size == 1:
        return
    h = hashlib.sha256(json.dumps(list(numbers)).encode())
    for k in sorted(tensors or {}):
        v = tensors[k].detach().float().contiguous().cpu()
        h.update(k.encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int.from_bytes(h.digest()[:7], "little"), *numbers], dtype=torch.long, device=dist.device)
    every = gather_cat(mine[None], dist).cpu()  # (world_size, 1 + len(numbers))
    if not (every == every[0]).all():
        differ = [r for r in range(dist.world_size) if not torch.equal(every[r], every[0])]
        raise SystemExit(f"error: the ranks disagree on {what}: rank 0 holds {every[0, 1:].tolist()}, rank {differ[0]} "
                         f"{every[differ[0], 1:].tolist()} ({len(differ)} ranks differ from rank 0); is --out on a "
                         "filesystem that every node shares?")


# -----------------------------------------------------------------------------
# What a run is, so that a rerun into the same --out resumes only the same run

# Settings that change how a run is carried out, not what it computes: a resume may change them.
OPERATIONAL = ("out", "resume", "threads", "save_every", "grid_every", "log_every", "probe_every", "cache", "score",
               "gradient_checkpointing", "tracker")


def input_sha256(path):
    """The identity of an input: content_sha256 of a file; of a folder (an SD3 pipeline), a fingerprint
    of every file's path, size and first and last MiB (hashing 10+ GB of weights at every start would
    cost minutes); the path itself for anything else ('base', a hub id)."""
    if os.path.isfile(path):
        return content_sha256(path)
    if not os.path.isdir(path):
        return str(path)
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            size = os.path.getsize(full)
            h.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
            with open(full, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
    return h.hexdigest()


def content_sha256(path):
    """sha256 of what a file holds. A safetensors file is hashed by its tensors (sorted by name: dtype,
    shape, bytes) and its metadata (sorted keys), because its header order is not stable: diffusers'
    save_lora_weights writes the same adapter with its metadata keys in another order from one process
    to the next. Any other file: its bytes (file_sha256)."""
    if not path.endswith(".safetensors"):
        return file_sha256(path)
    tensors, meta = load_tensors(path)
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        v = tensors[k].contiguous()
        h.update(f"{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(cfg, inputs, paths=()):
    """What a run computes: its resolved settings (all but the OPERATIONAL ones, and the settings named in
    `paths`, whose files are compared by content instead of by name) and the identity of every input
    (input_sha256 of each path in `inputs`, {name: path}). Saved in every checkpoint."""
    settings = {k: v for k, v in sorted(vars(cfg).items()) if k not in OPERATIONAL and k not in paths}
    return dict(settings=json.loads(json.dumps(settings, default=str)),
                inputs={k: input_sha256(str(v)) for k, v in sorted(inputs.items()) if v})


def check_resume(run_dir, state, identity, length, done):
    """Resume only the run that the checkpoint holds: every setting and input the same, except the run's
    length (`length`: 'epochs' or 'steps'), which may change to anything not below the `done` already
    taken. Otherwise one error line saying what differs and how to go on."""
    saved = json.loads(state.get("identity") or "null")
    if saved is None or identity is None:  # a checkpoint from before identities were saved: nothing to compare
        return
    how = f"pass --out <another folder> for a new run, or --no-resume to start this one over in {run_dir}"
    for part, what in (("settings", "--{}"), ("inputs", "input {}")):
        old, new = saved.get(part, {}), identity[part]
        for k in sorted(set(old) | set(new)):
            if k == length and part == "settings":
                if new.get(k) is not None and new[k] < done:
                    raise SystemExit(f"error: {run_dir} holds a run already {done} {length} long; "
                                     f"--{length} {new[k]} is shorter: {how}")
                continue
            if old.get(k) != new.get(k):
                name = what.format(k.replace("_", "-") if part == "settings" else k)
                shown = (lambda v: v) if part == "settings" else (lambda v: (v or "none")[:12])
                raise SystemExit(f"error: {run_dir} holds a run with {name} = {shown(old.get(k))!r}, this command has "
                                 f"{shown(new.get(k))!r}: {how}")


# -----------------------------------------------------------------------------
# Divergence guard


def assert_finite(values, what, where, label=None):
    """Stop the run with one line when `values` (a number or a tensor) holds a NaN or an infinity: the
    stage, epoch and step in `where`, and, with `label` (element index -> its task and prompt), the first
    bad element's. Called before anything of the step is saved, so the last good checkpoint and adapter
    stay as they are; the exit status is 1."""
    values = torch.as_tensor(values).detach().float().reshape(-1).cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        i = int(bad[0])
        at = f" ({label(i)})" if label is not None else ""
        raise SystemExit(f"error: {where}: {what} is {values[i].item()}{at}; stopped before writing anything after "
                         f"the last checkpoint (lower --lr or check the inputs)")


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=json.dumps(np.random.get_state()[1].tolist()),
                python=json.dumps(random.getstate()[1]))


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))


def ema_update(ema, params, decay, step=None):
    """Exponential moving average of the trainable weights (Flow-GRPO: decay 0.9, every 8 steps). With `step`
    (the optimizer steps taken), Flow-GRPO's warm-up: the decay is min((1 + step) / (10 + step), decay), so
    that the first updates are not dominated by the initial weights. Flow-GRPO calls its EMA once per
    microbatch; here once per optimizer step, so that it does not depend on how many ranks share a step."""
    if step is not None:
        decay = min((1 + step) / (10 + step), decay)
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


def open_tracker(kind, run_dir, config, dist):
    """--tracker: also send every log.jsonl record to TensorBoard or Weights & Biases, from the master only.
    Returns track(record) (a no-op for kind '' or on other ranks). The package is imported here, so that only
    a run that asks for one needs it; both work offline (TensorBoard writes event files under
    run_dir/tensorboard; wandb honours WANDB_MODE=offline and then writes under run_dir/wandb)."""
    if not kind or not dist.master:
        return lambda record: None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("error: --tracker tensorboard needs the tensorboard package: "
                             "pip install tensorboard") from None
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

        def track(record):
            step = record.get("epoch", record.get("step"))
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    writer.add_scalar(k, v, step)
            writer.flush()  # a crash loses nothing already logged, as log.jsonl
        return track
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --tracker wandb needs the wandb package: pip install wandb "
                             "(WANDB_MODE=offline needs no account)") from None
        wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "flow-opd"),
                        name=os.path.basename(os.path.abspath(run_dir)), dir=run_dir, config=config, resume="allow")

        def track(record):
            wb.log({k: v for k, v in record.items() if k not in ("epoch", "step")},
                   step=record.get("epoch", record.get("step")))
        return track
    raise SystemExit(f"error: --tracker {kind!r}: expected tensorboard or wandb ('' = none)")


def plot_curves(run_dirs, path, metrics=None):
    """Each run's log.jsonl drawn against its epochs (or steps): one panel per metric, the runs overlaid, each run
    one colour in every panel, one PNG written atomically. metrics: the fields to draw (default: every reward,
    KL, MAR and loss field that some run logs; 'kl' is the KL to the base in grpo_expert.py's runs and to the
    teachers in opd.py's). Returns the metrics drawn."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {}
    for d in run_dirs:
        f = os.path.join(d, "log.jsonl")
        if os.path.isfile(f):
            with open(f) as g:
                logs[os.path.basename(os.path.normpath(d))] = [json.loads(line) for line in g if line.strip()]
    if not logs:
        raise SystemExit(f"error: no log.jsonl in {list(run_dirs)[:3]}...: nothing to draw")
    wanted = ("reward", "kl", "mar", "loss")
    metrics = metrics or sorted({k for log in logs.values() for r in log for k in r
                                 if any(k == w or k.startswith(w + "_") for w in wanted)},
                                key=lambda k: (wanted.index(k.split("_")[0]), k))
    colour = {name: plt.cm.tab10(i % 10) for i, name in enumerate(logs)}
    cols = min(5, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for name, log in logs.items():
            points = [(r.get("epoch", r.get("step")), r[m]) for r in log if isinstance(r.get(m), (int, float))]
            if points:
                ax.plot(*zip(*points), label=name, lw=1.1, color=colour[name])
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("epoch (sft: step)", fontsize=7)
        if m.startswith(("kl", "mar")):
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colour[n], lw=2) for n in logs]
    fig.legend(handles, list(logs), loc="lower center", ncol=min(8, len(logs)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return metrics


def plot_bars(rows, columns, norm, title, path):
    """A table's rows ({"model": label, column: value}) as grouped bars, one group per column, each value divided
    by norm.get(column, 1); a missing value (None) drawn as 0. One PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 0.4 * len(rows), 3.5))
    width = 0.8 / len(rows)
    for r, row in enumerate(rows):
        heights = [(row[m] or 0) / norm.get(m, 1) for m in columns]
        ax.bar(np.arange(len(columns)) + (r - (len(rows) - 1) / 2) * width, heights, width, label=row["model"])
    ax.set_xticks(range(len(columns)), [m + (f" / {norm[m]:g}" if m in norm else "") for m in columns])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=min(4, len(rows)))
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def markdown_table(title, columns, rows, note="", signed=False):
    """A Markdown table of rows ({column: value}); a cell whose row also holds '<column>_se' is written
    'mean +- se', a None as '-', a string as it is; signed: numbers with their sign (differences)."""
    def cell(r, c):
        if isinstance(r[c], str):
            return r[c]
        se = r.get(f"{c}_se")
        value = "-" if r[c] is None else f"{r[c]:+.3f}" if signed else f"{r[c]:.3f}"
        return value + (f" +- {se:.3f}" if se is not None and r[c] is not None else "")
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines + (["", note] if note else [])) + "\n"


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj, sort_keys=False):
    """12 hex digits of the sha256 of obj as JSON: names a cache file by everything its content depends on."""
    return hashlib.sha256(json.dumps(obj, sort_keys=sort_keys).encode()).hexdigest()[:12]


# A score cache (evaluate.py's): one JSON per (model, prompt set), {"settings": ..., "prompts": {str(prompt index):
# {"prompt": text, column: [one value per image] or one value per prompt}}}.


def read_score_cache(path):
    """A score cache's {str(prompt index): entry}; {} where there is none yet."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)["prompts"]


def has_scores(entry, prompt, metrics):
    """A cached prompt counts only if it is the same prompt and holds every metric asked for now; the metric
    'ood' is held by any 'ood_<category>' column (an OOD prompt is scored in its own category only)."""
    if entry is None or entry.get("prompt") != prompt:
        return False
    return all(any(k.startswith("ood_") for k in entry) if m == "ood" else m in entry for m in metrics)


def score_entry(prompt, columns, scores, per_prompt=()):
    """A prompt's cache entry from its (K, columns) scores: a per_prompt column (repeated over the K images) as
    one number, a column with no score (all NaN) left out."""
    entry = {"prompt": prompt}
    for col, values in zip(columns, scores.T):
        if col in per_prompt:
            entry[col] = values[0].item()
        elif not values.isnan().all():
            entry[col] = values.tolist()
    return entry


def optimizer_chunks(samples, n_chunks, seed):
    """Split an epoch's samples (global indices, ascending) into n_chunks optimizer steps: sample k of
    `samples` goes to step (k + offset) % n_chunks, the offset drawn from `seed`. Every contiguous block
    of samples, so every rank's share under any number of ranks, is spread evenly over the steps (within
    one sample), and the split does not depend on the number of ranks (1 process equals torchrun). A
    global permutation cut into chunks gave ranks unequal shares: at 32 ranks the slowest held ~1.5x the
    mean, and every rank waited for it. Returns a list of n_chunks index tensors (ascending)."""
    samples = torch.as_tensor(samples, dtype=torch.long)
    offset = int(torch.randint(0, n_chunks, (1,), generator=torch.Generator().manual_seed(seed)))
    step = (torch.arange(len(samples)) + offset) % n_chunks
    return [samples[step == c] for c in range(n_chunks)]


def shard(n_global, dist, what="images per epoch"):
    """This rank's contiguous block [first, first + n_local) of n_global samples."""
    if n_global % dist.world_size:
        raise SystemExit(f"error: {n_global} {what} must be divisible by the {dist.world_size} ranks: change the "
                         f"batch settings or the number of processes")
    n_local = n_global // dist.world_size
    return dist.rank * n_local, n_local


def peak_memory(device):
    """The log's memory fields on a GPU: the peak allocated since the last call, in GiB (then reset)."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return dict(peak_mem_gib=round(peak, 2))


class Timer:
    """Seconds per phase, for the logs: `with timer("sampling"): ...`."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
