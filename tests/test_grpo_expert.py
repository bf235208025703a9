"""Flow-GRPO (grpo_expert.py and the policy-gradient maths it shares with opd.py): advantages on known
numbers, the surrogate's value and gradient sign, and the real script on the tiny world: on-policy
ratio 1 and zero KL before the first update, 2 processes == 1 process, resume == uninterrupted, and
the reward rises on an easy task."""

import json
import os

import pytest
import torch

import sde
from helpers import assert_one_error_line, assert_same_adam_training, read_adapter, read_log, run_script, torchrun_script

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sde.__file__), "assets", "tiny_base.safetensors")),
                                reason="the tiny world's base weights are not built yet")
FAST = ["--prompts-per-epoch", "2", "--group-size", "4", "--steps", "4", "--noise-level", "0.2", "--sample-batch", "8", "--train-batch", "8",
        "--grid-every", "0", "--lora-rank", "4", "--lora-alpha", "8", "--ema-decay", "0", "--ema-every", "1"]  # saved = raw weights


def test_advantages_on_known_numbers():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, keep = sde.group_advantages(rewards, groups, "global")
    std = rewards.std(unbiased=False)  # 1.6997...
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (std + 1e-4))
    assert keep.tolist() == [True, True, True, False, False, False]  # no spread in group 1: skipped
    adv, _ = sde.group_advantages(rewards, groups, "group")
    group_std = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]) / (group_std + 1e-4))
    # one success among 36: (1 - 1/36) / sqrt(1/36 * 35/36) = 5.92 > 5, so it is clipped to 5
    adv, _ = sde.group_advantages(torch.tensor([0.0] * 35 + [1.0]), torch.zeros(36, dtype=torch.long), "group", clip=5.0)
    assert adv.max() == 5.0 and adv.min() > -1


def test_surrogate_value_and_gradient_sign():
    log_prob = torch.zeros(3, requires_grad=True)
    loss, ratio = sde.clipped_surrogate(log_prob, torch.zeros(3), torch.zeros(3), 1e-4)
    assert torch.all(ratio == 1) and torch.all(loss == 0)  # on-policy, zero advantage: zero loss
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, _ = sde.clipped_surrogate(log_prob, torch.zeros(3), adv, 1e-4)
    loss.sum().backward()
    # raising the log-prob of a positive-advantage sample lowers the loss (and the reverse)
    assert log_prob.grad[0] < 0 and log_prob.grad[1] > 0 and log_prob.grad[2] < log_prob.grad[0]
    # outside the trust region the clipped branch takes over and the gradient vanishes
    far = torch.full((1,), 0.01, requires_grad=True)
    loss, _ = sde.clipped_surrogate(far, torch.zeros(1), torch.ones(1), 1e-4)
    loss.backward()
    assert far.grad.item() == 0


def test_first_update_is_on_policy_with_zero_kl(tmp_path):
    run_script("grpo_expert.py", "--task", "pickscore", "--epochs", "1", "--updates-per-epoch", "1", "--beta", "0.04",
               "--out", str(tmp_path), *FAST)
    (record,) = read_log(tmp_path)
    assert abs(record["ratio_first"] - 1) < 1e-5  # log-probs recomputed = log-probs sampled
    assert record["kl"] == 0  # a fresh LoRA (B = 0) is the reference policy
    assert os.path.isfile(tmp_path / "adapter.safetensors") and json.load(open(tmp_path / "config.json"))["beta"] == 0.04


def test_resume_equals_uninterrupted(tmp_path):
    args = ["--task", "pickscore", "--save-every", "1", *FAST]  # a graded reward: every group has spread
    run_script("grpo_expert.py", "--epochs", "3", "--out", str(tmp_path / "straight"), *args)
    run_script("grpo_expert.py", "--epochs", "2", "--out", str(tmp_path / "resumed"), *args)
    run_script("grpo_expert.py", "--epochs", "3", "--out", str(tmp_path / "resumed"), *args)
    a, b = read_adapter(tmp_path / "straight"), read_adapter(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # and the same bytes: an adapter's or a checkpoint's sha256 means the model, in any folder or process
    from runs import file_sha256
    for name in ("adapter.safetensors", "checkpoints/step_000003.safetensors"):
        assert file_sha256(str(tmp_path / "straight" / name)) == file_sha256(str(tmp_path / "resumed" / name)), name
    log = read_log(tmp_path / "straight")
    assert [r["reward"] for r in log] == [r["reward"] for r in read_log(tmp_path / "resumed")]
    assert log[-1]["opt_step"] > 0 and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_two_processes_equal_one(tmp_path):
    args = ["--task", "pickscore", "--epochs", "2", *FAST]
    run_script("grpo_expert.py", "--out", str(tmp_path / "one"), *args)
    torchrun_script(2, "grpo_expert.py", "--out", str(tmp_path / "two"), *args)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    # epoch 1 samples from the same weights; after an update the two runs' weights differ at float rounding (the
    # all-reduce's order), and a threshold of the reward (a pixel's foreground or colour class) may flip one pixel
    # of one image: 1/1024 of one term of one image's score, 6.7e-5 of the mean on the v4 base
    assert one[0]["reward"] == pytest.approx(two[0]["reward"], abs=1e-6)
    assert [r["reward"] for r in one] == pytest.approx([r["reward"] for r in two], abs=1e-3)
    assert one[-1]["opt_step"] > 0 and min(r["kept"] for r in one) > 0  # groups with reward spread: real updates
    a, b = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    assert_same_adam_training(a, b, lr=3e-4, opt_steps=one[-1]["opt_step"])  # the default lr


def test_grpo_mix_alternates_whole_epochs_3_1_1_at_the_official_beta(tmp_path):
    """The paper's GRPO-Mix: each epoch draws one task's prompts and scores them with that task's reward, in the
    ratio 3:1:1 (GenEval, GenEval, GenEval, OCR, PickScore, ...); beta 0.04 (the official mix config)."""
    run_script("grpo_expert.py", "--task", "geneval:3,ocr:1,pickscore:1", "--reward", "deqa:1", "--epochs", "6",
               "--updates-per-epoch", "1", "--out", tmp_path, *FAST)
    log = read_log(tmp_path)
    tasks = [[k.removeprefix("reward_") for k in r if k.startswith("reward_")] for r in log]
    assert tasks == [["geneval"]] * 3 + [["ocr"], ["pickscore"], ["geneval"]], tasks
    assert json.load(open(tmp_path / "config.json"))["beta"] == 0.04
    assert_one_error_line("whole numbers", "grpo_expert.py", "--task", "geneval:1.5,ocr:1", "--out", tmp_path / "x", *FAST)


def test_prompts_apart_from_the_reward(tmp_path):
    """--prompts geneval,ocr --reward deqa:1: the two tasks' prompts, scored by DeQA alone (the paper's DeQA teacher is
    this with three datasets and 0.4 DeQA + 0.6 PickScore)."""
    run_script("grpo_expert.py", "--prompts", "geneval,ocr", "--mix", "prompts", "--reward", "deqa:1", "--epochs", "1",
               "--updates-per-epoch", "1", "--out", tmp_path, *FAST)
    (record,) = read_log(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["beta"] == 0.01 and {"reward_geneval", "reward_ocr"} <= set(record)  # prompts of both, DeQA's beta
    assert 0 < record["reward"] < 1 and "reward_deqa" not in record
    assert_one_error_line("--reward is empty", "grpo_expert.py", "--prompts", "geneval", "--out", tmp_path / "y", *FAST)
