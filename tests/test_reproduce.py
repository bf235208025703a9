"""reproduce.sh end to end, in its --smoke mode (every stage, tiny budgets, ~95 s on one core): the stages
chain, every model of the paper's table is evaluated, and main.json has the documented schema. That a
rerun resumes each stage, and redoes nothing once done, is tested stage by stage (test_reliability.py,
the stages' resume tests) and for reproduce_sd3.sh's chain (test_sd3_pipeline.py): a second smoke run here
would cost a minute of process start-ups."""

import json
import os
import subprocess

import pytest

from helpers import ENV, ROOT

ROWS = ["base", "grpo-geneval", "grpo-ocr", "grpo-deqa", "grpo-pickscore", "grpo-mix", "merge-init", "sft-init",
        "opd-sft", "opd-merge", "opd-merge-nomar"]


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")),
                    reason="reproduce.sh runs the repository's .venv (made by the README's set-up command)")
def test_reproduce_smoke_runs_every_stage(tmp_path):
    result = subprocess.run(["bash", "reproduce.sh", "--smoke"], cwd=ROOT, env=dict(ENV, REPRO_OUT=str(tmp_path)),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "main.json") as f:
        rows = json.load(f)["rows"]
    assert [r["model"] for r in rows] == ROWS
    columns = ("geneval", "ocr", "deqa", "pickscore", "average")
    for r in rows:
        # each evaluated adapter by its content's sha256 (a re-upload under one name gets another), the base by name
        assert set(r) == {"model", "adapter_sha256", *columns, *(f"{c}_se" for c in columns)}
        assert r["adapter_sha256"] == "base" if r["model"] == "base" else len(r["adapter_sha256"]) == 64, r
        assert all(0 <= r[k] <= 1 for k in r if k not in ("model", "adapter_sha256") and r[k] is not None) and all(r[c] is not None for c in columns), r
    for name in ("ood.json", "quality.json", "gain.json", "paired.json", "main.md", "main.png", "grid_compare.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "paired.json") as f:  # every model minus the base, and minus GRPO-Mix
        pairs = [(r["model"], r["minus"]) for r in json.load(f)["rows"]]
    assert pairs == [(m, "base") for m in ROWS if m != "base"] + [(m, "grpo-mix") for m in ROWS if m != "grpo-mix"]
    with open(tmp_path / "runs" / "grpo-deqa" / "config.json") as f:  # the deqa expert as the paper's DeQA teacher
        deqa = json.load(f)
    assert (deqa["prompts"], deqa["reward"]) == ("geneval,ocr,pickscore", "deqa:0.4,pickscore:0.6"), deqa
    bad = subprocess.run(["bash", "reproduce.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--quick, --smoke, --ablations" in bad.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")),
                    reason="reproduce.sh runs the repository's .venv (made by the README's set-up command)")
def test_ablations_refuse_runs_that_are_not_the_tables_models(tmp_path):
    """--ablations reuses the full run's experts and OPD students: a run folder left from another base or
    seed would silently give ablations of other models. It must stop with one line naming the file."""
    import torch
    from safetensors.torch import save_file
    import runs

    os.symlink(os.path.join(ROOT, ".venv"), tmp_path / ".venv")
    os.symlink(os.path.join(ROOT, "runs.py"), tmp_path / "runs.py")
    subprocess.run(["cp", os.path.join(ROOT, "reproduce.sh"), str(tmp_path)], check=True)
    out = tmp_path / "results" / "tiny"
    names = ["grpo-geneval", "grpo-ocr", "grpo-deqa", "grpo-pickscore", "merge", "opd-merge", "opd-merge-nomar"]
    models, shas = {}, {}
    for i, name in enumerate(names):
        (out / "runs" / name).mkdir(parents=True)
        path = f"results/tiny/runs/{name}/adapter.safetensors"
        save_file({"w": torch.full((2,), float(i))}, str(tmp_path / path))
        models[name], shas[name] = path, runs.content_sha256(str(tmp_path / path))
    shas["grpo-ocr"] = "0" * 64  # the tables were computed from another OCR expert
    with open(out / "eval_config.json", "w") as f:
        json.dump({"models": dict(base=None, **models), "model_sha256": dict(base="base", **shas)}, f)
    result = subprocess.run(["bash", "reproduce.sh", "--ablations"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: results/tiny/runs/grpo-ocr/adapter.safetensors is not the grpo-ocr that results/tiny/main.md")
    assert not (out / "runs" / "merge-ties").exists()  # it stopped before training anything


def test_a_lane_of_several_stages_prints_each_stages_own_last_epoch(tmp_path):
    """A lane that runs GRPO-Mix and then OPD printed OPD's epoch line under the lane's name ("grpo-mix: epoch 20:
    KL ..."): each stage of a lane now reports its own last epoch line under its own name. Runs reproduce.sh's
    own `stage` and `last_epochs` functions on a made-up lane (no training)."""
    with open(os.path.join(ROOT, "reproduce.sh")) as f:
        text = f.read()
    functions = "\n".join(line for line in text.splitlines() if line.startswith("stage() "))
    start = text.index("last_epochs() {")
    functions += "\n" + text[start: text.index("\n}\n", start) + 3]
    lane = ("stage grpo-mix bash -c 'echo epoch 1: reward 0.5; echo epoch 2: reward 0.6; echo saved' && "
            "stage opd-merge-nomar bash -c 'printf \"epoch 1: KL 1e-3\\rdone\\n\"'")
    script = f"{functions}\n( {lane} ) > {tmp_path}/lane.log 2>&1\nlast_epochs {tmp_path}/lane.log grpo-mix\n"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["   grpo-mix: epoch 2: reward 0.6", "   opd-merge-nomar: epoch 1: KL 1e-3"]
    single = subprocess.run(["bash", "-c", f"{functions}\nprintf 'epoch 3: x\\nend\\n' > {tmp_path}/one.log\n"
                             f"last_epochs {tmp_path}/one.log grpo-ocr\n"], capture_output=True, text=True, timeout=60)
    assert single.stdout.splitlines() == ["   grpo-ocr: epoch 3: x"]  # a lane of one stage: the lane's name
