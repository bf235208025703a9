"""bench/gradient_snr.py, the benchmark behind the README's reading of the experts: it runs as a user runs it,
its numbers follow from its definitions, a rerun gives the same numbers, and bad input gets one line."""

import json
import os

import pytest

from helpers import ROOT, assert_one_error_line, run_script

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "assets", "tiny_base.safetensors")),
                                reason="the tiny world's base weights are not built yet")
SMALL = ["--tasks", "deqa", "--batches", "4", "--prompts-per-batch", "2", "--group-size", "4", "--steps", "4", "--threads", "1"]


def test_numbers_follow_their_definitions_and_repeat(tmp_path):
    for run in ("a", "b"):
        run_script("bench/gradient_snr.py", *SMALL, "--out", tmp_path / f"{run}.json")
    a, b = (json.load(open(tmp_path / f"{run}.json")) for run in ("a", "b"))
    assert a["rows"] == b["rows"]  # per-sample seeds: the measurement is reproducible
    (row,) = a["rows"]
    assert row["task"] == "deqa" and row["batches"] == 4
    assert 0 <= row["reward"] <= row["best_of_group"] <= 1
    assert -1 <= row["cos"] <= 1 and -1 <= row["control_cos"] <= 1 and row["se"] > 0 and row["control_se"] > 0
    B = 2 * 4  # images per batch
    c = row["cos"] if row["measurable"] else row["cos"] + 2 * row["se"]
    assert row["measurable"] == (row["cos"] > 2 * row["se"])
    assert row["images_for_snr_1"] == pytest.approx(B * (1 - c) / c if c > 0 else float("inf"))


def test_bad_input_is_one_line(tmp_path):
    for args, says in ((["--tasks", "nosuchtask"], "is not a task"), (["--batches", "2"], "too few")):
        assert_one_error_line(says, "bench/gradient_snr.py", *args)
