"""The modes measured from how an image is drawn (issue #38): tiny_world.drawn_strength reads back the strength
render_at drew, drawn_mode separates crisp from moded ground truth, render_at leaves render's bytes alone, and
objects_drawn counts the named objects the GenEval program finds."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_world as tw  # noqa: E402

N = 16  # train prompts a task: every one is checked, so a few suffice


def draw(task, mode=None, strength=None):
    prompts = tw.read_prompts(task, "train")[:N]
    imgs = np.stack([tw.render_at(p, np.random.default_rng(i), mode, strength) for i, p in enumerate(prompts)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, prompts


@pytest.mark.parametrize("task,mode", [("ocr", "faint"), ("geneval", "washed"), ("pickscore", "small")])
def test_render_at_without_a_strength_is_render(task, mode):
    for i, p in enumerate(tw.read_prompts(task, "train")[:N]):
        a, b = tw.render_at(p, np.random.default_rng(i), mode), tw.render(p, np.random.default_rng(i), mode)
        assert np.array_equal(a, b)


# the tolerance of each read-back: ocr's sign is flat, so its ink contrast is exact to the uint8 rounding;
# geneval's wash goes toward the background's mean and is read against its border's median (texture 0.025);
# pickscore's extent is a whole number of pixels, 2r +- 2 for every shape but the square (1.6r)
@pytest.mark.parametrize("task,mode,strength,expect,tol", [
    ("ocr", "faint", 0.40, 0.40, 0.01), ("ocr", "faint", 0.15, 0.15, 0.01),
    ("geneval", "washed", 0.60, 0.40, 0.03), ("geneval", "washed", 0.30, 0.70, 0.03)])
def test_drawn_strength_reads_back_the_drawn_contrast(task, mode, strength, expect, tol):
    x, prompts = draw(task, mode, strength)
    s = tw.drawn_strength(task, x, prompts)
    assert np.abs(s - expect).max() <= tol, (s, expect)


def test_drawn_strength_reads_a_subjects_extent_and_the_noise():
    x, prompts = draw("pickscore", "small", 6.0)
    extent = tw.drawn_strength("pickscore", x, prompts)
    square = np.array(["square" in p for p in prompts])
    assert np.all(np.abs(extent[~square] - 12) <= 2) and np.all(np.abs(extent[square] - 9.6) <= 2), extent
    x, prompts = draw("deqa")
    for std in (0.03, 0.08):
        noisy = (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        est = tw.drawn_strength("deqa", noisy, prompts)
        assert np.all(np.abs(est / std - 1) < 0.25), (std, est)  # clamping at 0 and 1 trims the strong noise


@pytest.mark.parametrize("task,mode", [("ocr", "faint"), ("geneval", "washed"), ("pickscore", "small")])
def test_drawn_mode_separates_crisp_from_moded_ground_truth(task, mode):
    crisp, prompts = draw(task)
    moded, _ = draw(task, mode)
    assert not tw.drawn_mode(task, crisp, prompts).any()
    assert tw.drawn_mode(task, moded, prompts).all()


def test_objects_drawn_counts_the_named_objects():
    x, prompts = draw("deqa")
    assert np.all(tw.objects_drawn(x, prompts) == 1.0)
    # the same scenes drawn with the second object left out, scored against the two-object prompts
    one = [tw._one_object_prompt(tw.parse(p)) for p in prompts]
    x1 = tw.render_batch(one, np.random.default_rng(0))
    assert np.all(tw.objects_drawn(x1, prompts) == 0.5)
    assert np.all(tw.objects_drawn(torch.full_like(x, 0.05), prompts) == 0.0)
    counted = ["a photo of three red circles"]
    three = tw.render_batch(counted, np.random.default_rng(0))
    two = tw.render_batch(["a photo of two red circles"], np.random.default_rng(0))
    assert tw.objects_drawn(three, counted)[0] == 1.0 and tw.objects_drawn(two, counted)[0] == pytest.approx(2 / 3)
