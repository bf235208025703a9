"""A warm parent for the stage scripts the tests run. `python script.py` spends most of a tiny run's CPU
importing torch, diffusers, transformers and peft (seconds a start, and the suite starts the scripts dozens
of times). This process imports them once and forks a child for each run; the child sets the run's
working folder, environment, argv and sys.path, and runs the script as __main__, exactly as `python script.py`
would after those imports. Nothing of this repository is imported here, so every module of ours (and
every environment variable it reads at import) is fresh in each child. Torch has run no operation here, so
no OpenMP pool exists yet when it forks.

Protocol, one run at a time: a request is a pickled dict (script, args, cwd, env, stdout, stderr) after
its 8-byte length on stdin; the reply is the child's pid, then its exit status, each a line on stdout."""

import atexit
import os
import pickle
import runpy
import sys
import threading
import traceback

import diffusers  # noqa: F401
import peft  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: F401  (diffusers imports lazily)

if threading.active_count() != 1:  # a library started a thread: a fork would copy it half-way. Refuse.
    sys.exit(f"zygote: {threading.active_count()} threads after the imports; forking is not safe")


def run_child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered, as PYTHONUNBUFFERED-ish logs expect
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    script = os.path.abspath(req["script"])
    sys.argv = [req["script"], *req["args"]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # what the interpreter does with sys.exit(x)
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # What the interpreter does at exit that a script can see: join its threads (a thread pool's workers
    # stop on its exit hook, run first), then run its atexit handlers. Tearing the modules down is skipped.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


inp, out = sys.stdin.buffer, sys.stdout
while True:
    size = inp.read(8)
    if len(size) < 8:
        break
    req = pickle.loads(inp.read(int.from_bytes(size, "little")))
    out.flush()
    pid = os.fork()
    if pid == 0:
        run_child(req)
    print(pid, file=out, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), file=out, flush=True)
