"""What happens when things go wrong (README, "What happens when things go wrong"), tried as a user would:
- a diverging run stops with one line, exit status 1, and leaves its last good adapter and checkpoint;
- a rerun into the same --out resumes only the run its checkpoint records (settings and input hashes);
- a stage SIGKILLed at random points, checkpoint writes included, then rerun, ends where an
  uninterrupted run ends;
- torchrun across two launchers (a two-node c10d rendezvous on one machine) equals one process;
- torchrun --max-restarts 1 restarts a run whose worker was SIGKILLed, and it resumes to the same end."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import worlds
from helpers import ENV, ROOT, _start, assert_same_adam_training, read_adapter, read_log

sys.path.insert(0, os.path.join(ROOT, "bench"))
import torchrun_repeat  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "assets", "tiny_base.safetensors")),
                                reason="the tiny world's base weights are not built yet")
FAST = ["--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4", "--noise-level", "0.2", "--sample-batch", "8", "--train-batch", "8",
        "--grid-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--ema-decay", "0", "--ema-every", "1", "--threads", "1"]
GRPO = ["grpo_expert.py", "--task", "pickscore", *FAST]  # a graded reward: every group has spread, every step updates
OPD = ["opd.py", *FAST]
SFT = ["sft_init.py", "--task", "ocr", "--prompts-per-task", "4", "--shard-size", "2", "--sample-steps", "4", "--batch", "4",
       "--probe", "0", "--log-every", "1", "--ema-every", "1", "--lr", "1e-3"]


def run(args, check=True):
    result = _start(args[0], args[1:])
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def snapshot(folder):
    """Every file under `folder` and its bytes."""
    files = {}
    for d, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                files[os.path.relpath(os.path.join(d, n), folder)] = f.read()
    return files


@pytest.mark.parametrize("stage", ["grpo", "opd", "sft"])
def test_divergence_stops_with_one_line_and_keeps_the_last_good_outputs(stage, tmp_path):
    args, length = {"grpo": (GRPO, "--epochs"), "opd": (OPD, "--epochs"), "sft": (SFT, "--steps")}[stage]
    run([*args, length, "1", "--out", tmp_path])
    kept = {k: v for k, v in snapshot(tmp_path).items() if k == "adapter.safetensors" or k.startswith("checkpoints")}
    # the checkpoint is written after the adapter: a kill between the two then resumes from the previous
    # checkpoint and writes both again (the other order left a finished run's adapter one epoch stale)
    checkpoint = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert os.stat(tmp_path / "adapter.safetensors").st_mtime_ns <= os.stat(checkpoint).st_mtime_ns  # equal: one clock tick
    assert "adapter.safetensors" in kept and any(k.startswith("checkpoints/step_") for k in kept)
    # the same run started over at lr 1e30: the first update blows the weights up, the next step is NaN
    bad = run([*args, length, "3", "--lr", "1e30", "--no-resume", "--out", tmp_path], check=False)
    (line,) = error_lines(bad)
    script = args[0]
    assert bad.returncode == 1 and line.startswith(f"error: {script} ") and (" is nan" in line or " is inf" in line), bad.stderr[-2000:]
    assert "stopped before writing anything" in line
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in kept} == kept  # the last good adapter and checkpoints, byte for byte


def test_rerun_resumes_only_the_run_its_checkpoint_records(tmp_path):
    out = tmp_path / "grpo"
    run([*GRPO, "--epochs", "1", "--out", out])
    changed = run([*GRPO, "--epochs", "2", "--lr", "1e-3", "--out", out], check=False)
    (line,) = error_lines(changed)
    assert changed.returncode == 1 and "--lr = 0.0003, this command has 0.001" in line and "--no-resume" in line
    assert read_log(out)[-1]["epoch"] == 1  # nothing ran
    shorter = run([*GRPO, "--epochs", "0", "--out", out], check=False)
    assert "already 1 epochs long" in error_lines(shorter)[0]
    # what may change: the length, how it runs (threads), where an unchanged input lives
    longer = run([*GRPO, "--epochs", "2", "--threads", "2", "--out", out])
    assert "resumed from" in longer.stdout + longer.stderr and read_log(out)[-1]["epoch"] == 2

    experts = os.path.join(ROOT, "assets", "tiny_experts")
    teachers = {t: os.path.join(experts, f"{t}.safetensors") for t in ("geneval", "ocr", "deqa", "pickscore")}
    spec = lambda files: ",".join(f"{t}={f}" for t, f in files.items())  # noqa: E731
    run([*OPD, "--epochs", "1", "--teachers", spec(teachers), "--out", tmp_path / "opd"])
    # every teacher named by its adapter's whole content in the run's config (a re-upload under one name differs)
    with open(tmp_path / "opd" / "config.json") as f:
        assert json.load(f)["teacher_sha256"] == {t: worlds.adapter_sha256(path) for t, path in teachers.items()}
    moved = dict(teachers, ocr=str(tmp_path / "ocr_copy.safetensors"))
    with open(teachers["ocr"], "rb") as f, open(moved["ocr"], "wb") as g:
        g.write(f.read())
    assert "resumed from" in run([*OPD, "--epochs", "2", "--teachers", spec(moved), "--out", tmp_path / "opd"]).stdout
    other = run([*OPD, "--epochs", "3", "--teachers", spec(dict(teachers, ocr=teachers["deqa"])), "--out", tmp_path / "opd"], check=False)
    # another adapter under the teacher's name: refused by its content hash, whatever path or name it has
    assert other.returncode == 1 and "--teacher-sha256" in error_lines(other)[0], other.stderr[-2000:]


def kill_at(cmd, deadline, folder, in_a_write=False):
    """Start `cmd`, and SIGKILL it at `deadline` seconds or, with in_a_write, as soon as a checkpoint or
    adapter write is seen in progress under `folder` (a temp file of runs.atomic_write / worlds.write_lora).
    Returns whether the kill landed in a write, or None if the run ended first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, in_write = time.time(), False
    while proc.poll() is None and time.time() - start < deadline:
        for d in (folder, os.path.join(folder, "checkpoints")):
            if os.path.isdir(d) and any(n.startswith((".tmp-", "tmp")) for n in os.listdir(d)):
                in_write = True
        if in_write and in_a_write:
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return in_write and in_a_write


FOUR = [*GRPO, "--epochs", "4", "--save-every", "1"]  # a checkpoint every epoch: what kill -9 and a restart resume from


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 4-epoch run that the killed and the restarted runs must end at, and its wall time."""
    out, start = tmp_path_factory.mktemp("straight"), time.time()
    run([*FOUR, "--out", out])
    return out, time.time() - start


def test_kill_9_anywhere_then_rerun_equals_uninterrupted(tmp_path, straight):
    args = [sys.executable, *FOUR]
    wall = straight[1]
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    landed = []
    for _ in range(2):  # kill at random points of a run's life (start-up, sampling, training, writes) ...
        landed.append(kill_at([*args, "--out", str(tmp_path / "killed")], rng.uniform(0.2, wall), str(tmp_path / "killed")))
    for _ in range(1):  # ... and as soon as a write is in progress
        landed.append(kill_at([*args, "--out", str(tmp_path / "killed")], wall * 2, str(tmp_path / "killed"), in_a_write=True))
    print("kills (True: during a write, False: elsewhere, None: the run had ended):", landed)
    run([*args[1:], "--out", tmp_path / "killed"])
    a, b = read_adapter(straight[0]), read_adapter(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("stage", ["grpo", "opd"])
def test_two_launchers_c10d_rendezvous_equal_one_process(stage, tmp_path):
    """The 4x8 launch line (--nnodes N --rdzv-backend c10d), here as two one-process 'nodes' on one machine
    (bench/torchrun_repeat.py launches them)."""
    args = [*(GRPO if stage == "grpo" else OPD), "--epochs", "2"]
    run([*args, "--out", tmp_path / "one"])
    ok, output = torchrun_repeat.two_launchers(args, tmp_path / "two", env=ENV)
    assert ok, output[-4000:]
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert log_two[-1]["opt_step"] == log_one[-1]["opt_step"] > 0
    assert_same_adam_training(read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two"),
                              lr=3e-4 if stage == "grpo" else 1e-4, opt_steps=log_one[-1]["opt_step"])


def test_torchrun_restarts_a_killed_worker_and_resumes(tmp_path, straight):
    """torchrun --max-restarts 1, one worker SIGKILLed after the first checkpoint (bench/torchrun_repeat.py)."""
    ok, output = torchrun_repeat.restart(FOUR, tmp_path / "two", env=ENV)
    assert ok, output[-6000:]  # exit 0, a worker was killed, and the restarted workers resumed ...
    assert "at epoch" in output  # ... from a checkpoint
    log = read_log(straight[0])
    assert_same_adam_training(read_adapter(straight[0]), read_adapter(tmp_path / "two"), lr=3e-4, opt_steps=log[-1]["opt_step"])
