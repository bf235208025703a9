"""bench/gpu.sh, the GPU check (issue 26), on a CPU: DRY_RUN_CPU=1 runs the same steps as on the device at tiny width,
from a Python WITHOUT diffusers, as the device's image is: diffusers installs offline from a wheel into a temporary
site folder (the wheel is made here from the installed package: no network, no --prepare), then the stage scripts
themselves (grpo_expert.py, opd.py) run one epoch each on a random SD3 pipeline, and the report reads their log.jsonl.
Plus the pieces the dry run cannot show: the wheel's RECORD, a missing wheel's error, the report's arithmetic."""

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from helpers import ROOT, read_log

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402
import install_wheels  # noqa: E402


def python_without(tmp_path, hidden=("diffusers",)):
    """A venv whose site-packages links every entry of this Python's site-packages but the `hidden` distributions:
    torch, transformers, peft, pip, ... import as here; diffusers does not (as on the device)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    for name in os.listdir(ours):
        if any(name == h or name.startswith(h + "-") for h in hidden):
            continue
        os.symlink(os.path.join(ours, name), os.path.join(site, name))
    return str(python)


def test_wheel_of_the_installed_package_has_a_true_record(tmp_path):
    path = install_wheels.wheel_from_installed("diffusers", tmp_path)
    import diffusers

    assert os.path.basename(path) == f"diffusers-{diffusers.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(z.read(record_name).decode())))
        assert {r[0] for r in rows} == names and "diffusers/__init__.py" in names
        assert not any("__pycache__" in n or n.startswith("..") for n in names)
        for name, digest, size in rows[:50] + [r for r in rows if r[0].endswith(("WHEEL", "METADATA"))]:
            if name != record_name:
                data = z.read(name)
                assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert int(size) == len(data)


def test_missing_wheel_is_one_error_naming_prepare(tmp_path):
    python = python_without(tmp_path)
    (tmp_path / "empty").mkdir()
    r = subprocess.run([python, "bench/install_wheels.py", "install", "--wheels", str(tmp_path / "empty"), "--site", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "diffusers" in errors[0] and "--prepare" in errors[0], r.stderr


def test_dry_run_installs_diffusers_offline_and_runs_the_stage_scripts(tmp_path):
    wheels, out, work = tmp_path / "wheels", tmp_path / "out", tmp_path / "work"
    install_wheels.wheel_from_installed("diffusers", wheels)
    python = python_without(tmp_path)
    assert subprocess.run([python, "-c", "import diffusers"], capture_output=True).returncode != 0
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=python, PIP_NO_INDEX="1", DRY_RUN_CPU="1", WHEELS=str(wheels), OUT=str(out), WORK=str(work))
    r = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    printed = r.stdout + r.stderr
    assert r.returncode == 0, printed[-4000:]
    assert f"install: diffusers from {wheels}" in printed
    assert f"diffusers {__import__('diffusers').__version__} ({work}/site)" in printed  # the wheel's, not this Python's
    assert "| torch " in printed and "| transformers " in printed and "| peft " in printed

    T, S = 3, 2  # the dry run's --steps 3: 2 trained steps (floor(3 * 0.99)); CFG doubles every row
    for stage in ("grpo", "opd"):
        last = read_log(out / "runs" / stage)[-1]
        assert {"sec_sampling", "sec_training"} <= set(last), (stage, sorted(last))
    report = json.loads((out / "gpu_check.json").read_text())
    grpo, opd = report["stages"]["grpo"], report["stages"]["opd"]
    for st in (grpo, opd):
        assert st["images_per_epoch"] == 2 and st["total_seconds"] > 0
        assert st["total_seconds_per_image"] == pytest.approx(sum(st["seconds_per_image"].values()))
    # the hooks count what the scripts ran: GRPO samples T steps, trains S (with grad) beside the KL reference (without)
    assert (grpo["forwards_per_image"], grpo["backwards_per_image"]) == (2 * T + 4 * S, 2 * S)
    assert grpo["counted_per_image"]["sampling"] == dict(forwards_per_image=2 * T, backwards_per_image=0)
    # OPD: its teacher + the MAR anchor at each distilled step; the hooks agree with opd.py's own forwards_* fields
    assert (opd["forwards_per_image"], opd["backwards_per_image"]) == (2 * T + 6 * S, 2 * S)
    assert sum(opd["logged_forwards_per_image"].values()) == opd["forwards_per_image"]
    assert report["opd_over_grpo_per_image"] == pytest.approx(opd["total_seconds_per_image"] / grpo["total_seconds_per_image"])
    assert report["build"]["transformer_config"]["dual_attention_layers"] == [0] and report["build"]["flops"]["forward_per_row"] > 0
    assert "\ngrpo: 2 images/epoch" in printed and "\nopd: 2 images/epoch" in printed and "bench/gpu.sh: exit 0" in printed


def test_report_arithmetic(tmp_path):
    """s/image and MFU of the last epoch from a made-up log and probe: 4 images; the last epoch's calls make 10 row-forwards
    of 1 TFLOP and 2 row-backwards of 1.5 TFLOP more, in its 4 logged seconds; the first epoch's calls do not count."""
    run = tmp_path / "runs" / "grpo"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dict(prompts_per_epoch=1, group_size=4)))
    (run / "log.jsonl").write_text(json.dumps(dict(epoch=1, sec_sampling=9.0, sec_training=9.0)) + "\n"
                                   + json.dumps(dict(epoch=2, sec_sampling=1.0, sec_training=3.0, peak_mem_gib=7.5)) + "\n")
    call = lambda epoch, phase, rows, grad, backward: dict(epoch=epoch, phase=phase, rows=rows, grad=grad, backward=backward)
    calls = [call(1, "sampling", 8, False, 0)] * 3 + [call(2, "sampling", 2, False, 0)] * 4 + [call(2, "training", 2, True, 1)]
    phases = dict(sampling=dict(seconds=1.0, peak_bytes=2**30), training=dict(seconds=3.0, peak_bytes=3 * 2**30))
    stats = tmp_path / "stats_grpo.json"
    stats.write_text(json.dumps(dict(phases=phases, calls=calls, timers=2, peak_bytes=3 * 2**30, peak_rss_bytes=2**30, setup_seconds=5.0,
                                     cuda=True, memory_at_first_phase_bytes=2**30, wall_seconds=20.0, device="GPU")))
    flops = dict(forward_per_row=1e12, forward_backward_per_row=2.5e12)
    st = gpu_check.stage_report(str(run), str(stats), flops, peak_tflops=100.0)
    assert st["seconds_per_image"] == dict(sampling=0.25, training=0.75) and st["total_seconds_per_image"] == 1.0
    assert st["first_epoch_seconds"] == 18.0 and st["logged_peak_memory"] == dict(peak_mem_gib=7.5)
    assert st["counted_per_image"] == dict(sampling=dict(forwards_per_image=2.0, backwards_per_image=0.0),
                                           training=dict(forwards_per_image=0.5, backwards_per_image=0.5))
    assert (st["forwards_per_image"], st["backwards_per_image"]) == (2.5, 0.5)
    assert st["model_tflops_per_s"] == pytest.approx(13 / 4) and st["mfu"] == pytest.approx(13 / 4 / 100)
    assert st["peak_memory_gib_by_phase"] == dict(sampling=1.0, training=3.0)
