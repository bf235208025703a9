"""evaluate.py on the SD3 path (a tiny random SD3 pipeline, a stand-in GenEval server): the GenEval cell is
GenEval's score (the server's non-strict `rewards`, the mean of the six category means, its SE over prompts
within categories), strict correctness is an extra column, every row names its adapter by hash, and the
scorers are built on the device evaluate.py runs on."""

import json
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

import rewards
import worlds
from helpers import ENV, ROOT
from sd3_tiny import build_tiny_sd3
from stub_reward_server import serve

# categories of unequal size; per prompt, what the stand-in server answers: GenEval's correctness r
# (`rewards`, computed only when only_strict is False) and the strict one s (`strict_rewards`)
CATEGORIES = {"single_object": [(1, 1), (1, 0)], "two_object": [(1, 1), (0, 0), (1, 0)], "counting": [(1, 0), (0, 0)],
              "colors": [(1, 1), (1, 1), (1, 0), (1, 0)], "position": [(0, 0), (1, 0)], "color_attr": [(1, 1), (0, 0), (0, 0)]}


def geneval_stub(payload):
    meta = payload["meta_datas"]
    strict = [float(m["s"]) for m in meta]
    # the real server leaves `rewards` at 0 (is_correct False) when only_strict is True
    correct = [0.0] * len(meta) if payload["only_strict"] else [float(m["r"]) for m in meta]
    return 200, pickle.dumps({"scores": [0.5] * len(meta), "rewards": correct, "strict_rewards": strict,
                              "group_rewards": {}, "group_strict_rewards": {}})


@pytest.fixture(scope="module")
def sd3_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3_eval")
    build_tiny_sd3(tmp / "sd3")
    folder = tmp / "prompts" / "sd3"
    folder.mkdir(parents=True)
    lines = [json.dumps(dict(tag=tag, prompt=f"{tag} prompt {i}", include=[{"class": "cat", "count": 1}], r=r, s=s))
             for tag, answers in CATEGORIES.items() for i, (r, s) in enumerate(answers)]
    (folder / "geneval_test.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "pickscore_test.txt").write_text("a red apple\n")
    world = worlds.load_world(str(tmp / "sd3"), "cpu")
    worlds.add_lora(world.transformer, "x", rank=2, alpha=2)
    worlds.save_lora(world.transformer, "x", str(tmp / "adapter.safetensors"))
    return tmp


def test_geneval_cell_is_the_mean_of_category_means_of_genevals_correctness(sd3_setup, tmp_path):
    tmp = sd3_setup
    with serve(geneval_stub) as url:
        env = dict(ENV, FLOWOPD_PROMPTS=str(tmp / "prompts"), FLOWOPD_GENEVAL_URL=url, OMP_NUM_THREADS="1",
                   FLOWOPD_PROMPT_CACHE=str(tmp / "prompt_cache"))
        r = subprocess.run([sys.executable, "evaluate.py", "--world", str(tmp / "sd3"), "--tasks", "geneval", "--tables", "main",
                            "--models", f"base,x={tmp / 'adapter.safetensors'}", "--images-per-prompt", "1", "--steps", "2",
                            "--grid-prompts", "1", "--threads", "1", "--out", str(tmp_path / "out")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.load(open(tmp_path / "out" / "main.json"))["rows"]

    def category_mean_se(k):
        means = [np.mean([a[k] for a in answers]) for answers in CATEGORIES.values()]
        ses = [np.std([a[k] for a in answers], ddof=1) / np.sqrt(len(answers)) for answers in CATEGORIES.values()]
        return np.mean(means), np.sqrt(np.sum(np.square(ses))) / len(CATEGORIES)

    (geneval, geneval_se), (strict, strict_se) = category_mean_se(0), category_mean_se(1)
    plain = np.mean([a[0] for answers in CATEGORIES.values() for a in answers])
    assert abs(geneval - plain) > 0.01  # unequal categories: the category mean is not the prompt mean
    for row in rows:  # the stub answers by prompt, so both models score alike
        assert row["geneval"] == pytest.approx(geneval) and row["geneval_se"] == pytest.approx(geneval_se)
        assert row["geneval_strict"] == pytest.approx(strict) and row["geneval_strict_se"] == pytest.approx(strict_se)
    base, x = rows
    assert base["adapter_sha256"] == "base"
    assert x["adapter_sha256"] == worlds.adapter_sha256(str(tmp / "adapter.safetensors"))


def test_scorers_are_built_on_the_device_evaluate_runs_on(sd3_setup, monkeypatch):
    """evaluate.py passes its device (and --reward-dtype) to every reward, as the training stages do: a spy in
    place of rewards.get_reward records the calls and stops the script before it samples anything."""
    built = []

    def spy(name, world="sd3", device=None, **options):
        built.append((name, device, options))
        if len(built) == 2:
            raise SystemExit("spy: enough")
        return lambda *a, **k: None

    monkeypatch.setattr(rewards, "get_reward", spy)
    monkeypatch.setenv("FLOWOPD_PROMPTS", str(sd3_setup / "prompts"))
    monkeypatch.setenv("FLOWOPD_PROMPT_CACHE", str(sd3_setup / "prompt_cache"))
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--world", str(sd3_setup / "sd3"), "--tasks", "geneval,pickscore", "--tables", "main",
                                     "--limit", "1", "--threads", "1", "--reward-dtype", "float32",
                                     "--out", str(sd3_setup / "unused")])
    with pytest.raises(SystemExit, match="spy: enough"):
        runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
    options = {name: (device, options) for name, device, options in built}
    assert set(options) == {"geneval", "pickscore"}
    for name, (device, _) in options.items():
        assert device == torch.device("cpu"), (name, device)
    assert options["pickscore"][1].get("dtype") == "float32" and "dtype" not in options["geneval"][1]
