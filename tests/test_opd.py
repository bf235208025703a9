"""Flow-OPD (opd.py and the maths it takes from sde.py): the three losses' values and gradients against
closed forms, routing that never calls a teacher on another task's prompts, teachers sharing one
base, and the real script on the tiny world: zero loss when the student is the teacher, MAR weight 0
changes nothing, 2 processes == 1 process."""

import json
import os

import pytest
import torch

import sde
import worlds
from helpers import assert_one_error_line, assert_same_adam_training, read_adapter, read_log, run_script, torchrun_script

HAVE_BASE = os.path.exists(os.path.join(os.path.dirname(sde.__file__), "assets", "tiny_base.safetensors"))
needs_base = pytest.mark.skipif(not HAVE_BASE, reason="the tiny world's base weights are not built yet")
FAST = ["--prompts-per-epoch", "2", "--group-size", "2", "--steps", "3", "--sample-batch", "4", "--train-batch", "4",
        "--grid-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--no-score", "--ema-decay", "0", "--ema-every", "1"]


def test_direct_gradient_is_the_analytic_one_on_a_linear_model():
    # v_theta(x) = W x on a (B, D) "latent": KL = w mean_d (W x - v_T)^2, so dKL/dW = (2 w / D) (W x - v_T) x^T
    torch.manual_seed(0)
    D = 6
    W = torch.randn(D, D, requires_grad=True)
    x, v_T = torch.randn(1, D), torch.randn(1, D)
    loss = sde.velocity_kl(x @ W.T, v_T, 0.7, 0.5, 0.7)  # opd.py's direct loss is the step KL itself
    loss.sum().backward()
    w = sde.kl_weight(0.7, 0.5, 0.7)
    torch.testing.assert_close(W.grad, (2 * w / D) * (x @ W.T - v_T).T @ x)


def test_zero_loss_and_gradient_when_student_is_teacher():
    v = torch.randn(3, 4, 4, 4, requires_grad=True)
    x_t, x_next = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    kl = sde.velocity_kl(v, v.detach().clone(), 0.6, 0.4, 0.7)
    for loss in (kl, sde.opd_pg_loss("pg", v, v.detach().clone(), x_t, x_next, torch.zeros(3), 0.6, 0.4, 0.7, 1e-4, 5.0)):
        v.grad = None
        loss.sum().backward()
        assert torch.all(kl == 0) and torch.all(loss == 0)
        assert torch.all(v.grad == 0)


def _policy_gradients(n=20000, D=16, seed=0):
    """Mean gradient of each loss w.r.t. a state-independent velocity theta, over n on-policy actions."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(1, D, generator=g, requires_grad=True)
    v_T = torch.randn(1, D, generator=g)
    x = torch.randn(n, D, generator=g)
    sigma, sigma_next, a = 0.7, 0.5, 0.7
    with torch.no_grad():
        action, old_log_prob, _, _ = sde.sde_step_with_logprob(theta.expand(n, D), sigma, sigma_next, x, a, generator=g)
        _, teacher_log_prob, _, _ = sde.sde_step_with_logprob(v_T.expand(n, D), sigma, sigma_next, x, a, prev_sample=action)
    grads = {}
    for kind in ("direct", "pg", "pg-sample"):
        theta.grad = None
        v = theta.expand(n, D)
        if kind == "direct":
            loss = sde.velocity_kl(v, v_T.expand(n, D), sigma, sigma_next, a)
        else:  # pg-sample's reward: -(old_log_prob - teacher_log_prob) of the sampled action
            loss = sde.opd_pg_loss(kind, v, v_T.expand(n, D), x, action, old_log_prob, sigma, sigma_next, a, 1e-4, 1e9)
        loss.mean().backward()
        grads[kind] = theta.grad.clone().reshape(-1)
    return grads


def test_pg_gradient_averages_to_zero_but_direct_and_pg_sample_do_not():
    D = 16
    grads = _policy_gradients(D=D)
    direct, pg, pg_sample = grads["direct"], grads["pg"], grads["pg-sample"]
    # pg-sample: the sampled log-ratio is a score-function estimator of grad KL: it points where direct
    # points, and with per-dimension-MEAN log-probs (Flow-GRPO's convention) it is grad KL / D
    assert torch.nn.functional.cosine_similarity(direct, pg_sample, dim=0) > 0.95
    assert pg_sample.norm() * D / direct.norm() == pytest.approx(1.0, rel=0.1)
    # pg: the advantage depends on x_t only and E[grad log pi(a | x_t)] = 0: what is left is Monte-Carlo
    # noise (it shrinks as 1/sqrt(n); measured 0.03-0.06 of pg-sample's norm at n = 20000)
    assert pg.norm() < 0.15 * pg_sample.norm()


def test_routing_calls_each_teacher_only_on_its_own_prompts():
    tasks = ["ocr", "geneval", "ocr", "pickscore"]
    calls = {}

    def velocity_of(teacher, rows):  # a teacher that returns NaN for any prompt of another task
        calls[teacher] = rows
        return torch.stack([torch.full((2,), float(i)) if tasks[i] == teacher else torch.full((2,), float("nan")) for i in rows])

    hard = {t: {t: 1.0} for t in set(tasks)}
    target = sde.route_targets(tasks, hard, velocity_of)
    assert torch.isfinite(target).all() and target[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert calls == {"ocr": [0, 2], "geneval": [1], "pickscore": [3]}
    # soft routing: alpha-weighted blend of the listed teachers
    soft = dict(hard, ocr={"ocr": 0.75, "pickscore": 0.25})
    target = sde.route_targets(tasks, soft, lambda teacher, rows: torch.full((len(rows), 2), {"ocr": 4.0, "pickscore": 8.0, "geneval": 1.0}[teacher]))
    assert target[:, 0].tolist() == [5.0, 1.0, 5.0, 8.0]


@needs_base
def test_teachers_share_one_base(tmp_path):
    world = worlds.load_world("tiny")
    t = world.transformer
    base = sum(p.numel() for p in t.parameters())
    files = make_teachers(world, tmp_path, ("geneval", "ocr", "deqa", "pickscore"))
    world = worlds.load_world("tiny")
    t = world.transformer
    per_adapter = sum(p.numel() for p in worlds.load_lora(t, files["geneval"], "teacher_geneval").values())
    for task in ("ocr", "deqa", "pickscore"):
        worlds.load_lora(t, files[task], f"teacher_{task}")
    worlds.add_lora(t, "student", 4, 8)
    storage = {p.untyped_storage().data_ptr(): p.numel() for p in t.parameters()}
    assert sum(storage.values()) == base + 5 * per_adapter  # one base, five small adapters: no copies


def make_teachers(world, folder, tasks, scale=0.05):
    files = {}
    for i, task in enumerate(tasks):
        params = worlds.add_lora(world.transformer, f"make_{task}", 4, 8)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i * 1000 + p.numel())) * scale)
        files[task] = str(folder / f"{task}.safetensors")
        worlds.save_lora(world.transformer, f"make_{task}", files[task])
    return files


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    if not HAVE_BASE:
        pytest.skip("the tiny world's base weights are not built yet")
    folder = tmp_path_factory.mktemp("teachers")
    files = make_teachers(worlds.load_world("tiny"), folder, ("geneval", "ocr"))
    return files, ",".join(f"{t}={f}" for t, f in files.items())


@needs_base
def test_student_equal_to_teacher_has_zero_loss(tmp_path, teachers):
    files, spec = teachers
    run_script("opd.py", "--task", "geneval:1,ocr:1", "--teachers", spec, "--student", files["ocr"], "--mar-weight", "0",
               "--epochs", "1", "--updates-per-epoch", "1", "--out", tmp_path, *FAST)  # every KL measured before the update
    (record,) = read_log(tmp_path)
    # ocr prompts go to the ocr teacher, which IS the student: zero up to batch-size-dependent float
    # rounding; geneval prompts go to another teacher: a real distance, many orders larger
    assert record["kl_ocr"] < 1e-6 * record["kl_geneval"] and record["kl_geneval"] > 0


@needs_base
def test_teacher_named_base_is_the_frozen_base(tmp_path, teachers):
    """--teachers geneval=base: a fresh student (LoRA B = 0) IS the base, so geneval prompts have zero KL
    to their teacher while ocr prompts, routed to a random LoRA teacher, do not."""
    files, _ = teachers
    run_script("opd.py", "--task", "geneval:1,ocr:1", "--teachers", f"geneval=base,ocr={files['ocr']}", "--mar-weight", "0",
               "--epochs", "1", "--updates-per-epoch", "1", "--out", tmp_path, *FAST)
    (record,) = read_log(tmp_path)
    assert record["kl_geneval"] < 1e-6 * record["kl_ocr"] and record["kl_ocr"] > 0


@needs_base
def test_mar_weight_zero_changes_nothing(tmp_path, teachers):
    files, spec = teachers
    args = ["--task", "geneval:1,ocr:1", "--teachers", spec, "--epochs", "1", *FAST]
    run_script("opd.py", "--mar-weight", "0", "--mar-teacher", "base", "--out", tmp_path / "a", *args)
    run_script("opd.py", "--mar-weight", "0", "--mar-teacher", files["ocr"], "--out", tmp_path / "b", *args)
    run_script("opd.py", "--mar-weight", "0.5", "--mar-teacher", files["ocr"], "--out", tmp_path / "c", *args)
    a, b, c = (read_adapter(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # no anchor weight: the anchor is irrelevant
    assert not all(torch.equal(a[k], c[k]) for k in a)  # and with a weight it pulls


@needs_base
def test_two_processes_equal_one(tmp_path, teachers):
    _, spec = teachers
    args = ["--task", "geneval:1,ocr:1", "--teachers", spec, "--epochs", "2", "--mar-weight", "0.04", *FAST]
    run_script("opd.py", "--out", tmp_path / "one", *args)
    torchrun_script(2, "opd.py", "--out", tmp_path / "two", *args)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["kl"] for r in one] == pytest.approx([r["kl"] for r in two], rel=1e-4)
    a, b = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    assert_same_adam_training(a, b, lr=1e-4, opt_steps=one[-1]["opt_step"])  # the default lr


@needs_base
def test_forwards_per_image_count_every_distilled_step(tmp_path, teachers):
    """The log's forwards_* count the transformer rows per image of each phase: the teacher and anchor calls
    and the training calls scale with the distilled steps S (1 of T = 3 at --timestep-fraction 0.5, 2 at the
    default), the sampling's with T."""
    _, spec = teachers
    args = ["--task", "geneval:1,ocr:1", "--teachers", spec, "--epochs", "1", "--mar-weight", "0.5", *FAST]  # S = floor(3 x 0.99) = 2
    run_script("opd.py", "--out", tmp_path / "all", *args)
    run_script("opd.py", "--timestep-fraction", "0.5", "--out", tmp_path / "s1", *args)
    (full,), (s1,) = (read_log(tmp_path / x) for x in ("all", "s1"))
    assert full["forwards_sampling"] == s1["forwards_sampling"] == 2 * 3  # CFG x T
    assert full["forwards_frozen"] == 2 * 2 * 2 and s1["forwards_frozen"] == 2 * 2 * 1  # (teacher + anchor) x CFG x steps
    assert full["forwards_training"] == 2 * 2 and s1["forwards_training"] == 2 * 1
    c = read_adapter(tmp_path / "s1")
    assert any(c[k].abs().max() > 0 for k in c if "lora_B" in k)  # the student learns
    # bench/gain_per_call.py reads those counts and scores the runs, paired: a run that IS the teacher keeps
    # exactly all of its gain (on PickScore, a graded reward: deqa's gain on 2 images was exactly 0 on the v4 base), and
    # S = 1 spent (6 + 4 + 2 x 2) / (6 + 8 + 2 x 4) of the calls
    run_script("bench/gain_per_call.py", "--task", "pickscore", "--teacher", tmp_path / "all" / "adapter.safetensors", "--prompts", "2",
               "--images", "1", "--threads", "1", "--runs", f"all={tmp_path / 'all'},s1={tmp_path / 's1'}", "--out", tmp_path / "gain.json")
    rows = {r["run"]: r for r in json.load(open(tmp_path / "gain.json"))["runs"]}
    assert rows["all"]["share"] == pytest.approx(1.0, abs=1e-9) and rows["all"]["share_se"] == pytest.approx(0.0, abs=1e-9)
    assert rows["s1"]["calls_relative"] == pytest.approx(14 / 22)


@needs_base
def test_anchor_routed_to_itself_is_not_called_twice(tmp_path, teachers):
    """--mar-teacher ocr: on ocr prompts the anchor IS their teacher, so its velocities are reused, not
    recomputed. The run trains as one whose anchor is the same weights loaded as a separate adapter
    (which is called on every sample), to float rounding, with 3/4 of its frozen calls."""
    files, spec = teachers
    args = ["--task", "geneval:1,ocr:1", "--teachers", spec, "--epochs", "1", "--mar-weight", "0.5", *FAST]
    run_script("opd.py", "--mar-teacher", "ocr", "--out", tmp_path / "reuse", *args)
    run_script("opd.py", "--mar-teacher", files["ocr"], "--out", tmp_path / "separate", *args)
    (reuse,), (separate,) = read_log(tmp_path / "reuse"), read_log(tmp_path / "separate")
    assert reuse["mar"] == pytest.approx(separate["mar"], rel=1e-5) and reuse["mar"] > 0
    assert separate["forwards_frozen"] == 8 and reuse["forwards_frozen"] == 6  # the 2 ocr samples of 4 skip the anchor
    assert_same_adam_training(read_adapter(tmp_path / "reuse"), read_adapter(tmp_path / "separate"), lr=1e-4, opt_steps=reuse["opt_step"])


def test_official_weighting_scales_each_step_kl_by_dt():
    """--kl-dt-factor: the official OPD's step KL is |dt| w(t) ||v_s - v_T||^2 (its std has no sqrt|dt|)."""
    v, t, x_t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    # on-policy (x_next's log-prob now is its log-prob at sampling): the ratio is 1 and pg's loss is the KL it uses
    x_next, old_log_prob, _, _ = sde.sde_step_with_logprob(v, 0.8, 0.6, x_t, 0.7, generator=torch.Generator().manual_seed(0))
    exact = sde.opd_pg_loss("pg", v, t, x_t, x_next, old_log_prob, 0.8, 0.6, 0.7, 1e-4, 5.0)
    official = sde.opd_pg_loss("pg", v, t, x_t, x_next, old_log_prob, 0.8, 0.6, 0.7, 1e-4, 5.0, kl_scale=0.2)
    torch.testing.assert_close(exact, sde.velocity_kl(v, t, 0.8, 0.6, 0.7))
    torch.testing.assert_close(official, 0.2 * exact)


@needs_base
def test_kl_dt_factor_and_skip_zero_advantage_in_the_script(tmp_path, teachers):
    _, spec = teachers
    args = ["--task", "geneval:1,ocr:1", "--teachers", spec, "--epochs", "1", "--updates-per-epoch", "1", *FAST]
    run_script("opd.py", "--out", tmp_path / "exact", *args)
    run_script("opd.py", "--kl-dt-factor", "--out", tmp_path / "dt", *args)
    (exact,), (dt,) = read_log(tmp_path / "exact"), read_log(tmp_path / "dt")
    assert 0 < dt["kl"] < 0.5 * exact["kl"]  # every |dt| < 0.5 at T = 3: each step's KL shrinks by its |dt|
    assert_one_error_line("needs the task rewards", "opd.py", "--skip-zero-advantage", "--out", tmp_path / "x", *args)
    fast = [a for a in args if a != "--no-score"]
    run_script("opd.py", "--skip-zero-advantage", "--out", tmp_path / "skip", *fast)
    (skip,) = read_log(tmp_path / "skip")
    assert 0 <= skip["trained"] <= 1 and exact["trained"] == 1  # the share of samples distilled


@needs_base
def test_a_full_weight_teacher_loads_beside_lora_teachers(tmp_path, teachers):
    """A full-weight teacher (a transformer state dict) is copied from the bare base before any adapter is attached:
    copied after the geneval LoRA (sorted-name order), it carried peft's layers and its strict load failed."""
    import runs

    files, _ = teachers
    world = worlds.load_world("tiny")
    state = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in world.transformer.state_dict().items()}
    runs.save_tensors(str(tmp_path / "full.safetensors"), state)
    run_script("opd.py", "--task", "geneval:1,ocr:1", "--teachers", f"geneval={files['geneval']},ocr={tmp_path / 'full.safetensors'}",
               "--epochs", "1", "--out", tmp_path / "run", *FAST)
    (record,) = read_log(tmp_path / "run")
    assert record["kl_ocr"] > 0 and record["kl_geneval"] > 0

