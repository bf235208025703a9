"""merge.py: task arithmetic is the exact weighted sum of the experts' updates, lora-mean is the official
mean of factors (and not the mean of updates), truncation reports the Eckart-Young error, --rank R --alpha A
writes rank R at scale A / R with the same update, TIES matches a hand computation, the merged file loads
(worlds.load_lora, diffusers) and moves the model as its dW says, PEFT adapter folders merge as their
diffusers-format copies do into a clean config, and bad inputs stop with one error line before any file is written.

The script runs top to bottom, so it is run (in this process through runpy, once through a subprocess)
and checked through the files it writes."""

import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch

import runs
import sde
import test_peft_teachers as peft_teachers
import worlds
from conftest import ROOT, make_toy_world

MERGE = os.path.join(ROOT, "merge.py")


def merge(*args):
    """Run merge.py in this process with these command-line arguments; SystemExit passes through."""
    argv = sys.argv
    sys.argv = ["merge.py", *map(str, args)]
    try:
        runpy.run_path(MERGE, run_name="__main__")
    finally:
        sys.argv = argv


def card(out):
    with open(str(out)[: -len(".safetensors")] + ".json") as f:
        return json.load(f)


def expert(world, path, name, rank, alpha, seed, targets=worlds.LORA_TARGETS):
    """A random expert adapter on the toy transformer (B != 0, so it changes the model), saved to path."""
    params = worlds.add_lora(world.transformer, name, rank=rank, alpha=alpha, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    worlds.save_lora(world.transformer, name, str(path))
    return str(path)


def updates(path):
    """{module: dW = (alpha/r) B A} of a LoRA file, float64."""
    weights, config = worlds.read_lora(str(path))
    scale = config["lora_alpha"] / config["r"]
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    return {m: scale * weights[m + ".lora_B.weight"].double() @ weights[m + ".lora_A.weight"].double() for m in mods}


def assert_updates_close(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=tol * max(1.0, float(want[m].abs().max())), msg=m)


@pytest.fixture
def experts(toy_world, tmp_path):
    """Three experts with different ranks and alphas (scales 2, 1, 0.5)."""
    return [expert(toy_world, tmp_path / "geneval.safetensors", "g", 2, 4, 1),
            expert(toy_world, tmp_path / "ocr.safetensors", "o", 3, 3, 2),
            expert(toy_world, tmp_path / "pick.safetensors", "p", 2, 1, 3)]


def test_one_adapter_returns_it(experts, tmp_path):
    out = tmp_path / "one.safetensors"
    merge("--adapters", experts[1], "--weights", "1", "--out", out)
    assert_updates_close(updates(out), updates(experts[1]))
    assert card(out)["rank_out"] == 3


@pytest.mark.parametrize("method", ["task-arithmetic", "lora-mean", "ties"])
def test_identical_adapters_return_it(experts, tmp_path, method):
    # default weights (1/K for the means, 1 for TIES); TIES with density 1 keeps everything and all signs agree
    out = tmp_path / f"{method}.safetensors"
    merge("--adapters", ",".join([experts[0]] * 3), "--method", method, "--density", 1, "--out", out)
    assert_updates_close(updates(out), updates(experts[0]))


def test_task_arithmetic_is_the_exact_weighted_sum_of_updates(experts, tmp_path):
    out = tmp_path / "ta.safetensors"
    lams = [0.5, -1.0, 2.0]  # a negative lambda is task negation: allowed here
    merge("--adapters", ",".join(experts), "--weights", ",".join(map(str, lams)), "--out", out)
    dWs = [updates(p) for p in experts]
    want = {m: sum(l * d[m] for l, d in zip(lams, dWs)) for m in dWs[0]}
    assert_updates_close(updates(out), want)
    c = card(out)
    assert c["rank_out"] == 2 + 3 + 2 and c["reconstruction_error"]["overall"] < 1e-6
    assert [i["sha256"] for i in c["inputs"]] == [runs.content_sha256(p) for p in experts]


def test_lora_mean_is_the_mean_of_factors_not_of_updates(toy_world, tmp_path):
    a = expert(toy_world, tmp_path / "a.safetensors", "a", 2, 4, 1)
    b = expert(toy_world, tmp_path / "b.safetensors", "b", 2, 4, 2)
    out = tmp_path / "mean.safetensors"
    merge("--adapters", f"{a},{b}", "--method", "lora-mean", "--out", out)
    wa, wb, wo = (worlds.read_lora(str(p))[0] for p in (a, b, out))
    for k in wa:
        torch.testing.assert_close(wo[k], (wa[k] + wb[k]) / 2)  # A = mean A_k, B = mean B_k
    config = worlds.read_lora(str(out))[1]
    assert (config["r"], config["lora_alpha"]) == (2, 4)  # the experts' rank and scale are kept
    da, db, do = updates(a), updates(b), updates(out)
    gap = math.sqrt(sum(float((do[m] - (da[m] + db[m]) / 2).norm() ** 2) for m in da)
                    / sum(float(((da[m] + db[m]) / 2).norm() ** 2) for m in da))
    assert gap > 0.1  # mean(B) mean(A) != mean(B A)
    assert card(out)["lora_mean_vs_mean_of_updates"] == pytest.approx(gap, rel=1e-4)


def test_truncation_reports_the_eckart_young_error_decreasing_with_rank(experts, tmp_path):
    exact = {m: sum(d[m] for d in map(updates, experts)) / 3 for m in updates(experts[0])}
    errors = []
    for rank in (1, 2, 4, 7):
        out = tmp_path / f"r{rank}.safetensors"
        merge("--adapters", ",".join(experts), "--rank", rank, "--out", out)
        c, got = card(out), updates(out)
        assert c["rank_out"] == rank and worlds.read_lora(str(out))[1]["r"] == rank
        for m, dW in exact.items():
            S = torch.linalg.svdvals(dW)
            best = float(S[rank:].norm() / S.norm())  # the best rank-R error (Eckart-Young)
            measured = float((got[m] - dW).norm() / dW.norm())
            assert measured == pytest.approx(best, abs=1e-5)
            assert c["reconstruction_error"]["per_module"][m] == pytest.approx(best, abs=1e-5)
        errors.append(c["reconstruction_error"]["overall"])
    assert errors[0] > errors[1] > errors[2] > 0.01 and errors[3] < 1e-6  # 7 = 2 + 3 + 2: exact


def velocity(world):
    """The toy world's velocity on fixed latents and prompts."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e, pooled = world.encode_prompts(["red circle", "blue square"])
    return sde.predict_velocity(world, x, 0.5, e, pooled, 1.0)


def with_updates(dW):
    """A toy world whose weights are the base's plus dW ({module: (out, in)}), added by hand."""
    world = make_toy_world()
    state = world.transformer.state_dict()
    for m, d in dW.items():
        state[m + ".weight"] += d.float()
    world.transformer.load_state_dict(state)
    return world


def test_rank_and_alpha_set_the_output_scale_exactly(experts, tmp_path):
    # The exact merge (mean of three updates) is rank 7 = 2 + 3 + 2; modules are 16 x 16.
    exact = {m: sum(d[m] for d in map(updates, experts)) / 3 for m in updates(experts[0])}
    want = velocity(with_updates(exact))
    # Full rank at scale 2, and rank 20 > 16 (padded with zeros to the rank asked for) at scale 1/4: the same model.
    for rank, alpha in ((7, 14), (20, 5)):
        out = tmp_path / f"r{rank}a{alpha}.safetensors"
        merge("--adapters", ",".join(experts), "--rank", rank, "--alpha", alpha, "--out", out)
        weights, config = worlds.read_lora(str(out))
        assert (config["r"], config["lora_alpha"]) == (rank, alpha) and card(out)["lora_alpha_out"] == alpha
        student = make_toy_world()
        worlds.load_lora(student.transformer, str(out), "student", trainable=True)
        torch.testing.assert_close(velocity(student), want, rtol=1e-4, atol=1e-4)
        via_diffusers = make_toy_world()  # diffusers reads r and alpha from the file's metadata
        via_diffusers.transformer.load_lora_adapter(str(tmp_path), weight_name=out.name, adapter_name="student")
        torch.testing.assert_close(velocity(via_diffusers), want, rtol=1e-4, atol=1e-4)
    # Rank 2 at the SFT student's scale (alpha / r = 2): the best rank-2 update, the split even (|A_i| = |B_:,i|).
    out = tmp_path / "r2a4.safetensors"
    merge("--adapters", ",".join(experts), "--rank", 2, "--alpha", 4, "--out", out)
    weights, config = worlds.read_lora(str(out))
    assert (config["r"], config["lora_alpha"]) == (2, 4)
    got, c = updates(out), card(out)  # updates() scales by the file's alpha / r
    for m, dW in exact.items():
        S = torch.linalg.svdvals(dW)
        tail = float(S[2:].norm() / S.norm())  # Eckart-Young: the best rank-2 error
        assert float((got[m] - dW).norm() / dW.norm()) == pytest.approx(tail, abs=1e-5)
        assert c["reconstruction_error"]["per_module"][m] == pytest.approx(tail, abs=1e-5)
        torch.testing.assert_close(weights[m + ".lora_A.weight"].norm(dim=1), weights[m + ".lora_B.weight"].norm(dim=0))
        # (alpha / r) |A_i| |B_:,i| is the i-th singular value
        torch.testing.assert_close(2 * weights[m + ".lora_A.weight"].norm(dim=1) ** 2, S[:2].float(), rtol=1e-5, atol=1e-6)


def test_peft_folders_merge_as_their_diffusers_copies_into_a_clean_config(tmp_path):
    # Two Flow-GRPO-style teacher folders (get_peft_model(...).save_pretrained, r 32 / alpha 64) on a tiny random
    # SD3 transformer, and the same adapters saved in diffusers format through worlds.load_lora / save_lora.
    folders = [peft_teachers.peft_folder(tmp_path / f"teacher{k}", seed=k + 1) for k in range(2)]
    files = []
    for k, folder in enumerate(folders):
        t = peft_teachers.tiny_transformer()
        worlds.load_lora(t, folder, "t")
        files.append(str(tmp_path / f"teacher{k}.safetensors"))
        worlds.save_lora(t, "t", files[-1])
    from_folders, from_files = tmp_path / "folders.safetensors", tmp_path / "files.safetensors"
    merge("--adapters", ",".join(folders), "--out", from_folders)
    merge("--adapters", ",".join(files), "--out", from_files)

    (wa, config), (wb, config_b) = worlds.read_lora(str(from_folders)), worlds.read_lora(str(from_files))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert config == config_b
    # the layout, rank and alpha, nothing of the folders' bookkeeping (inference_mode: true, auto_mapping, ...)
    assert set(config) <= {"r", "lora_alpha", "target_modules", "init_lora_weights", "lora_dropout"}
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (64, 64, "gaussian")
    assert config["target_modules"] == sorted(peft_teachers.flow_grpo_config().target_modules)
    assert [i["sha256"] for i in card(from_folders)["inputs"]] == [runs.input_sha256(f) for f in folders]

    # the merged student runs as base + mean of the two updates, through worlds.load_lora (trainable) and diffusers
    dWs = [updates(f) for f in folders]
    base = peft_teachers.tiny_transformer()
    state = base.state_dict()
    for m in dWs[0]:
        state[m + ".weight"] += ((dWs[0][m] + dWs[1][m]) / 2).float()
    base.load_state_dict(state)
    x = peft_teachers.inputs()
    want = peft_teachers.velocity(base, x)
    student = peft_teachers.tiny_transformer()
    params = worlds.load_lora(student, str(from_folders), "student", trainable=True)
    assert all(p.requires_grad for p in params.values())
    torch.testing.assert_close(peft_teachers.velocity(student, x), want, rtol=1e-4, atol=1e-5)
    via_diffusers = peft_teachers.tiny_transformer()
    via_diffusers.load_lora_adapter(str(tmp_path), weight_name=from_folders.name, adapter_name="student")
    torch.testing.assert_close(peft_teachers.velocity(via_diffusers, x), want, rtol=1e-4, atol=1e-5)


def test_ties_matches_a_hand_computation(tmp_path):
    # Task vectors dW_k = B_k (A = I, alpha = r = 16): non-zero on the diagonal only.
    diag = [[3.0, -2.0, 0.5, 0.0], [1.0, 4.0, 0.0, -0.2], [-5.0, 1.0, 2.0, 0.0]]
    weights, config = worlds.read_lora(expert(make_toy_world(), tmp_path / "shape.safetensors", "s", 16, 16, 0))
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    paths = []
    for k, d in enumerate(diag):
        B = torch.diag(torch.tensor(d + [0.0] * 12))
        w = {f"{m}.lora_{x}.weight": (torch.eye(16) if x == "A" else B.clone()) for m in mods for x in "AB"}
        paths.append(str(tmp_path / f"t{k}.safetensors"))
        worlds.write_lora(paths[-1], w, config)
    # density 2/256 keeps each task's 2 largest entries: t0 {3, -2}, t1 {1, 4}, t2 {-5, 2}.
    # Elected signs: (0,0) 3+1-5 < 0; (1,1) -2+4 > 0; (2,2) +2. Disjoint means: -5, 4, 2; (3,3) trimmed away.
    cases = {"1,1,1": [-5.0, 4.0, 2.0, 0.0],
             "3,1,1": [5.0, -6.0, 2.0, 0.0]}  # t0 tripled BEFORE the election: (0,0) 9+1-5 > 0 -> (9+1)/2; (1,1) -6+4 < 0
    for w, want in cases.items():
        out = tmp_path / f"ties{w}.safetensors"
        merge("--adapters", ",".join(paths), "--method", "ties", "--density", 2 / 256, "--weights", w, "--out", out)
        expected = torch.diag(torch.tensor(want + [0.0] * 12, dtype=torch.float64))
        for m, dW in updates(out).items():
            torch.testing.assert_close(dW, expected, rtol=0, atol=1e-5, msg=m)
        assert card(out)["rank_out"] == 16  # full rank min(out, in) through the SVD


def test_merged_adapter_moves_the_model_as_its_dw_says(experts, tmp_path):
    # The real command line once, in a subprocess, folding into a base transformer file as well.
    base = tmp_path / "base.safetensors"
    runs.save_tensors(str(base), make_toy_world().transformer.state_dict())
    out = tmp_path / "student.safetensors"
    lams = [0.2, 0.5, 0.3]
    res = subprocess.run([sys.executable, "merge.py", "--adapters", ",".join(experts), "--weights", "0.2,0.5,0.3",
                          "--fold-into", str(base), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "rank 7" in res.stdout

    # reference: base weights + sum_k lambda_k dW_k added by hand
    dWs = [updates(p) for p in experts]
    want = velocity(with_updates({m: sum(l * d[m] for l, d in zip(lams, dWs)) for m in dWs[0]}))
    assert not torch.allclose(want, velocity(make_toy_world()), atol=1e-3)

    with_lora = make_toy_world()
    worlds.load_lora(with_lora.transformer, str(out), "student")
    torch.testing.assert_close(velocity(with_lora), want, rtol=1e-4, atol=1e-4)

    via_diffusers = make_toy_world()  # what StableDiffusion3Pipeline.load_lora_weights does for the transformer
    via_diffusers.transformer.load_lora_adapter(str(tmp_path), weight_name=out.name, adapter_name="student")
    torch.testing.assert_close(velocity(via_diffusers), want, rtol=1e-4, atol=1e-4)

    folded = make_toy_world()
    folded.transformer.load_state_dict(runs.load_tensors(str(tmp_path / "student.folded.safetensors"))[0])
    torch.testing.assert_close(velocity(folded), want, rtol=1e-4, atol=1e-4)


def _bad(toy_world, tmp_path, case):
    """(arguments, expected error pattern) for one bad input."""
    good = expert(toy_world, tmp_path / "good.safetensors", "g", 2, 4, 1)
    if case == "targets":
        other = expert(toy_world, tmp_path / "few.safetensors", "f", 2, 4, 2, targets=["attn.to_q", "attn.to_k"])
        return [good, other], [], r"good.safetensors and .*few.safetensors target different modules: first difference transformer_blocks.0.attn.add_k_proj"
    if case == "shapes":
        weights, config = worlds.read_lora(good)
        weights = {k: (v[:, :8] if k.endswith("to_v.lora_A.weight") else v) for k, v in weights.items()}
        worlds.write_lora(str(tmp_path / "narrow.safetensors"), weights, config)
        return [good, str(tmp_path / "narrow.safetensors")], [], r"differ in module transformer_blocks.0.attn.to_v: dW shape"
    if case == "ranks-lora-mean":
        other = expert(toy_world, tmp_path / "r3.safetensors", "r", 3, 4, 2)
        return [good, other], ["--method", "lora-mean"], r"lora-mean needs equal ranks"
    if case == "not-safetensors":
        (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
        return [good, str(tmp_path / "junk.safetensors")], [], r"junk.safetensors is not a readable safetensors LoRA"
    if case == "not-lora":
        runs.save_tensors(str(tmp_path / "plain.safetensors"), {"w": torch.zeros(2)})
        return [good, str(tmp_path / "plain.safetensors")], [], r"plain.safetensors has no LoRA config"
    if case == "missing":
        return [good, str(tmp_path / "nope.safetensors")], [], r"nope.safetensors does not exist"
    if case == "weights-count":
        return [good, good], ["--weights", "1,1,1"], r"3 weights for 2 adapters"
    if case == "weights-nan":
        return [good, good], ["--weights", "1,nan"], r"NaN or inf"
    if case == "weights-negative":
        return [good, good], ["--weights", "1,-1", "--method", "ties"], r"negative weight, meaningless for ties"
    if case == "weights-zero":
        return [good, good], ["--weights", "0,0"], r"all zero"
    if case == "alpha-negative":
        return [good, good], ["--alpha", "-64"], r"--alpha -64.0 must be a positive number"
    if case == "out-in-peft-folder":  # the output would overwrite the weights of an input folder
        folder = tmp_path / "teacher"
        folder.mkdir()
        weights, config = worlds.read_lora(good)
        runs.save_tensors(str(folder / worlds.PEFT_WEIGHTS), {"base_model.model." + k: v for k, v in weights.items()})
        (folder / worlds.PEFT_CONFIG).write_text(json.dumps(config))
        return [good, str(folder)], ["--out", str(folder / worlds.PEFT_WEIGHTS)], r"teacher/adapter_model.safetensors is one of the inputs"
    if case == "empty":
        return [], [], r"--adapters is empty"
    if case == "fold-base":
        runs.save_tensors(str(tmp_path / "other.safetensors"), {"w": torch.zeros(2)})
        return [good], ["--fold-into", str(tmp_path / "other.safetensors")], r"has no weight for module"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["targets", "shapes", "ranks-lora-mean", "not-safetensors", "not-lora", "missing",
                                  "weights-count", "weights-nan", "weights-negative", "weights-zero", "alpha-negative",
                                  "out-in-peft-folder", "empty", "fold-base"])
def test_bad_inputs_stop_with_one_error_line_and_write_nothing(toy_world, tmp_path, case):
    adapters, extra, pattern = _bad(toy_world, tmp_path, case)
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(SystemExit, match=pattern) as e:
        merge("--adapters", ",".join(adapters), "--out", out, *extra)  # a case's own --out comes last and wins
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # no LoRA, no card, no folded file, not even the folder
