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


def run_script(script, *args, timeout=600, env=None):
    return _run([sys.executable, script, *map(str, args)], timeout, env)


def torchrun_script(nproc, script, *args, timeout=600):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 script, *map(str, args)], timeout)


def assert_one_error_line(says, script, *args, timeout=600):
    """Bad input: the script fails with exactly one 'error: ...' line on stderr, and that line says `says`."""
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
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
