"""worlds.py's LoRA helpers and runs.py's plumbing: adapters round-trip exactly, switching adapters switches the
model, checkpoints restore optimizer and RNG state exactly, writes are atomic."""

import os

import pytest
import torch

import runs
import sde
import worlds


def test_lora_save_load_round_trip_and_adapter_switching(toy_world, tmp_path):
    t = toy_world.transformer
    params = worlds.add_lora(t, "a", rank=4, alpha=8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # B != 0: the adapter now changes the model
    x, (e, pooled) = torch.randn(2, 4, 8, 8), toy_world.encode_prompts(["red circle", "blue square"])
    with worlds.adapter(t, "a"):
        v_a = sde.predict_velocity(toy_world, x, 0.5, e, pooled, 1.0)
    with worlds.adapter(t, None):
        v_base = sde.predict_velocity(toy_world, x, 0.5, e, pooled, 1.0)
    assert not torch.allclose(v_a, v_base)

    # a copy keyed like lora_parameters (what an EMA holds) saves to the same file
    worlds.save_lora(t, "a", str(tmp_path / "a.safetensors"), state_dict={k: p.detach() * 1 for k, p in worlds.lora_parameters(t, "a").items()})
    worlds.load_lora(t, str(tmp_path / "a.safetensors"), "b")
    assert t.peft_config["b"].r == 4 and t.peft_config["b"].lora_alpha == 8  # alpha/r = 2 survives the file
    with worlds.adapter(t, "b"):
        torch.testing.assert_close(sde.predict_velocity(toy_world, x, 0.5, e, pooled, 1.0), v_a)
    # the context manager restores the active adapter and which adapter is trainable
    assert t.active_adapters() == ["a"]
    assert all(p.requires_grad for p in worlds.lora_parameters(t, "a").values())
    assert not any(p.requires_grad for p in worlds.lora_parameters(t, "b").values())


def test_load_lora_rejects_bad_files(toy_world, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="bad.safetensors"):
        worlds.load_lora(toy_world.transformer, str(bad), "x")
    with pytest.raises(SystemExit, match="does not exist"):
        worlds.load_lora(toy_world.transformer, str(tmp_path / "missing.safetensors"), "x")


def test_checkpoint_restores_optimizer_and_rng_exactly(tmp_path):
    def run(model, opt, steps):
        for _ in range(steps):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.weight.detach().clone()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    run(model, opt, 3)
    runs.save_checkpoint(str(tmp_path), 3, dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=runs.rng_state(), step=3))
    uninterrupted = run(model, opt, 3)

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    state = runs.load_checkpoint(str(tmp_path))
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    runs.set_rng_state(state["rng"])
    assert state["step"] == 3
    torch.testing.assert_close(run(model2, opt2, 3), uninterrupted, rtol=0, atol=0)


def test_checkpoints_are_pruned_and_latest_wins(tmp_path):
    for step in (1, 2, 3):
        runs.save_checkpoint(str(tmp_path), step, dict(step=step, w=torch.full((2,), float(step))), keep=2)
    files = sorted(os.listdir(tmp_path / "checkpoints"))
    assert files == ["latest", "step_000002.safetensors", "step_000003.safetensors"]
    assert runs.load_checkpoint(str(tmp_path))["step"] == 3
    assert runs.load_checkpoint(str(tmp_path / "nothing")) is None


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(TypeError):
        runs.atomic_write(str(tmp_path / "out.json"), 123)  # not bytes or str
    assert os.listdir(tmp_path) == []
    runs.write_json(str(tmp_path / "out.json"), {"a": 1})
    assert os.listdir(tmp_path) == ["out.json"]


def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert worlds.read_prompts(str(tmp_path / "p.txt")) == (["a cat", "a dog"], [{}, {}])
    (tmp_path / "p.jsonl").write_text('{"prompt": "two cats", "tag": "counting"}\n')
    prompts, meta = worlds.read_prompts(str(tmp_path / "p.jsonl"))
    assert prompts == ["two cats"] and meta[0]["tag"] == "counting"
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1"):
        worlds.read_prompts(str(tmp_path / "bad.jsonl"))


def test_parse_settings_types_and_flags():
    settings = dict(lr=(3e-4, "learning rate"), epochs=(2, "epochs"), task=("geneval", "task"), ema=(True, "use EMA"),
                    guidance=(None, float, "CFG scale; None = the world's default"))
    cfg = runs.parse_settings("doc", settings, ["--lr", "0.1", "--no-ema", "--guidance", "2.5", "--task", "ocr"])
    assert cfg.lr == 0.1 and cfg.epochs == 2 and cfg.ema is False and cfg.guidance == 2.5 and cfg.task == "ocr"
    with pytest.raises(SystemExit):
        runs.parse_settings("doc", settings, ["--epochs", "two"])


def test_gradient_checkpointing_gives_the_same_gradients(toy_world):
    """--gradient-checkpointing recomputes activations in the backward pass: the LoRA gradients of a
    CFG velocity loss are those of the plain backward (to float rounding), and the model really switched."""
    t = toy_world.transformer
    params = worlds.add_lora(t, "a", rank=4, alpha=8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    x, (e, pooled) = torch.randn(3, 4, 8, 8), toy_world.encode_prompts(["red circle", "blue square", "a"])

    def grads():
        for p in params:
            p.grad = None
        v = sde.predict_velocity(toy_world, x, 0.6, e, pooled, 3.0)
        (v ** 2).mean().backward()
        return [p.grad.clone() for p in params]

    plain = grads()
    t.enable_gradient_checkpointing()
    assert t.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in plain)


def test_torchrun_repeat_bad_input_is_one_line():
    """bench/torchrun_repeat.py (the README's torchrun failure counts) refuses a count it cannot run."""
    import subprocess
    import sys

    from helpers import ENV, ROOT
    result = subprocess.run([sys.executable, "bench/torchrun_repeat.py", "restart", "--runs", "0"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == "error: --runs must be at least 1, got 0"


def test_gain_per_call_bad_input_is_one_line(tmp_path):
    """bench/gain_per_call.py checks its run folders before it loads a model: one line, which folder, what is expected."""
    from helpers import assert_one_error_line

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "log.jsonl").write_text('{"epoch": 1, "kl": 0.1}\n')
    for runs_arg, says in (("k2", "must be label=folder pairs"), (f"a={tmp_path / 'none'}", "log.jsonl does not exist"),
                           (f"a={tmp_path / 'old'}", "has no forwards_* fields")):
        assert_one_error_line(says, "bench/gain_per_call.py", "--teacher", "x.safetensors", "--runs", runs_arg, timeout=120)


def test_the_same_adapter_and_checkpoint_write_the_same_bytes(tmp_path):
    # safetensors keeps its header's metadata in a Rust HashMap, whose order is seeded afresh for every
    # map: diffusers' two keys ('format', 'lora_adapter_metadata') came out in either order, so equal
    # adapters had unequal sha256. A file hash must mean the model: the same weights write the same bytes.
    import hashlib

    weights = {"blocks.0.attn.to_q.lora_A.weight": torch.arange(8.0).reshape(2, 4),
               "blocks.0.attn.to_q.lora_B.weight": torch.ones(4, 2)}
    config = dict(r=2, lora_alpha=4, target_modules=["to_q"], init_lora_weights="gaussian")
    digests = set()
    for i in range(12):  # one order in two a write on the old code: 12 writes miss it 1 time in 2,048
        path = tmp_path / f"a{i}.safetensors"
        worlds.write_lora(str(path), weights, config)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded, meta = runs.load_tensors(str(tmp_path / "a0.safetensors"))
    assert set(meta) == {"format", "lora_adapter_metadata"} and torch.equal(loaded["transformer.blocks.0.attn.to_q.lora_A.weight"], weights["blocks.0.attn.to_q.lora_A.weight"])

    digests = set()  # checkpoints too, whatever their metadata keys
    for i in range(12):
        runs.save_tensors(str(tmp_path / f"c{i}.safetensors"), weights, metadata={"b": "1", "a": "2", "state": "{}"})
        digests.add(hashlib.sha256((tmp_path / f"c{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded, meta = runs.load_tensors(str(tmp_path / "c0.safetensors"))
    assert meta == {"b": "1", "a": "2", "state": "{}"} and all(torch.equal(loaded[k], v) for k, v in weights.items())
