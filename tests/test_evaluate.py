"""evaluate.py: the paper's Average column from its own numbers, and the real script on the tiny world:
deterministic, 2 processes == 1 process (also when the ranks' cache folders differ), a resumed (partly
cached) evaluation == a fresh one, a full cache samples nothing, main.json's schema, the gain table
(--gain-of), and a prompt file that repeats its prompts == the file written once."""

import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import pytest
import torch

import rewards
import runs
import sde
import worlds
from helpers import ENV, ROOT, assert_one_error_line, run_script, script_functions, torchrun_script

HAVE_TINY = os.path.exists(os.path.join(os.path.dirname(sde.__file__), "assets", "tiny_base.safetensors"))
needs_tiny = pytest.mark.skipif(not HAVE_TINY, reason="the tiny world's base weights (assets/tiny_base.safetensors) are not built yet")
FAST = ["--world", "tiny", "--limit", "3", "--images-per-prompt", "2", "--steps", "6", "--grid-prompts", "1", "--chunk-prompts", "2",
        "--threads", "1"]  # 1 thread: oversubscribed cores make torch's thread pool crawl
COLUMNS = ("geneval", "ocr", "deqa", "pickscore")

# The paper's main table (SD3.5-M): GenEval, OCR, DeQA (1-5), PickScore (logit), and its Average column.
PAPER = {
    "base": (0.63, 0.59, 4.07, 21.64, 0.72),
    "GRPO-GenEval": (0.94, 0.65, 4.01, 21.53, 0.81),
    "GRPO-OCR": (0.64, 0.92, 4.06, 21.69, 0.80),
    "GRPO-DeQA": (0.64, 0.66, 4.23, 23.02, 0.76),
    "GRPO-PickScore": (0.51, 0.69, 4.22, 23.19, 0.73),
    "GRPO-Mix": (0.73, 0.83, 4.33, 21.84, 0.82),
    "OPD, SFT init": (0.91, 0.92, 4.29, 21.83, 0.88),
    "OPD, Merge init": (0.92, 0.94, 4.35, 23.08, 0.90),
}


def test_paper_average_reproduces_the_papers_column():
    # mean(GenEval, OCR, DeQA / 5, PickScore / 26), rounded to the paper's 2 decimals, for all eight rows
    for model, (geneval, ocr, deqa, pickscore, average) in PAPER.items():
        assert round(rewards.paper_average(geneval, ocr, deqa, pickscore), 2) == pytest.approx(average, abs=1e-9), model


def read(out, table="main"):
    with open(os.path.join(out, f"{table}.json")) as f:
        return json.load(f)["rows"]


def assert_same_base(*outs):
    """Two runs compare only on the same base weights: say so plainly when the tiny base was rebuilt
    between them (tiny_world.py pretrain rewrites assets/tiny_base.safetensors every 2 minutes)."""
    bases = {json.load(open(os.path.join(out, "main.json")))["settings"]["base"] for out in outs}
    assert len(bases) == 1, "assets/tiny_base.safetensors changed between the runs (being rebuilt?): rerun the tests"


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A LoRA whose B matrices are small seeded noise: a checkpoint that differs from the base."""
    path = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    world = worlds.load_world("tiny", "cpu")
    worlds.add_lora(world.transformer, "x", rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in worlds.lora_parameters(world.transformer, "x").items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    worlds.save_lora(world.transformer, "x", str(path))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, adapter_file):
    out = tmp_path_factory.mktemp("eval") / "one"
    log = run_script("evaluate.py", *FAST, "--models", f"base,lora={adapter_file}", "--out", out)
    return out, log


@needs_tiny
def test_main_table_schema_and_outputs(one_process):
    out, log = one_process
    rows = read(out)
    assert [r["model"] for r in rows] == ["base", "lora"]
    for row in rows:
        assert set(row) == {"model", "adapter_sha256", *COLUMNS, "average", *(f"{c}_se" for c in (*COLUMNS, "average"))}
        assert all(0 <= row[c] <= 1 for c in (*COLUMNS, "average")), row
        assert row["average"] == pytest.approx(sum(row[c] for c in COLUMNS) / 4)  # tiny world: the plain mean
    for name in ("main.md", "ood.json", "quality.json", "main.png", "grid_base.png", "grid_lora.png", "grid_compare.png"):
        assert os.path.isfile(out / name), name
    ood = read(out, "ood")[0]
    assert {"colour", "shape", "spatial", "numeracy", "overall"} <= set(ood)
    # --limit 3 spreads the prompts over the file (grouped by category): 3 categories scored, not 1
    scored = [c for c in ("colour", "shape", "spatial", "numeracy") if isinstance(ood[c], float) and ood[c] == ood[c]]
    assert len(scored) == 3, ood
    quality = read(out, "quality")
    assert [list(r)[1:] for r in quality] == [["deqa", "deqa_se", "pickscore", "pickscore_se", "objects", "objects_se",
                                               "diversity", "diversity_se"]] * 2
    assert all(0 <= r["objects"] <= 1 for r in quality) and "| model | deqa | pickscore | objects | diversity |" in open(out / "quality.md").read()
    assert "| base |" in log and "30 images per model" in log  # the printed table; 3 prompts x 5 sets x 2 images


@needs_tiny
def test_every_cell_has_its_standard_error_and_differences_are_paired(one_process):
    """The means and SEs of main.json and paired.json, recomputed here from the per-image score cache: a
    prompt's images averaged first, SE = sd / sqrt(prompts), the Average's SE from the four columns'
    (independent prompt sets), and lora - base as the mean and SE of per-prompt differences."""
    out, _ = one_process
    main = {r["model"]: r for r in read(out)}
    paired = read(out, "paired")
    assert [(r["model"], r["minus"]) for r in paired] == [("lora", "base")]  # grpo-mix is not among --models: skipped

    def per_prompt(label, task, column=None):
        (path,) = glob.glob(str(out / "eval_cache" / f"{label}-{task}-*.json"))
        prompts = json.load(open(path))["prompts"]
        return np.array([np.mean(prompts[str(i)][column or task]) for i in range(3)])  # --limit 3

    for label in ("base", "lora"):
        for t in COLUMNS:
            x = per_prompt(label, t)
            assert main[label][t] == pytest.approx(x.mean()) and main[label][f"{t}_se"] == pytest.approx(x.std(ddof=1) / math.sqrt(3))
        assert main[label]["average_se"] == pytest.approx(math.sqrt(sum(main[label][f"{t}_se"] ** 2 for t in COLUMNS)) / 4)
    for t in COLUMNS:
        d = per_prompt("lora", t) - per_prompt("base", t)
        assert paired[0][t] == pytest.approx(d.mean()) and paired[0][f"{t}_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
        assert paired[0][t] == pytest.approx(main["lora"][t] - main["base"][t])
    assert paired[0]["average"] == pytest.approx(main["lora"]["average"] - main["base"]["average"])
    ood, quality = read(out, "ood")[0], read(out, "quality")
    assert "overall_se" in ood and {"deqa_se", "pickscore_se", "objects_se", "diversity_se"} <= set(quality[0])
    for row in quality:  # objects: each quality prompt's mean over its images, pooled over the two prompt sets
        x = np.concatenate([per_prompt(row["model"], s, "objects") for s in ("deqa", "pickscore")])
        assert row["objects"] == pytest.approx(x.mean()) and row["objects_se"] == pytest.approx(x.std(ddof=1) / math.sqrt(6))
    assert " +- " in open(out / "main.md").read() and " +- " in open(out / "paired.md").read()


@needs_tiny
def test_evaluation_is_deterministic(one_process, adapter_file, tmp_path):
    out, _ = one_process
    run_script("evaluate.py", *FAST, "--models", f"base,lora={adapter_file}", "--out", tmp_path)
    assert_same_base(out, tmp_path)
    for table in ("main", "ood", "quality"):
        assert read(out, table) == read(tmp_path, table), table


@needs_tiny
def test_two_processes_equal_one(one_process, adapter_file, tmp_path):
    out, _ = one_process
    torchrun_script(2, "evaluate.py", *FAST, "--models", f"base,lora={adapter_file}", "--out", tmp_path)
    assert_same_base(out, tmp_path)
    for table in ("main", "ood", "quality"):
        for a, b in zip(read(out, table), read(tmp_path, table), strict=True):
            assert a.keys() == b.keys()
            assert [a[k] for k in a if k != "model"] == pytest.approx([b[k] for k in b if k != "model"], abs=1e-6), table


@needs_tiny
def test_resume_from_a_partial_cache_and_a_full_cache_samples_nothing(one_process, adapter_file, tmp_path):
    out, _ = one_process
    cache = tmp_path / "cache"
    shutil.copytree(out / "eval_cache", cache)
    files = sorted(os.listdir(cache))
    # an interrupted evaluation: one set never written, another with only its first prompt
    os.remove(cache / next(f for f in files if f.startswith("lora-geneval-")))
    partial = cache / next(f for f in files if f.startswith("base-ocr-"))
    state = json.load(open(partial))
    state["prompts"] = {"0": state["prompts"]["0"]}
    runs.write_json(partial, state)
    args = [*FAST, "--models", f"base,lora={adapter_file}", "--out", tmp_path / "tables", "--cache", cache]
    log = run_script("evaluate.py", *args)
    assert_same_base(out, tmp_path / "tables")
    assert "base: 2 of 15 prompts to sample" in log and "lora: 3 of 15 prompts to sample" in log
    for table in ("main", "ood", "quality"):
        assert read(out, table) == read(tmp_path / "tables", table), table
    stamps = {f: os.path.getmtime(cache / f) for f in os.listdir(cache)}
    log = run_script("evaluate.py", *args)
    assert "base: 0 of 15 prompts to sample" in log and "lora: 0 of 15 prompts to sample" in log
    assert stamps == {f: os.path.getmtime(cache / f) for f in os.listdir(cache)}  # nothing sampled, nothing rewritten
    assert read(out) == read(tmp_path / "tables")


@needs_tiny
def test_a_changed_checkpoint_is_re_evaluated(one_process, adapter_file, tmp_path):
    out, _ = one_process
    changed = tmp_path / "adapter.safetensors"
    weights, config = worlds.read_lora(str(adapter_file))
    worlds.write_lora(str(changed), {k: 2 * v if "lora_B" in k else v for k, v in weights.items()}, config)
    shutil.copytree(out / "eval_cache", tmp_path / "cache")
    log = run_script("evaluate.py", *FAST, "--tables", "main", "--models", f"lora={changed}", "--out", tmp_path / "tables",
                     "--cache", tmp_path / "cache")
    assert "lora: 12 of 12 prompts to sample" in log  # same label, new weights: nothing reused


@needs_tiny
def test_gain_table_is_each_models_share_of_the_teachers_gain(one_process, adapter_file, tmp_path):
    """--gain-of: (model - base) / (teacher - base) per task from the main table, '-' (None) where the
    teacher does not beat the base. The teacher is the shipped OCR expert (on these 3 prompts it beats the
    base on OCR and not everywhere, so both branches are taken), the student the noisy LoRA; bad --gain-of
    values stop with one error line and write nothing."""
    out, _ = one_process
    half = os.path.join(ROOT, "assets", "tiny_experts", "ocr.safetensors")
    shutil.copytree(out / "eval_cache", tmp_path / "cache")
    gain_of = ",".join(f"{t}=half" for t in COLUMNS)
    run_script("evaluate.py", *FAST, "--tables", "main", "--models", f"base,lora={adapter_file},half={half}",
               "--gain-of", gain_of, "--out", tmp_path / "tables", "--cache", tmp_path / "cache")
    main = {r["model"]: r for r in read(tmp_path / "tables")}
    gain = {r["model"]: r for r in read(tmp_path / "tables", "gain")}
    assert set(gain) == {"lora", "half"}
    assert main["half"]["ocr"] > main["base"]["ocr"], main  # at least one share is defined ...
    assert not all(main["half"][t] > main["base"][t] for t in COLUMNS), main  # ... and one is not
    for t in COLUMNS:
        g = main["half"][t] - main["base"][t]
        if g > 0:
            assert gain["half"][t] == pytest.approx(1.0)
            assert gain["lora"][t] == pytest.approx((main["lora"][t] - main["base"][t]) / g)
        else:
            assert gain["half"][t] is None and gain["lora"][t] is None
    for bad, says in ((["--gain-of", "nosuchtask=lora"], "--gain-of part"), (["--gain-of", "ocr=nosuchmodel"], "--gain-of part"),
                      (["--gain-of", "ocr=lora", "--models", f"lora={adapter_file}"], "put 'base' in --models")):
        assert_one_error_line(says, "evaluate.py", *FAST, "--models", f"base,lora={adapter_file}", *bad, "--out", tmp_path / "bad")
        assert not os.path.exists(tmp_path / "bad")


@needs_tiny
def test_a_prompt_written_four_times_is_one_prompt(adapter_file, tmp_path):
    """Flow-GRPO's GenEval test file writes each of its 553 prompts 4 times, shuffled. Such a file gives the
    main and paired tables of the file written once (its lines in order of first appearance), to the last
    digit: K images per distinct prompt, and every mean and SE over the distinct prompts (SE = sd / sqrt(prompts),
    not sd / sqrt(lines)). One text with two metadata dicts is two prompts. GenEval as .jsonl, PickScore as .txt
    (a continuous reward: SEs that are not 0)."""
    rng = np.random.default_rng(0)
    for task, ext in (("geneval", "jsonl"), ("pickscore", "txt")):
        texts = open(os.path.join(ROOT, "prompts", "tiny", f"{task}_test.txt")).read().splitlines()[:3]
        lines = texts
        if ext == "jsonl":
            lines = [json.dumps({"prompt": texts[0], "tag": t}) for t in ("a", "b")] + [json.dumps({"prompt": t}) for t in texts[1:]]
        four = [lines[j % len(lines)] for j in rng.permutation(4 * len(lines))]
        for name, written in (("once", list(dict.fromkeys(four))), ("four", four)):
            os.makedirs(tmp_path / name / "tiny", exist_ok=True)
            (tmp_path / name / "tiny" / f"{task}_test.{ext}").write_text("".join(line + "\n" for line in written))
    args = [*FAST, "--limit", "0", "--tables", "main", "--tasks", "geneval,pickscore", "--models", f"base,lora={adapter_file}"]
    logs = {name: run_script("evaluate.py", *args, "--out", tmp_path / f"out_{name}", env={"FLOWOPD_PROMPTS": str(tmp_path / name)})
            for name in ("once", "four")}
    assert_same_base(tmp_path / "out_once", tmp_path / "out_four")
    for table in ("main", "paired"):
        assert read(tmp_path / "out_four", table) == read(tmp_path / "out_once", table), table
    assert "geneval        4 prompts x 2" in logs["four"] and "pickscore      3 prompts x 2" in logs["four"], logs["four"]
    assert "12 duplicate lines merged" in logs["four"] and "9 duplicate lines merged" in logs["four"]
    assert "duplicate lines merged" not in logs["once"]
    for task, n in (("geneval", 4), ("pickscore", 3)):
        (path,) = glob.glob(str(tmp_path / "out_four" / "eval_cache" / f"base-{task}-*.json"))
        cached = json.load(open(path))["prompts"]
        assert sorted(cached, key=int) == [str(i) for i in range(n)]  # one entry per distinct prompt
        x = np.array([np.mean(cached[str(i)][task]) for i in range(n)])
        base = read(tmp_path / "out_four")[0]
        assert base[task] == pytest.approx(x.mean()) and base[f"{task}_se"] == pytest.approx(x.std(ddof=1) / math.sqrt(n))
    assert read(tmp_path / "out_four")[0]["pickscore_se"] > 0


def run_ranks(rank_args, timeout):
    """evaluate.py as torchrun starts it (gloo on the CPU), but with each rank's own arguments: one process
    per entry of rank_args. All are killed if one is still running at the timeout (ranks waiting on each
    other), and the test fails saying so. Returns rank 0's output."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(len(rank_args)), OMP_NUM_THREADS="1")
    logs = [tempfile.TemporaryFile("w+") for _ in rank_args]
    procs = [subprocess.Popen([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=log, stderr=subprocess.STDOUT, text=True) for r, (args, log) in enumerate(zip(rank_args, logs))]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    hung = [r for r, proc in enumerate(procs) if proc.poll() is None]
    for r in hung:
        procs[r].kill()
        procs[r].wait()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read())
        log.close()
    assert not hung, f"ranks {hung} still running after {timeout} s (a hang):\n" + "\n".join(t[-2000:] for t in text)
    assert all(proc.returncode == 0 for proc in procs), "\n".join(t[-2000:] for t in text)
    return text[0]


@needs_tiny
def test_ranks_with_different_caches_agree_on_the_work(one_process, adapter_file, tmp_path):
    """A node-local --cache: each rank reads its own folder. Rank 0's holds everything but lora's geneval
    scores, rank 1's is empty; if each rank listed its own missing prompts they would make different
    numbers of collective calls (a hang, or mixed-up scores). The job finishes with the one-process tables,
    sampling what rank 0's cache lacks."""
    out, _ = one_process
    shutil.copytree(out / "eval_cache", tmp_path / "cache0", ignore=shutil.ignore_patterns("lora-geneval-*"))
    args = [*FAST, "--models", f"base,lora={adapter_file}", "--out", tmp_path / "tables"]
    log = run_ranks([[*args, "--cache", tmp_path / f"cache{r}"] for r in range(2)], timeout=180)
    assert "base: 0 of 15 prompts to sample" in log and "lora: 3 of 15 prompts to sample" in log
    assert not os.path.exists(tmp_path / "cache1")  # rank 1 neither reads nor writes a cache
    assert_same_base(out, tmp_path / "tables")
    for table in ("main", "ood", "quality"):
        for a, b in zip(read(out, table), read(tmp_path / "tables", table), strict=True):
            assert a.keys() == b.keys()
            assert [a[k] for k in a if k != "model"] == pytest.approx([b[k] for k in b if k != "model"], abs=1e-6), table


def test_tables_are_pure_functions_of_per_prompt_scores():
    """evaluate.py's tables from per-prompt scores, on numbers worked by hand: the main table's mean +- SE per
    task and its Average, the paired differences (only prompts both models hold), each teacher's share of its
    gain, the OOD table's mean of category means, and the quality table."""
    main_rows, paired_rows, gain_rows, ood_rows, quality_rows = script_functions(
        "evaluate.py", "main_rows", "paired_rows", "gain_rows", "ood_rows", "quality_rows", "main_row", "mean_se",
        "task_mean_se", "combined_se")[:5]
    tasks = ["geneval", "ocr", "deqa", "pickscore"]
    scores = {"base": [0.2, 0.4], "expert": [0.6, 1.0]}  # two prompts a task, the same for every task
    per_prompt = {(m, t): dict(enumerate(v)) for m, v in scores.items() for t in tasks}
    rows = main_rows(per_prompt, ["base", "expert"], tasks, sd3=False)
    assert rows[0]["geneval"] == pytest.approx(0.3) and rows[0]["geneval_se"] == pytest.approx(0.1)  # std 0.1414 / sqrt 2
    assert rows[1]["average"] == pytest.approx(0.8) and rows[1]["average_se"] == pytest.approx(math.sqrt(4 * (0.2 / 4) ** 2))
    assert main_rows(per_prompt, ["base"], ["ocr"], sd3=False)[0]["average"] is None  # not every task: no Average
    tagged = {("m", "geneval"): {0: 0.0, 1: 1.0, 2: 1.0}}  # GenEval by category (sd3 tags): (0.5 + 1) / 2, not 2 / 3
    (row,) = main_rows(tagged, ["m"], ["geneval"], sd3=True, tags=["a", "a", "b"])
    assert row["geneval"] == pytest.approx(0.75) and row["geneval_se"] is None  # category b has one prompt: no SE
    per_prompt["expert", "ocr"] = {1: 1.0}  # prompt 0 missing: paired on prompt 1 only
    paired = paired_rows(per_prompt, ["base", "expert"], ["base", "grpo-mix"], tasks, sd3=False)
    assert [(r["model"], r["minus"]) for r in paired] == [("expert", "base")]  # a reference not evaluated is skipped
    assert paired[0]["geneval"] == pytest.approx(0.5) and paired[0]["ocr"] == pytest.approx(0.6) and paired[0]["ocr_se"] is None
    per_prompt["expert", "ocr"] = {0: 0.6, 1: 1.0}
    main = main_rows(per_prompt, ["base", "expert"], tasks, sd3=False)
    gains, teacher_gain = gain_rows(main, per_prompt, ["base", "expert"], {"ocr": "expert"})
    assert teacher_gain == {"ocr": pytest.approx(0.5)} and gains == [{"model": "expert", "ocr": pytest.approx(1.0), "ocr_se": 0.0}]
    ood = {("m", c): {0: float(k)} for k, c in enumerate(("colour", "shape", "spatial", "numeracy"))}
    (row,) = ood_rows(ood, ["m"])
    assert row["overall"] == pytest.approx(1.5) and row["overall_se"] is None  # one prompt a category: no SE
    (row,) = quality_rows({("m", "deqa"): [0.5, 0.7]}, ["m"], ["deqa"])
    assert row["deqa"] == pytest.approx(0.6) and row["deqa_se"] == pytest.approx(0.1)
