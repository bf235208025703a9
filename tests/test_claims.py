"""bench/claims.py's rule over training seeds (issue #38, item 6), on synthetic evaluation JSON: a difference holds
only beyond 2 between-seed SE with one sign in every seed; ">= 90% kept" is shown by its lower 2-SE bound."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import claims  # noqa: E402


def test_difference_rule():
    assert claims.difference_verdict([0.10, 0.12, 0.11])[0] == "holds"
    # the mean is beyond 2 SE but one seed has the other sign: not shown
    v, mean, se = claims.difference_verdict([1.0, 1.0, 1.0, 1.0, -0.1])
    assert abs(mean) > 2 * se and v == "not shown"
    assert claims.difference_verdict([-0.10, -0.12, -0.11])[0] == "reversed"
    assert claims.difference_verdict([-0.10, -0.12, -0.11], sign=-1)[0] == "holds"
    assert claims.difference_verdict([0.02, -0.01, 0.03])[0] == "not shown"
    # two seeds: SE = |a - b| / 2, so the mean must exceed |a - b|
    v, mean, se = claims.difference_verdict([0.10, 0.12])
    assert v == "holds" and mean == pytest.approx(0.11) and se == pytest.approx(0.01)
    assert claims.difference_verdict([0.10, 0.40])[0] == "not shown"      # mean 0.25 < 2 SE = 0.3
    assert claims.difference_verdict([0.10])[0] == "one seed, not judged"
    # the seeds score the same prompts: their SE over prompts adds to the spread between seeds
    v, mean, se = claims.difference_verdict([0.10, 0.12, 0.11], prompt_ses=[0.06, 0.05, 0.04])
    assert se == pytest.approx(np.hypot(0.01 / np.sqrt(3), 0.05)) and v == "holds"           # 0.11 > 2 x 0.0503
    assert claims.difference_verdict([0.06, 0.07, 0.06], prompt_ses=[0.05] * 3)[0] == "not shown"  # 0.063 < 0.1


def test_kept_rule():
    assert claims.kept_verdict([0.95, 0.97, 0.96])[0] == "shown"
    v, mean, se = claims.kept_verdict([0.85, 1.00, 0.95])
    assert v == "consistent" and mean >= 0.9 > mean - 2 * se
    assert claims.kept_verdict([0.80, 0.85, 0.90])[0] == "not met"
    assert claims.kept_verdict([0.95, None, 0.97])[0] == "no gain to keep"
    assert claims.kept_verdict([0.95])[0] == "consistent"                  # one seed: no bound to show it by


def test_headroom_target():
    # gain / (1 - base) against the bar, and the gain beyond 3 of its paired SE
    assert claims.headroom_met(0.30, 0.05, 0.4, 0.5)            # 50% of a headroom of 0.6, 6 SE
    assert not claims.headroom_met(0.29, 0.05, 0.4, 0.5)        # 48%
    assert not claims.headroom_met(0.40, 0.15, 0.4, 0.5)        # 67%, but within 3 SE


def write_run(folder, opd_minus_mix, expert_gain, kept, deqa_objects=0.8):
    """A run folder with the rows claims.py reads: OPD-Merge - GRPO-Mix on geneval, the GenEval expert - base,
    OPD-Merge's share of the GenEval expert's gain, and the quality table's objects (base 0.9, OPD-Merge 0.9,
    the deqa expert deqa_objects)."""
    os.makedirs(folder)
    rows = [{"model": "opd-merge", "minus": "grpo-mix", "geneval": opd_minus_mix, "geneval_se": 0.05},
            {"model": "grpo-geneval", "minus": "base", "geneval": expert_gain, "geneval_se": 0.05}]
    with open(os.path.join(folder, "paired.json"), "w") as f:
        json.dump({"rows": rows}, f)
    with open(os.path.join(folder, "gain.json"), "w") as f:
        json.dump({"rows": [{"model": "opd-merge", "geneval": kept, "geneval_se": 0.1}]}, f)
    with open(os.path.join(folder, "main.json"), "w") as f:
        json.dump({"rows": [{"model": "base", "geneval": 0.4, "geneval_se": 0.05}]}, f)
    with open(os.path.join(folder, "quality.json"), "w") as f:
        json.dump({"rows": [{"model": m, "objects": v, "objects_se": 0.01}
                            for m, v in (("base", 0.9), ("grpo-deqa", deqa_objects), ("opd-merge", 0.9))]}, f)


def verdicts(text):
    """{claim: verdict} from the markdown table."""
    return {cells[1].strip(): cells[-2].strip() for cells in (line.split("|") for line in text.splitlines())
            if len(cells) > 3 and cells[1].strip() not in ("claim", "---")}


def test_script_writes_the_table_from_every_seed(tmp_path):
    for k, (d, g, kept, objects) in enumerate([(0.10, 0.40, 0.95, 0.80), (0.12, 0.30, 0.97, 0.78), (-0.01, 0.35, 0.96, 0.82)]):
        write_run(tmp_path / f"tiny-seed{k}", d, g, kept, objects)
    out = tmp_path / "claims.md"
    runs = ",".join(str(tmp_path / f"tiny-seed{k}") for k in range(3))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "claims.py"), "--runs", runs, "--out", str(out)],
                   check=True, capture_output=True)
    table = verdicts(out.read_text())
    assert table["OPD-Merge > GRPO-Mix on geneval"] == "not shown"      # seed 2 has the other sign
    assert table["geneval expert > base on geneval"] == "holds"
    assert table["OPD-Merge keeps >= 90% of the geneval expert's gain"] == "shown"
    # expert gains of 0.40, 0.30, 0.35 on a headroom of 0.6, SE 0.05: 67%, 50%, 58%, all beyond 3 SE
    assert table["geneval expert gains >= 50% of the headroom, beyond 3 paired SE"] == "met in every seed"
    assert "OPD-Merge > GRPO-Mix on ocr" not in table                   # columns the JSON lacks are left out
    assert table["grpo-deqa drops named objects (objects below the base's)"] == "holds"       # -0.1 in every seed
    assert table["opd-merge drops named objects (objects below the base's)"] == "not shown"
    assert not os.path.exists(str(out) + ".tmp")
    assert "| base | 0.400 +- 0.000 |" in out.read_text()                 # the main table over seeds
    # two seeds that agree in sign and are close: holds
    runs2 = ",".join(str(tmp_path / f"tiny-seed{k}") for k in range(2))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "claims.py"), "--runs", runs2, "--out", str(out)],
                   check=True, capture_output=True)
    assert verdicts(out.read_text())["OPD-Merge > GRPO-Mix on geneval"] == "holds"
    assert np.isclose(claims.difference_verdict([0.10, 0.12])[2], 0.01)
