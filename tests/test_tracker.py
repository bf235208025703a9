"""Training curves: --tracker tensorboard writes the log.jsonl records to a real event file (read back here), a
tracker that is not installed or not known gets one error line, and runs.plot_curves draws every run's log."""

import os

import pytest

import runs
from helpers import assert_one_error_line, read_log, run_script

FAST = ["--task", "pickscore", "--epochs", "2", "--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4",
        "--sample-batch", "8", "--train-batch", "8", "--grid-every", "0", "--lora-rank", "4", "--lora-alpha", "8"]
needs_base = pytest.mark.skipif(not os.path.exists(os.path.join(runs.HERE, "assets", "tiny_base.safetensors")),
                                reason="the tiny world's base weights are not built yet")


@needs_base
def test_tensorboard_gets_the_logged_records_and_curves_are_drawn(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("grpo_expert.py", "--tracker", "tensorboard", "--out", tmp_path / "run", *FAST)
    log = read_log(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rewards = events.Scalars("reward")
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx([r["reward"] for r in log], rel=1e-6)
    assert {"kl", "clipfrac", "sec_sampling"} <= set(events.Tags()["scalars"])

    drawn = runs.plot_curves([tmp_path / "run", tmp_path / "missing"], tmp_path / "curves.png")
    assert "reward" in drawn and "kl" in drawn and "reward_pickscore" in drawn
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind,says", [("mlflow", "--tracker 'mlflow'"), ("wandb", "pip install wandb")])
def test_an_unknown_or_missing_tracker_is_one_line(tmp_path, kind, says):
    pytest.importorskip("tensorboard")  # wandb is not a requirement: the line says what to install
    try:
        import wandb  # noqa: F401
        if kind == "wandb":
            pytest.skip("wandb is installed here")
    except ImportError:
        pass
    assert_one_error_line(says, "grpo_expert.py", "--tracker", kind, "--out", tmp_path, *FAST)
