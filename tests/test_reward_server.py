"""
The GenEval / DeQA clients against a real HTTP server on 127.0.0.1 that imitates yifan123/reward-server
(issue #17): honest replies give the right scores, a reply that names a callable is refused before it
runs, transient failures are retried with backoff, a 4xx and garbage are not, and a timeout is not resent
to a server that may still be working on the batch (issue #26). Every call goes through
rewards.get_reward(task, "sd3") with the URL in the environment, as the stages call it.
"""

import contextlib
import os
import pickle
import socket
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import rewards  # noqa: E402
from rewards import get_reward  # noqa: E402
from stub_reward_server import serve  # noqa: E402

IMAGES = torch.rand(2, 3, 8, 8)
METADATA = [{"tag": "counting", "prompt": f"{n} cats", "include": [{"class": "cat", "count": n}]} for n in (2, 4)]


def geneval_reply(payload):
    """What app_geneval.py answers: lists of Python floats, one per image, and per-tag groups."""
    n = len(payload["images"])
    scores = [m["include"][0]["count"] / 10 for m in payload["meta_datas"]]
    return {"scores": scores, "rewards": [0.0] * n, "strict_rewards": [1.0] * n,
            "group_rewards": {"counting": [0.0] * n}, "group_strict_rewards": {"counting": [1.0] * n}}


def ok(obj, protocol=4):  # 4: the default pickle protocol of Python 3.8-3.13, which the servers run on
    return 200, pickle.dumps(obj, protocol=protocol)


@contextlib.contextmanager
def reward_server(replies, port=0):
    """Serve POSTs on 127.0.0.1: request k (from 1) gets replies[k-1], the last one repeating. A reply is
    (status, body), a function of the request's payload giving one, "drop" (close the connection
    without answering) or "slow" (answer nothing for a while). Yields the requests' payloads and the URL."""
    requests = []

    def respond(payload):
        requests.append(payload)
        reply = replies[min(len(requests), len(replies)) - 1]
        if reply == "drop":
            return None  # HTTP/1.0: the connection closes with no status line (the client sees a reset)
        if reply == "slow":
            time.sleep(1.0)  # past the client's timeout
            return None
        return reply(payload) if callable(reply) else reply

    with serve(respond, port) as url:
        yield requests, url


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """The client's backoff sleeps, recorded and skipped (the schedule is checked, not waited for)."""
    asked = []
    monkeypatch.setattr(rewards, "time", types.SimpleNamespace(sleep=asked.append))
    return asked


def backoff(n):  # the waits before attempts 2..n+1
    return [rewards.RETRY_DELAY * 2 ** k for k in range(n)]


def one_error_line(exc_info):
    """The message the user sees: SystemExit prints its code alone, an uncaught error its str last."""
    e = exc_info.value
    message = str(e.code) if isinstance(e, SystemExit) else str(e)
    assert "\n" not in message, message
    return message


# -----------------------------------------------------------------------------
# (a) honest replies


def test_honest_replies_give_the_scores(monkeypatch):
    with reward_server([lambda payload: ok(geneval_reply(payload))]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_GENEVAL_URL", url)
        r = get_reward("geneval", "sd3")(IMAGES, ["p", "q"], METADATA)
        assert torch.allclose(r, torch.tensor([0.2, 0.4]))
        assert set(requests[0]) == {"images", "meta_datas", "only_strict"} and requests[0]["meta_datas"] == METADATA
        assert torch.equal(get_reward("geneval", "sd3", field="strict_rewards")(IMAGES, ["p", "q"], METADATA),
                           torch.ones(2))


def _old_numpy_paths(body):
    """The same pickle as numpy 1.x writes it (numpy.core, not numpy._core). Protocol 3 names globals
    as text lines, so the rename keeps the pickle valid."""
    renamed = body.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert renamed != body
    return renamed


@pytest.mark.parametrize("outputs, encode", [
    (np.array([0.8, 0.6], dtype=np.float32), ok),                            # an array (numpy 2 paths)
    ([np.float64(0.8), np.float32(0.6)], ok),                                # numpy scalars
    (np.array([0.8, 0.6]), lambda o: (200, _old_numpy_paths(pickle.dumps(o, protocol=3)))),
    ([np.float64(0.8), np.float32(0.6)], lambda o: (200, _old_numpy_paths(pickle.dumps(o, protocol=3)))),
])
def test_numpy_replies_give_the_scores(monkeypatch, outputs, encode):
    with reward_server([encode({"outputs": outputs})]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_DEQA_URL", url)
        r = get_reward("deqa", "sd3", scale=5.0)(IMAGES, ["p", "q"])
        assert torch.allclose(r, torch.tensor([4.0, 3.0])) and len(requests) == 1


# -----------------------------------------------------------------------------
# (b) hostile replies: refused before anything they name runs


class WritesMarker:
    """Unpickled by pickle.loads, this runs exec(...) and writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


class RunsShell(WritesMarker):
    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("make, refused", [
    (lambda m: {"scores": [0.5, WritesMarker(m)]}, "builtins.exec"),
    (lambda m: RunsShell(m), f"{os.system.__module__}.system"),                # 'posix.system' on Linux
    (lambda m: {"scores": np.array([0.5, WritesMarker(m)], dtype=object)}, "builtins.exec"),  # via numpy's globals
])
def test_hostile_reply_is_refused_and_never_runs(monkeypatch, tmp_path, sleeps, make, refused):
    marker = tmp_path / "marker"
    body = pickle.dumps(make(marker), protocol=4)
    with reward_server([(200, body)]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_GENEVAL_URL", url)
        with pytest.raises(SystemExit) as e:
            get_reward("geneval", "sd3")(IMAGES, ["p", "q"], METADATA)
    message = one_error_line(e)
    assert message.startswith(f"error: geneval reward server at {url} ") and f"'{refused}'" in message
    assert "expected plain data" in message
    assert not marker.exists()
    assert len(requests) == 1 and sleeps == []  # a hostile reply is not asked for again

    pickle.loads(body)  # the control: the same bytes through plain pickle do run the payload
    assert marker.exists()


def test_garbage_reply_is_one_error_and_not_retried(monkeypatch, sleeps):
    with reward_server([(200, b"<html>502 Bad Gateway</html>")]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_DEQA_URL", url)
        with pytest.raises(SystemExit) as e:
            get_reward("deqa", "sd3")(IMAGES, ["p", "q"])
    message = one_error_line(e)
    assert message.startswith(f"error: deqa reward server at {url} sent a reply that is not a pickle")
    assert len(requests) == 1 and sleeps == []


# -----------------------------------------------------------------------------
# (c) transient failures are retried with backoff; (d) a 4xx is not


UNAVAILABLE = (503, b"Service Unavailable: the worker is restarting")


@pytest.mark.parametrize("failures", [
    [UNAVAILABLE, UNAVAILABLE],
    ["drop", UNAVAILABLE, "drop"],  # reset connections and a 5xx, then an answer (a timeout: below)
])
def test_transient_failures_are_retried(monkeypatch, sleeps, failures):
    with reward_server(failures + [lambda payload: ok(geneval_reply(payload))]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_GENEVAL_URL", url)
        r = get_reward("geneval", "sd3", timeout=0.5)(IMAGES, ["p", "q"], METADATA)
    assert torch.allclose(r, torch.tensor([0.2, 0.4]))
    assert len(requests) == len(failures) + 1 and all(q["meta_datas"] == METADATA for q in requests)
    assert sleeps == backoff(len(failures)) and sleeps[1] == 2 * sleeps[0] > 0


def test_a_server_that_stays_down_fails_after_the_retries(monkeypatch, sleeps):
    with reward_server([UNAVAILABLE]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_GENEVAL_URL", url)
        with pytest.raises(RuntimeError) as e:
            get_reward("geneval", "sd3")(IMAGES, ["p", "q"], METADATA)
    message = one_error_line(e)
    assert f"geneval reward server at {url} failed (HTTP 503): Service Unavailable" in message
    assert f"[{rewards.RETRY_ATTEMPTS} attempts]" in message
    assert len(requests) == rewards.RETRY_ATTEMPTS == 4 and sleeps == backoff(3) == [0.5, 1.0, 2.0]


def test_a_refused_connection_is_retried(monkeypatch, sleeps):
    with socket.socket() as s:  # a port nobody listens on ... yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FLOWOPD_DEQA_URL", f"http://127.0.0.1:{port}")
    with contextlib.ExitStack() as stack:
        served = []

        def start_server_then_wait(delay):  # the server comes up during the client's first backoff
            sleeps.append(delay)
            if not served:
                served.append(stack.enter_context(reward_server([ok({"outputs": [0.9, 0.7]})], port=port))[0])

        monkeypatch.setattr(rewards, "time", types.SimpleNamespace(sleep=start_server_then_wait))
        r = get_reward("deqa", "sd3")(IMAGES, ["p", "q"])
    assert torch.allclose(r, torch.tensor([0.9, 0.7])) and sleeps == backoff(1) and len(served[0]) == 1


def test_a_4xx_is_not_retried(monkeypatch, sleeps):
    with reward_server([(400, b"Bad Request\nKeyError: 'meta_datas'")]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_GENEVAL_URL", url)
        with pytest.raises(RuntimeError) as e:
            get_reward("geneval", "sd3")(IMAGES, ["p", "q"], METADATA)
    message = one_error_line(e)
    assert f"geneval reward server at {url} failed (HTTP 400): KeyError: 'meta_datas'" in message
    assert "attempts" not in message and len(requests) == 1 and sleeps == []


# -----------------------------------------------------------------------------
# (e) a timeout is not resent: the server got the batch and may still be working on it


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_timeout_is_not_resent(monkeypatch, sleeps, how):
    with reward_server(["slow"]) as (requests, url):  # silent for 1 s, past the client's 0.25 s
        monkeypatch.setenv("FLOWOPD_GENEVAL_URL", url)
        if how == "env":
            monkeypatch.setenv("FLOWOPD_REWARD_TIMEOUT", "0.25")
        options = dict(timeout=0.25) if how == "option" else {}
        reward = get_reward("geneval", "sd3", batch_size=2, **options)
        with pytest.raises(SystemExit) as e:
            reward(torch.rand(3, 3, 8, 8), ["p"] * 3, METADATA + METADATA[:1])
    message = one_error_line(e)
    assert message.startswith(f"error: geneval reward server at {url} sent no answer to a batch of 2 images "
                              "within the 0.25 s timeout; not resent")
    assert "FLOWOPD_REWARD_TIMEOUT=" in message and "timeout=" in message and "batch_size=" in message
    assert len(requests) == 1 and sleeps == []  # neither resent nor the next batch sent


def test_a_timeout_before_the_request_went_out_is_retried(monkeypatch, sleeps):
    """urllib reports a connect (or send) timeout as a URLError: the server never had the batch, so the
    client may try again; here the second attempt reaches the server."""
    real_urlopen = rewards.urllib.request.urlopen
    attempts = []

    def connect_times_out_once(request, timeout):
        attempts.append(timeout)
        if len(attempts) == 1:
            raise rewards.urllib.error.URLError(TimeoutError("timed out"))
        return real_urlopen(request, timeout=timeout)

    with reward_server([ok({"outputs": [0.9, 0.7]})]) as (requests, url):
        monkeypatch.setenv("FLOWOPD_DEQA_URL", url)
        monkeypatch.setattr(rewards.urllib.request, "urlopen", connect_times_out_once)
        r = get_reward("deqa", "sd3", timeout=5)(IMAGES, ["p", "q"])
    assert torch.allclose(r, torch.tensor([0.9, 0.7]))
    assert attempts == [5.0, 5.0] and len(requests) == 1 and sleeps == backoff(1)


def test_a_bad_timeout_is_one_error(monkeypatch):
    monkeypatch.setenv("FLOWOPD_REWARD_TIMEOUT", "two minutes")
    with pytest.raises(SystemExit) as e:
        get_reward("deqa", "sd3")
    assert "FLOWOPD_REWARD_TIMEOUT" in one_error_line(e) and "'two minutes'" in str(e.value)
    with pytest.raises(SystemExit, match="> 0"):
        get_reward("geneval", "sd3", timeout=0)
