"""bench/speed.py (issue #16): its hook counts are the calls the stage loops make by construction, the
paper-settings counts are PAPER-NOTES' (74 forwards + 18 backwards per image for OPD), and its JSON
has every field, with ratios that follow from the numbers beside them. All on the random SD3.5-M
architecture at tiny width (--world sd3-random-medium --scale tiny), the code the GPU check runs."""

import json
import math
import os
import sys

import pytest
import torch

from helpers import ROOT, assert_one_error_line, run_script

sys.path.insert(0, os.path.join(ROOT, "bench"))
import speed  # noqa: E402

import runs  # noqa: E402
import sde  # noqa: E402
import worlds  # noqa: E402

SMALL = ["--world", "sd3-random-medium", "--scale", "tiny", "--device", "cpu", "--threads", "1", "--prompts-per-epoch", "2",
         "--group-size", "3", "--sample-batch", "4", "--train-batch", "4", "--sft-train-batch", "4", "--steps", "4", "--floor-reps", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the test machine's cores are shared, and a tiny model's ops on 2 threads then wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    w, cleanup = speed.build_world("sd3-random-medium", "cpu", "tiny")
    yield w
    cleanup()


def test_sampling_with_cfg_is_one_forward_of_2B_rows_per_step(world):
    counter = speed.CallCounter(world.transformer)
    try:
        prompts = ["a red circle", "two blue squares", "a sign that says hi"]
        sde.sample(world, prompts, steps=10, guidance_scale=4.5, noise_level=0.7, seeds=[1, 2, 3], batch_size=2)
        calls = counter.take()
        # 10 steps for the batch of 2 images, then 10 for the batch of 1: rows 2B (CFG's [uncond; cond])
        assert [c["rows"] for c in calls] == [4] * 10 + [2] * 10
        assert not any(c["grad"] or c["backward"] for c in calls)
        assert speed.count_summary(calls, 3)["forwards_per_image"] == 20 and speed.count_summary(calls, 3)["backwards_per_image"] == 0
        sde.sample(world, prompts, steps=6, guidance_scale=1.0, noise_level=0.7, seeds=[1, 2, 3])  # no CFG: one row per image
        assert [c["rows"] for c in counter.take()] == [3] * 6
    finally:
        counter.remove()


def test_backward_is_counted_only_where_it_ran(world):
    tr = world.transformer
    worlds.add_lora(tr, "probe", 2, 4)
    counter = speed.CallCounter(tr)
    try:
        x = torch.randn(2, *world.latent_shape)
        embeds, pooled = world.encode_prompts(["a", "b"])
        with worlds.adapter(tr, "probe"):
            v = sde.predict_velocity(world, x, 0.5, embeds, pooled, 3.0)  # grad on: the LoRA's weights train
            v.square().mean().backward()
            sde.predict_velocity(world, x, 0.5, embeds, pooled, 3.0)  # a forward with grad that nobody back-propagates
            with torch.no_grad():
                sde.predict_velocity(world, x, 0.5, embeds, pooled, 1.0)
        with worlds.adapter(tr, None):
            with torch.no_grad():
                sde.predict_velocity(world, x, 0.5, embeds, pooled, 1.0)
        calls = counter.take()
        assert [(c["rows"], c["grad"], c["backward"], c["adapter"]) for c in calls] == [
            (4, True, 1, "probe"), (4, True, 0, "probe"), (2, False, 0, "probe"), (2, False, 0, None)]
        summary = speed.count_summary(calls, 2)
        assert summary["forwards_per_image"] == 6 and summary["backwards_per_image"] == 2
    finally:
        counter.remove()
        tr.delete_adapters("probe")


@pytest.fixture(scope="module")
def bench():
    cfg = runs.parse_settings(speed.__doc__, speed.SETTINGS, SMALL + ["--no-memory", "--no-flops", "--profile", "none"])
    b = speed.Bench(cfg)
    yield b
    b.close()


def _calls_of(b, stage, s):
    b.counter.take()
    info = speed.STAGES[stage](b, 0, s)
    b.phases.take()
    return info, b.counter.take()


def test_stage_counts_are_the_loops_calls(bench):
    s = speed.stage_settings(bench)
    N, T, S = 2 * 3, 4, int(math.floor(4 * 0.99))
    chunks = lambda n, size: math.ceil(n / size)

    info, calls = _calls_of(bench, "opd", s)
    by = lambda phase: [c for c in calls if c["phase"] == phase]
    assert len(by("sampling")) == T * chunks(N, 4) and all(c["rows"] in (8, 4) for c in by("sampling"))
    assert sum(c["rows"] for c in by("sampling")) == 2 * T * N
    tasks = [c["adapter"] for c in by("frozen")]
    assert tasks.count(None) == S * chunks(N, 4)  # the MAR anchor (the base) labels every sample
    assert sum(c["rows"] for c in by("frozen")) == 2 * 2 * S * N  # one teacher + the anchor per sample and step, CFG
    assert all(c["grad"] and c["backward"] == 1 and c["adapter"] == "student" for c in by("training"))
    assert sum(c["rows"] for c in by("training")) == 2 * S * N
    counts = speed.count_summary(calls, N)
    assert counts["forwards_per_image"] == speed.expected_counts("opd", s)["forwards"] == 2 * T + 6 * S
    assert counts["backwards_per_image"] == speed.expected_counts("opd", s)["backwards"] == 2 * S

    info, calls = _calls_of(bench, "grpo", s)
    assert info["kept"] == N  # the stub reward has spread: every group trains
    counts = speed.count_summary(calls, N)
    assert counts["by_phase"]["frozen"]["forwards_per_image"] == 2 * S  # the KL reference, adapters disabled
    assert all(c["adapter"] is None and not c["grad"] for c in calls if c["phase"] == "frozen")
    assert counts["forwards_per_image"] == speed.expected_counts("grpo", s, N)["forwards"] == 2 * T + 4 * S
    assert counts["backwards_per_image"] == 2 * S

    s.sft_batch = 8
    info, calls = _calls_of(bench, "sft", s)
    counts = speed.count_summary(calls, 8)
    steps = s.sft_sample_steps  # the world's eval steps: 40 on SD3
    assert steps == 40 and counts["by_phase"]["sampling"]["forwards_per_image"] == 2 * steps
    assert {c["adapter"] for c in calls if c["phase"] == "sampling"} == {f"teacher_{t}" for t in bench.tasks}
    assert [c["rows"] for c in calls if c["phase"] == "training"] == [4, 4]  # --train-guidance 1: no CFG, 2 forwards of 4
    assert counts["forwards_per_image"] == 2 * steps + 1 and counts["backwards_per_image"] == 1


def test_paper_counts_are_paper_notes(bench):
    counts = speed.paper_counts(bench, ["grpo", "sft", "opd"])
    assert (counts["opd"]["forwards_per_image"], counts["opd"]["backwards_per_image"]) == (74, 18)
    assert (counts["grpo"]["forwards_per_image"], counts["grpo"]["backwards_per_image"]) == (56, 18)
    assert (counts["sft"]["forwards_per_image"], counts["sft"]["backwards_per_image"]) == (81, 1)
    for stage in ("grpo", "sft", "opd"):
        assert counts[stage]["forwards_per_image"] == counts[stage]["expected"]["forwards"]


def test_floor_replays_every_call(bench):
    s = speed.stage_settings(bench)
    _, calls = _calls_of(bench, "opd", s)
    floor = speed.measure_floor(bench.world, calls, reps=1, flops=True)
    assert sum(sig["count"] for sig in floor["signatures"]) == len(calls)
    assert floor["seconds"] == pytest.approx(sum(sig["count"] * sig["seconds_per_call"] for sig in floor["signatures"]))
    assert floor["flops"] == sum(sig["count"] * sig["flops_per_call"] for sig in floor["signatures"]) > 0
    per_row = lambda sig: sig["flops_per_call"] / sig["shape"][0][0]
    fwd = [per_row(sig) for sig in floor["signatures"] if not sig["grad"] and sig["adapter"] == "student"]
    bwd = [per_row(sig) for sig in floor["signatures"] if sig["backward"]]
    assert fwd and bwd and min(bwd) > 1.5 * max(fwd)  # a backward adds FLOPs (the input gradients, the LoRA's weight gradients)
    assert all(p.grad is None for p in bench.transformer.parameters())


def test_json_has_every_field(tmp_path):
    out = tmp_path / "speed.json"
    printed = run_script("bench/speed.py", *SMALL, "--profile", "all", "--out", out, timeout=300)
    r = json.loads(out.read_text())
    assert set(r["stages"]) == {"grpo", "sft", "opd"}  # SD3's default window is 0: no grpo-w0
    for name, st in r["stages"].items():
        for key in ("images", "total_seconds", "seconds_per_image", "phases", "phases_per_image", "floor_seconds", "floor_by_phase",
                    "floor_signatures", "iteration_over_floor", "model_phases_over_floor", "counts", "model_flops",
                    "model_tflops_per_s_iteration", "model_tflops_per_s_floor", "peak_rss_bytes", "profile", "settings"):
            assert key in st, (name, key)
        assert set(st["phases"]) == {"sampling", "rewards", "frozen", "training", "other"}
        assert sum(st["phases"].values()) == pytest.approx(st["total_seconds"], rel=1e-6)
        assert st["iteration_over_floor"] == pytest.approx(st["total_seconds"] / st["floor_seconds"])
        assert st["counts"]["forwards_per_image"] == pytest.approx(st["counts"]["expected"]["forwards"])
        assert st["counts"]["backwards_per_image"] == pytest.approx(st["counts"]["expected"]["backwards"])
        assert st["profile"]["top_own"] and st["profile"]["non_model_seconds"] >= 0
        assert f"\n{name} " in printed  # a table row per stage
    assert "amortised" in r["stages"]["sft"]
    (ratio,) = [v for k, v in r["ratios"].items() if k.startswith("OPD / GRPO iteration")]
    assert ratio["value"] == pytest.approx(r["stages"]["opd"]["total_seconds"] / r["stages"]["grpo"]["total_seconds"])
    m = r["memory"]
    assert len(m["frozen_adapters"]) == 5 and m["adapters_ratio"] == pytest.approx(m["adapters_bytes"] / m["one_model_bytes"])
    assert m["separate_copies_ratio"] == pytest.approx(6 + m["student_adapter_bytes"] / m["one_model_bytes"])
    assert m["measured"]["rss_frozen_copies"] >= 0
    mm = r["memory_sd35_medium"]
    assert 2.2e9 < mm["parameters"] < 2.3e9  # SD3.5-Medium's transformer: 2.24 B parameters
    assert mm["adapters_ratio"] < mm["separate_copies_ratio"]
    assert r["paper_counts"]["opd"]["forwards_per_image"] == 74 and r["paper_counts"]["opd"]["backwards_per_image"] == 18
    for key in ("world", "command", "load_before", "load_after", "peak_rss_bytes", "wall_seconds", "targets", "rewards"):
        assert key in r, key
    assert r["world"]["transformer_config"]["dual_attention_layers"] == [0, 1]


def test_bad_input_is_one_line():
    assert_one_error_line("unknown stage", "bench/speed.py", "--stages", "grpo,nosuch")
