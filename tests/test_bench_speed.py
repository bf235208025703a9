"""bench/speed.py (issue #16; issue 26 item 7) measures the stage scripts themselves: run once here on the random
SD3.5-M architecture at tiny width (--world sd3-random --scale tiny) at SD3's settings (T = 10, 9 trained steps, CFG,
SDE on every step, 4 teachers + the MAR anchor). Its hook counts are what the scripts ran (opd.py's own forwards_*
agree) and are PAPER-NOTES' per-image figures (OPD 74 forwards + 18 backwards); its floor replays every call of
the measured epoch; its JSON has every field, with ratios that follow from the numbers beside them."""

import json

import pytest

from helpers import assert_one_error_line, run_script

SMALL = ["--world", "sd3-random", "--scale", "tiny", "--device", "cpu", "--threads", "1", "--prompts-per-epoch", "1",
         "--group-size", "2", "--sample-batch", "2", "--train-batch", "2", "--updates-per-epoch", "1", "--sft-train-batch", "2",
         "--floor-reps", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    printed = run_script("bench/speed.py", *SMALL, "--out", out, timeout=300)
    return json.loads(out.read_text()), printed


def test_counts_are_what_the_scripts_ran_and_the_papers(result):
    r, _ = result
    st = r["stages"]
    T, S = 10, 9
    grpo, opd, sft = st["grpo"]["counts"], st["opd"]["counts"], st["sft"]["counts"]
    # GRPO: T sampling steps, then S trained steps (with grad) each beside its KL reference (without); CFG doubles rows
    assert grpo["kept"] == 1.0  # PickScore on random images has spread: every group trains
    assert (grpo["forwards_per_image"], grpo["backwards_per_image"]) == (56, 18) == (2 * T + 4 * S, 2 * S)
    assert grpo["by_phase"]["sampling"] == dict(calls=T, forwards_per_image=2 * T, backwards_per_image=0)
    # OPD: the student samples, its teacher and the MAR anchor label each distilled step, the student trains on it
    assert (opd["forwards_per_image"], opd["backwards_per_image"]) == (74, 18) == (2 * T + 6 * S, 2 * S)
    assert opd["by_phase"]["teachers"]["backwards_per_image"] == 0 and opd["by_phase"]["training"]["backwards_per_image"] == 2 * S
    assert opd["logged_forwards_per_image"] == dict(sampling=2 * T, frozen=4 * S, training=2 * S)  # opd.py's own counters
    # SFT: one conditional forward + backward per trained item; its cache, 40 ODE steps with CFG per item
    assert (sft["forwards_per_image"], sft["backwards_per_image"]) == (1, 1)
    assert st["sft"]["cache"]["forwards_per_item"] == 80 and sft["expected"]["cache"]["forwards_per_item"] == 80
    for name in ("grpo", "opd", "sft"):
        c = st[name]["counts"]
        assert (c["forwards_per_image"], c["backwards_per_image"]) == (c["expected"]["forwards"], c["expected"]["backwards"])


def test_floor_replays_every_call(result):
    r, _ = result
    for name, st in r["stages"].items():
        sigs = st["floor_signatures"]
        assert sum(sig["count"] for sig in sigs) == st["counts"]["calls"], name
        assert st["floor_seconds"] == pytest.approx(sum(sig["count"] * sig["seconds_per_call"] for sig in sigs))
        assert st["model_flops"] == sum(sig["count"] * sig["flops_per_call"] for sig in sigs) > 0
        assert st["floor_by_phase"].keys() <= st["phases"].keys(), name  # every call lay in one of the script's own phases
    per_row = lambda sig: sig["flops_per_call"] / sig["shape"][0][0]
    sigs = r["stages"]["opd"]["floor_signatures"]
    fwd = [per_row(sig) for sig in sigs if not sig["grad"] and sig["adapter"] == "student"]
    bwd = [per_row(sig) for sig in sigs if sig["backward"]]
    assert fwd and bwd and min(bwd) > 1.5 * max(fwd)  # a backward adds FLOPs (input gradients, the LoRA's weight gradients)
    assert {sig["adapter"] for sig in sigs if not sig["grad"]} >= {"student", None}  # the student samples, the base anchors


def test_json_has_every_field(result):
    r, printed = result
    assert set(r["stages"]) == {"grpo", "sft", "opd"}  # SD3's SDE window is 0: no grpo-w0
    for name, st in r["stages"].items():
        for key in ("script", "command", "images", "epochs", "total_seconds", "seconds_per_image", "phases", "phases_per_image",
                    "first_epoch_seconds", "floor_seconds", "floor_by_phase", "floor_signatures", "iteration_over_floor", "counts",
                    "model_flops", "model_tflops_per_s_iteration", "model_tflops_per_s_floor", "peak_rss_bytes", "settings"):
            assert key in st, (name, key)
        assert st["exit_code"] == 0 and st["epochs"] == 2 and st["images"] == 2
        assert sum(st["phases"].values()) == pytest.approx(st["total_seconds"], rel=1e-6)
        assert st["iteration_over_floor"] == pytest.approx(st["total_seconds"] / st["floor_seconds"])
        assert f"\n{name} " in printed  # a table row per stage
    assert set(r["stages"]["opd"]["phases"]) >= {"sampling", "teachers", "training"}
    ratio = r["ratios"]["OPD / GRPO epoch (equal batch)"]
    assert ratio["value"] == pytest.approx(r["stages"]["opd"]["total_seconds"] / r["stages"]["grpo"]["total_seconds"])
    m = r["memory"]
    assert len(m["frozen_adapters"]) == 4 and m["adapters_ratio"] == pytest.approx(m["adapters_bytes"] / m["one_model_bytes"])
    assert m["separate_copies_ratio"] == pytest.approx(5 + m["student_adapter_bytes"] / m["one_model_bytes"])
    mm = r["memory_sd35_medium"]
    assert 2.2e9 < mm["parameters"] < 2.3e9  # SD3.5-Medium's transformer: 2.24 B parameters
    assert mm["adapters_ratio"] < 1.2 < mm["separate_copies_ratio"]
    assert r["world"]["transformer_config"]["dual_attention_layers"] == [0]
    for key in ("command", "targets", "wall_seconds", "peak_rss_bytes", "epochs"):
        assert key in r, key


def test_bad_input_is_one_line():
    assert_one_error_line("unknown stage", "bench/speed.py", "--stages", "grpo,nosuch")
