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
    for r in rows:
        assert set(r) == {"model", "geneval", "ocr", "deqa", "pickscore", "average"}
        assert all(0 <= r[k] <= 1 for k in r if k != "model"), r
    for name in ("ood.json", "quality.json", "gain.json", "main.md", "main.png", "grid_compare.png"):
        assert (tmp_path / name).is_file(), name
    bad = subprocess.run(["bash", "reproduce.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--quick, --smoke, --ablations" in bad.stderr
