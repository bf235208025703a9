"""Run the stage scripts as a user does (a subprocess, or torchrun with gloo on the CPU) and read
what they write."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _run(cmd, timeout, env=None):
    result = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


_zygote = None


def _start(script, args, env=None, timeout=600):
    """`python script args` as a CompletedProcess. Forked from a warm parent that has imported torch,
    diffusers, transformers and peft once (tests/zygote.py), which saves those seconds a run; the script
    still runs as __main__ in a process of its own. FLOWOPD_TEST_FORK=0 starts a fresh interpreter instead."""
    global _zygote
    env, args = dict(ENV, **(env or {})), [str(a) for a in args]
    if os.environ.get("FLOWOPD_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
        return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    import pickle
    import signal
    import tempfile

    if _zygote is None or _zygote.poll() is not None:
        import atexit
        _zygote = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")], cwd="/", env=ENV,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        atexit.register(lambda z=_zygote: (z.stdin.close(), z.wait()))  # its stdin closed, it exits
    with tempfile.TemporaryDirectory() as tmp:
        files = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        req = pickle.dumps(dict(script=script, args=args, cwd=ROOT, env=env, stdout=files[0], stderr=files[1]))
        _zygote.stdin.write(len(req).to_bytes(8, "little") + req)
        _zygote.stdin.flush()
        pid = int(_zygote.stdout.readline())
        import select
        if not select.select([_zygote.stdout], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            _zygote.stdout.readline()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        code = int(_zygote.stdout.readline())
        stdout, stderr = (open(f, errors="replace").read() for f in files)
    return subprocess.CompletedProcess([sys.executable, script, *args], code, stdout, stderr)


def run_script(script, *args, timeout=600, env=None):
    result = _start(script, args, env, timeout)
    if result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def torchrun_script(nproc, script, *args, timeout=600):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 script, *map(str, args)], timeout)


def assert_one_error_line(says, script, *args, timeout=600):
    """Bad input: the script fails with exactly one 'error: ...' line on stderr, and that line says `says`."""
    result = _start(script, args, timeout=timeout)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and says in errors[0], result.stderr[-2000:]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_adapter(run_dir, name="adapter.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, name))


def assert_same_adam_training(a, b, lr, opt_steps, tol=1e-4, max_outliers=0.01):
    """Two runs that take the same optimizer steps on the same samples (1 process and 2) end at the same
    weights {name: tensor}. Their summed gradients differ in float rounding only, and Adam steps an
    element by about lr * m / sqrt(v): where a gradient element is near zero, rounding can flip the sign
    of its step. So almost every element agrees to `tol`, and none differs by more than 2 lr per step
    (a wrong gradient moves most elements by about lr a step and fails the first check). How many
    elements flip depends on the CPU's float kernels: seen 0 on one machine, 2 of 512 on another."""
    import torch

    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    flat_a = torch.cat([a[k].flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten() for k in sorted(a)])
    diff = (flat_a - flat_b).abs()
    outliers = (diff > tol + 1e-3 * flat_b.abs()).float().mean().item()
    assert outliers <= max_outliers, f"{outliers:.2%} of the weights differ by more than {tol}"
    assert diff.max().item() <= 2 * lr * opt_steps, f"a weight differs by {diff.max().item():.2e} > 2 lr x {opt_steps} steps"


def ode_scores(adapters, task, prompts, metadata=None):
    """Each adapter file's (None = the base) ODE images of `prompts` in the tiny world (20 steps, CFG 3:
    evaluate.py's settings) and their per-image `task` rewards: {label: (images, rewards)}. Every model
    draws image i from seed i, so the comparison is paired."""
    import rewards
    import sde
    import worlds

    world = worlds.load_world("tiny", "cpu")
    score, metadata = rewards.get_reward(task, "tiny"), metadata or [{}] * len(prompts)
    out = {}
    for label, path in adapters.items():
        name = None
        if path is not None:
            name = f"m{len(out)}"
            worlds.load_lora(world.transformer, str(path), name)
        with worlds.adapter(world.transformer, name):
            images = sde.sample(world, prompts, steps=20, guidance_scale=3.0, noise_level=0.0, seeds=list(range(len(prompts))))["images"]
        out[label] = images, score(images, prompts, metadata)
    return out


def script_functions(script, *names):
    """The module-level functions `names` of a stage script, without running the script: its imports, its
    upper-case literal constants and those functions, executed alone. For the scripts' pure functions (a stage
    script parses the command line and trains when imported)."""
    import ast

    def literal(node):
        try:
            return ast.literal_eval(node) is not None
        except ValueError:
            return False

    path = os.path.join(ROOT, script)
    with open(path) as f:
        tree = ast.parse(f.read())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or isinstance(n, ast.FunctionDef) and n.name in names
            or isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets)
            and literal(n.value)]
    namespace = {"__file__": path}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return [namespace[n] for n in names]
