"""A failure on one rank stops every rank within seconds, and every rank says which rank failed and why
(runs.all_or_none), checked on the CPU with gloo as torchrun runs the stages: a reward server that refuses
one rank's batch (two launchers, two 'nodes'), a NaN loss on one rank only, a cache shard that one rank
cannot read (a node-local --out), a changed run found on one rank only. Under NCCL the healthy ranks would
otherwise wait in their next collective for the process-group timeout; gloo notices a dead peer at once,
so what these tests can tell apart is what the healthy ranks print."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

import runs
from helpers import ENV, ROOT
from sd3_tiny import build_tiny_sd3
from stub_reward_server import serve, stub_reward_servers

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FAST = ["--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4", "--noise-level", "0.2", "--sample-batch", "8",
        "--train-batch", "8", "--grid-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]
# the collectives' own timeout stays short, so that a hang fails the test instead of stalling the suite
QUICK = dict(ENV, OMP_NUM_THREADS="1", FLOWOPD_DIST_TIMEOUT="1", FLOWOPD_FS_WAIT="2")


def error_lines(text):
    """The 'error: ' lines, also those that follow the master's progress bar on its line (tqdm ends it with ']')."""
    return [m.group(1) for line in text.replace("\r", "\n").splitlines() if (m := re.search(r"(?:^|\])(error: .*)$", line))]


def two_launchers(args, envs, extra=([], []), timeout=150):
    """`args` under two one-process torchrun launchers (two 'nodes') joined by a c10d rendezvous whose store
    lives here; launcher i runs with envs[i] and extra[i] appended to args. Returns [(exit status, output,
    seconds)] per launcher."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--rdzv-id", f"fail-{port}", *map(str, args)]
    start = time.monotonic()
    nodes = [subprocess.Popen([*cmd, *map(str, more)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for env, more in zip(envs, extra)]
    results = []
    for n in nodes:
        output = n.communicate(timeout=timeout)[0]
        results.append((n.returncode, output, time.monotonic() - start))
    return results


def test_a_reward_server_that_refuses_one_rank_stops_both_launchers_with_its_message(tmp_path):
    pipeline = tmp_path / "tiny_sd3"
    build_tiny_sd3(pipeline)
    (tmp_path / "prompts" / "sd3").mkdir(parents=True)
    (tmp_path / "prompts" / "sd3" / "ocr_train.txt").write_text('a sign that says "cat"\n')
    env = dict(QUICK, FLOWOPD_PROMPTS=str(tmp_path / "prompts"), FLOWOPD_PROMPT_CACHE=str(tmp_path / "cache"))
    refuse = lambda payload: (400, b"Traceback ...\nValueError: this batch is refused")  # noqa: E731
    args = ["grpo_expert.py", "--world", pipeline, "--prompts", "ocr", "--reward", "deqa:1", "--epochs", "1",
            "--prompts-per-epoch", "1", "--group-size", "2", "--steps", "2", "--sample-batch", "2", "--train-batch", "2",
            "--grid-every", "0", "--threads", "1", "--out", tmp_path / "run"]
    with stub_reward_servers() as (_, deqa_url), serve(refuse) as refusing_url:
        (ok_status, ok_out, ok_s), (bad_status, bad_out, bad_s) = two_launchers(
            args, [dict(env, FLOWOPD_DEQA_URL=deqa_url), dict(env, FLOWOPD_DEQA_URL=refusing_url)])
    says = f"deqa reward server at {refusing_url} failed (HTTP 400): ValueError: this batch is refused"
    for status, output, seconds in ((ok_status, ok_out, ok_s), (bad_status, bad_out, bad_s)):
        assert status != 0 and seconds < 60, (status, seconds, output[-3000:])
        print(f"launcher exited {status} after {seconds:.1f} s")
        # the worker's one line: which rank failed and why (torchrun's own summary follows, as for any failure)
        lines = error_lines(output)
        assert len(lines) == 1 and lines[0].startswith("error: rank ") and lines[0].endswith(says), output[-3000:]


def test_a_nan_loss_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 1's loss is NaN from epoch 2 on, its gradients finite: the guard decides on the loss summed over
    ranks, so both ranks stop at the same optimizer step with the same line."""
    result = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "tests/dist_check.py", "nan",
                             "grpo_expert.py", "--task", "pickscore", *FAST, "--epochs", "2", "--out", tmp_path],
                            cwd=ROOT, env=QUICK, capture_output=True, text=True, timeout=150)
    lines = error_lines(result.stderr)
    assert result.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], result.stderr[-3000:]
    assert lines[0].startswith("error: grpo_expert.py epoch 2 optimizer step ") and "(it is the loss)" in lines[0]


def test_a_shard_that_one_rank_cannot_read_is_one_line_on_every_rank(tmp_path):
    """sft_init.py with a node-local --out (its cache's default folder) on each of two launchers: the one shard
    falls to rank 0, which writes it to its own folder, and rank 1 cannot read it."""
    args = ["sft_init.py", "--task", "ocr", "--prompts-per-task", "2", "--shard-size", "2", "--sample-steps", "2",
            "--batch", "2", "--steps", "1", "--probe", "0", "--threads", "1"]
    results = two_launchers(args, [QUICK, QUICK], extra=[["--out", tmp_path / "node0"], ["--out", tmp_path / "node1"]])
    for status, output, seconds in results:
        lines = error_lines(output)
        assert status != 0 and len(lines) == 1 and seconds < 60, output[-3000:]
        assert lines[0].startswith("error: rank 1 of 2 failed: sft_init.py cache ") and "cannot be read" in lines[0], lines


def test_a_changed_run_found_on_one_rank_only_is_one_line_on_every_rank(tmp_path):
    """Only rank 1's --out holds a checkpoint, of a run with another --lr (a node-local --out): rank 1's resume
    check fails; both ranks print its line. The same spawn first checks the bucketed gradient all-reduce."""
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    optimizer = torch.optim.AdamW(params.values())
    runs.save_train_state(str(tmp_path / "rank1"), 3, params, {"w": torch.ones(3)}, optimizer, 6,
                          identity=dict(settings=dict(lr=0.0003), inputs={}))
    result = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "tests/dist_check.py", "changed",
                             tmp_path], cwd=ROOT, env=QUICK, capture_output=True, text=True, timeout=120)
    assert "rank 0 reduced in buckets" in result.stdout and "rank 1 reduced in buckets" in result.stdout, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    says = f"error: rank 1 of 2 failed: {tmp_path / 'rank1'} holds a run with --lr = 0.0003, this command has 0.001"
    assert result.returncode != 0 and len(lines) == 2 and all(line.startswith(says) for line in lines), result.stderr[-3000:]
    assert "went on" not in result.stdout


def test_the_process_group_binds_its_gpu_at_init(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda url: iter([(torch.distributed.HashStore(), 0, 2)]))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    runs.setup_distributed()
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)


SLOW_SCORING = r"""
import sys, time, torch
sys.path.insert(0, ".")
import rewards
scorer = rewards.BatchScorer(lambda images, prompts, metadata: time.sleep(60) or [0.0] * len(images))
scorer.submit(torch.zeros(1, 3, 8, 8), ["a prompt"])  # a reward-server request that takes a minute
time.sleep(0.5)
raise SystemExit("error: stopped while a batch is being scored")
"""


def test_a_run_that_stops_does_not_wait_for_the_batch_being_scored():
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SLOW_SCORING], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and time.monotonic() - start < 20, (time.monotonic() - start, result.stderr[-2000:])


def test_scorers_load_on_the_calling_thread():
    import threading

    import rewards

    loaded = []

    class Lazy:  # as rewards._PickScore: model None until _load
        model = None

        def _load(self):
            loaded.append(threading.current_thread())
            self.model = object()

    one = lambda images, prompts, metadata=None: None  # noqa: E731
    one.scorer = Lazy()
    both = lambda images, prompts, metadata=None: None  # noqa: E731
    both.scorers = [Lazy(), one.scorer]
    rewards.load_scorers(one, None, both)
    assert loaded == [threading.current_thread()] * 2  # the shared scorer once, the other once, here


def test_only_node_0_merges_and_every_torchrun_stage_restarts(tmp_path):
    def dry(*args):
        r = subprocess.run(["bash", "reproduce_sd3.sh", "--dry-run", "--out", str(tmp_path), "--nnodes", "2", "--head", "h",
                            *args, "/models/sd3.5m"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    head, other = dry("--node-rank", "0"), dry("--node-rank", "1", "--max-restarts", "5")
    merge = lambda lines: lines[lines.index("== merge") + 1]  # noqa: E731
    assert " merge.py " in merge(head) and merge(other) == f"wait_done {tmp_path}/runs/merge"
    assert all("--max-restarts 2 " in line for line in head if "torchrun" in line)
    assert all("--max-restarts 5 " in line for line in other if "torchrun" in line)


def test_an_exception_outside_every_agreement_stops_both_launchers_with_its_message(tmp_path):
    """A GPU out of memory in a forward (here: rank 1's second sampling raises it) is no agreement point: the
    failing rank's exception hook leaves its message in the rendezvous store, and the other rank prints it,
    from its broken collective (gloo) or its watch thread (NCCL, where the collective would wait for the timeout),
    instead of a bare connection error."""
    args = ["tests/dist_check.py", "crash", "grpo_expert.py", "--task", "ocr", "--epochs", "3", *FAST, "--no-resume"]
    results = two_launchers(args, [QUICK, QUICK], (["--out", tmp_path / "a"], ["--out", tmp_path / "b"]))
    for status, output, seconds in results:
        lines = error_lines(output)
        assert status != 0 and seconds < 90, (status, seconds, output[-2000:])
        assert lines and "rank 1 of 2 failed: RuntimeError: CUDA out of memory" in lines[-1], output[-3000:]
