"""
bench/torchrun_repeat.py: how often does a torchrun launch of a stage fail? The measurements behind the
README's "What happens when things go wrong" (torchrun lines), repeated N times on the CPU with gloo.

  two-launchers  two one-process launchers joined by a c10d rendezvous whose store this script hosts
                 (the 4x8 launch line in miniature), on opd.py; a failure is any launcher's exit status
                 != 0 (a rank aborting at exit costs the other launcher its 5-minute exit barrier)
  restart        torchrun --standalone --nproc_per_node 2 --max-restarts 1 on grpo_expert.py, one worker
                 SIGKILLed as soon as the first checkpoint exists; a success is exit status 0 with the
                 restarted workers printing "resumed from"

Each run's output is kept only when it failed (<out>/<mode>_<i>.txt). Prints one line a run and the count.

Commands (2 cores; ~40 s a two-launcher run, ~20 s a restart run):
  python bench/torchrun_repeat.py two-launchers --runs 12
  python bench/torchrun_repeat.py restart --runs 20
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4", "--noise-level", "0.2", "--sample-batch", "8", "--train-batch", "8",
        "--grid-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--ema-decay", "0", "--ema-every", "1", "--threads", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def two_launchers(stage, out, env=None):
    """`stage` (a script and its flags) under two one-process torchrun launchers joined by a c10d
    rendezvous whose store lives here, as on a cluster's head node (when it lived in one launcher, that
    launcher could exit first and the other's last store call failed: RendezvousConnectionError).
    Returns (every launcher exited 0, their output)."""
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", f"repeat-{port}", *map(str, stage), "--out", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [n.communicate(timeout=900)[0] for n in nodes]
    del store
    return all(n.returncode == 0 for n in nodes), "\n===== launcher 2\n".join(outputs)


def restart(stage, out, env=None):
    """`stage` (a script and its flags, checkpointing every epoch) under torchrun --standalone
    --nproc_per_node 2 --max-restarts 1, one worker SIGKILLed as soon as the first checkpoint exists.
    Returns (exit status 0, a worker was killed and the restarted workers printed "resumed from", the output)."""
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", *map(str, stage), "--out", str(out)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = []

    def kill_one_worker_after_the_first_checkpoint():
        latest = os.path.join(out, "checkpoints", "latest")
        while launcher.poll() is None and not os.path.exists(latest):
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        if workers and launcher.poll() is None:
            os.kill(int(workers[-1]), signal.SIGKILL)
            killed.append(workers[-1])

    watcher = threading.Thread(target=kill_one_worker_after_the_first_checkpoint)
    watcher.start()
    output = launcher.communicate(timeout=900)[0]
    watcher.join()
    return launcher.returncode == 0 and bool(killed) and "resumed from" in output, output


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["two-launchers", "restart"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench", "torchrun_repeat"), help="where failed runs' output goes")
    cfg = p.parse_args()
    if cfg.runs < 1:
        raise SystemExit(f"error: --runs must be at least 1, got {cfg.runs}")
    os.makedirs(cfg.out, exist_ok=True)
    ok = 0
    for i in range(cfg.runs):
        start, run_dir = time.time(), tempfile.mkdtemp(prefix="torchrun_repeat_")
        if cfg.mode == "two-launchers":
            good, output = two_launchers(["opd.py", *FAST, "--epochs", "2", "--no-resume"], run_dir)
        else:
            good, output = restart(["grpo_expert.py", "--task", "pickscore", *FAST, "--epochs", "4", "--save-every", "1"], run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        ok += good
        if not good:
            with open(os.path.join(cfg.out, f"{cfg.mode}_{i}.txt"), "w") as f:
                f.write(output)
        print(f"run {i + 1}: {'ok' if good else 'FAILED'} ({time.time() - start:.0f} s)", flush=True)
    print(f"{cfg.mode}: {ok} of {cfg.runs} runs ok")


if __name__ == "__main__":
    main()
