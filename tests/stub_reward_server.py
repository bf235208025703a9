"""
Stand-ins for yifan123/reward-server's GenEval and DeQA apps, for CPU tests of the SD3 path: the same
protocol (POST a pickled dict of JPEG bytes to "/", a pickled dict back), made-up but deterministic
scores that vary with the image, so that a Flow-GRPO group has a reward spread to learn from.
They score nothing real: GenEval's 'scores' are the image's mean red level and 'strict_rewards' whether
it is above 0.5; DeQA's 'outputs' are in [0.2, 1] like the real server's (which divides by 5).

    with stub_reward_servers() as (geneval_url, deqa_url): ...   # in a test (threads, free ports)
    python tests/stub_reward_server.py                           # both, on Flow-GRPO's ports 18085 / 18086
"""

import contextlib
import http.server
import io
import pickle
import threading

import numpy as np


def _pixels(jpeg):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg), formats=["jpeg"]).convert("RGB"), dtype=np.float64) / 255


def geneval_reply(payload):
    red = [float(_pixels(j)[..., 0].mean()) for j in payload["images"]]
    tags = [m.get("tag", "") for m in payload["meta_datas"]]
    strict = [1.0 if r > 0.5 else 0.0 for r in red]
    groups = {t: [s for s, u in zip(strict, tags) if u == t] for t in set(tags)}
    return {"scores": red, "rewards": strict, "strict_rewards": strict, "group_rewards": groups, "group_strict_rewards": groups}


def deqa_reply(payload):
    return {"outputs": [float(0.2 + 0.8 * (1 - _pixels(j).std(axis=(0, 1)).mean())) for j in payload["images"]]}


@contextlib.contextmanager
def serve(respond, port=0):
    """An HTTP server on 127.0.0.1 in a background thread, speaking reward-server's protocol: each POST's
    body is unpickled and passed to respond(payload), which returns (status, body bytes) to send, or
    None to send nothing (the client then sees the connection close). Yields the server's URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            answer = respond(pickle.loads(self.rfile.read(int(self.headers["Content-Length"]))))  # trusted: our own client
            if answer is None:
                return
            code, body = answer
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def stub_reward_servers(geneval_port=0, deqa_port=0):
    """Both stubs on 127.0.0.1 in background threads; yields (geneval_url, deqa_url)."""
    ok = lambda reply: lambda payload: (200, pickle.dumps(reply(payload), protocol=4))  # noqa: E731
    with serve(ok(geneval_reply), geneval_port) as geneval_url, serve(ok(deqa_reply), deqa_port) as deqa_url:
        yield geneval_url, deqa_url


if __name__ == "__main__":
    import time

    with stub_reward_servers(18085, 18086) as urls:
        print(f"stub GenEval at {urls[0]}, stub DeQA at {urls[1]} (made-up scores); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
