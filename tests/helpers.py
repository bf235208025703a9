"""Run the stage scripts as a user does (a subprocess, or torchrun with gloo on the CPU) and read
what they write."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _run(cmd, timeout):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def run_script(script, *args, timeout=600):
    return _run([sys.executable, script, *map(str, args)], timeout)


def torchrun_script(nproc, script, *args, timeout=600):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 script, *map(str, args)], timeout)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_adapter(run_dir, name="adapter.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, name))
