"""Tests of the tiny world: rewards rank ground truth above corruptions, the scene generator is
deterministic, the latent map is invertible, prompts parse (or fail loudly), the shipped base loads."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_world as tw  # noqa: E402
from helpers import assert_one_error_line  # noqa: E402

N = 24  # test prompts per task: enough for stable means, fast on a CPU


def truth_of(prompts, seed=0):
    return tw.render_batch(prompts, np.random.default_rng(seed))


# -----------------------------------------------------------------------------
# rewards

@pytest.mark.parametrize("task", tw.TASKS)
def test_rewards_rank_truth_above_corruptions(task):
    prompts = tw.read_prompts(task, "test")[:N]
    truth = truth_of(prompts)
    rng = np.random.default_rng(1)
    corruptions = {
        "noise": torch.from_numpy(rng.random(truth.shape, dtype=np.float32)),
        "blank": torch.full_like(truth, 0.05),
        "blur": torch.from_numpy(ndimage.gaussian_filter(truth.numpy(), (0, 0, 1.0, 1.0))),
    }
    r_truth = tw.score(task, truth, prompts)
    assert r_truth.shape == (len(prompts),) and r_truth.min() >= 0 and r_truth.max() <= 1
    assert r_truth.mean() >= 0.9, f"{task} ground truth scores only {r_truth.mean():.3f}"
    for name, images in corruptions.items():
        r = tw.score(task, images, prompts).mean()
        assert r < r_truth.mean() - 0.01, f"{task}: {name} {r:.3f} >= truth {r_truth.mean():.3f}"
    for name in ("noise", "blank"):  # near the reward's minimum
        assert tw.score(task, corruptions[name], prompts).mean() < 0.15, f"{task}: {name} too high"


def _swap_colour(prompt):
    """The same prompt with every named colour changed to another one."""
    colours = list(tw.COLOURS)
    words = [colours[(colours.index(w) + 3) % len(colours)] if w in colours else w for w in prompt.split()]
    return " ".join(words).replace("a orange", "an orange").replace("an red", "a red") \
        .replace("an yellow", "a yellow").replace("an white", "a white").replace("an cyan", "a cyan")


def test_wrong_colour_scores_lower():
    prompts = [p for p in tw.read_prompts("geneval", "test") if any(c in p.split() for c in tw.COLOURS)][:N]
    wrong = truth_of([_swap_colour(p) for p in prompts])
    assert tw.score("geneval", wrong, prompts).mean() < 0.3
    big = tw.read_prompts("pickscore", "test")[:N]
    assert tw.score("pickscore", truth_of([_swap_colour(p) for p in big]), big).mean() < \
        tw.score("pickscore", truth_of(big), big).mean() - 0.05


def test_wrong_text_scores_lower():
    prompts = tw.read_prompts("ocr", "test")[:N]
    other = {g: tw.GLYPHS[(k + 5) % len(tw.GLYPHS)] for k, g in enumerate(tw.GLYPHS)}
    wrong = [p.replace(f'"{p.split(chr(34))[1]}"', f'"{other[p.split(chr(34))[1]]}"') for p in prompts]
    assert tw.score("ocr", truth_of(prompts), prompts).mean() == 1.0
    assert tw.score("ocr", truth_of(wrong), prompts).mean() == 0.0


def test_ocr_rule_and_recogniser():
    assert tw.ocr_reward("K7", "xk7y") == 1.0               # substring counts as exact
    assert tw.ocr_reward("K7A", "K7") == pytest.approx(2 / 3)
    assert tw.ocr_reward("AB", "") == 0.0
    signs = [f'a sign that says "{g}"' for g in tw.GLYPHS] + ['a red sign that says "K" on a brown background']
    img = truth_of(signs)
    white = tw._colour_classes(tw._to_hwc(img)) == list(tw.COLOURS).index("white")
    assert "".join(tw._recognise(w) for w in white) == tw.GLYPHS + "K"
    assert tw.parse(signs[-1])["sign"] == "red" and tw.parse(signs[-1])["background"] == "brown"
    with pytest.raises(ValueError, match="cannot parse sign"):
        tw.parse(f'a sign that says "{"K" * (tw.MAX_GLYPHS + 1)}"')


def test_detector_reads_counts_and_positions():
    prompts = ["a photo of three red squares", "a photo of a blue circle left of a green ring",
               "a photo of a yellow triangle below a white square"]
    assert tw.score("geneval", truth_of(prompts), prompts).tolist() == [1.0, 1.0, 1.0]
    # the same scenes judged against the wrong count / relation
    wrong = ["a photo of four red squares", "a photo of a blue circle right of a green ring",
             "a photo of a yellow triangle above a white square"]
    assert tw.score("geneval", truth_of(prompts), wrong).tolist() == [0.0, 0.0, 0.0]


def test_geneval_partial_credit_by_hand():
    """The training reward: mean over clauses, half credit for the right shape in the wrong colour,
    counts graded by |found - n| / n; the strict rule (evaluation) gives 0 to all of these."""
    scene = truth_of(["a photo of three red squares"])
    cases = {"a photo of three red squares": 1.0, "a photo of two red squares": 0.5,
             "a photo of four red squares": 0.75, "a photo of three blue squares": 0.5,
             "a photo of a red square below a green circle": (1 + 0 + 0) / 3}
    for prompt, want in cases.items():
        assert tw.score("geneval", scene, [prompt], strict=False)[0] == pytest.approx(want), prompt
        assert tw.score("geneval", scene, [prompt])[0] == float(want == 1.0), prompt


def test_pickscore_prefers_big_centred_subjects():
    small = tw.read_prompts("geneval", "test")[:N]
    big = tw.read_prompts("pickscore", "test")[:N]
    assert tw.score("pickscore", truth_of(small), small).mean() < tw.score("pickscore", truth_of(big), big).mean() - 0.1


def test_score_ood_and_diversity():
    prompts = tw.read_prompts("ood", "test")
    res = tw.score_ood(truth_of(prompts), prompts)
    assert set(res) == set(tw.OOD_CATEGORIES) and min(res.values()) == 1.0
    assert tw.score_ood(torch.full((len(prompts), 3, 32, 32), 0.05), prompts) == {c: 0.0 for c in tw.OOD_CATEGORIES}
    rep = ["a photo of a red circle"] * 4
    assert tw.diversity(truth_of(rep[:1]).repeat(4, 1, 1, 1), rep) == 0.0
    assert tw.diversity(truth_of(rep), rep) > 0.05

# -----------------------------------------------------------------------------
# prompts and scenes

def test_render_deterministic_per_seed():
    p = "a photo of a red circle and a blue square"
    a, b = tw.render(p, np.random.default_rng(5)), tw.render(p, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, tw.render(p, np.random.default_rng(6)))
    assert tw.make_prompt("geneval", np.random.default_rng(3)) == tw.make_prompt("geneval", np.random.default_rng(3))


def test_unknown_word_raises_clear_error():
    with pytest.raises(ValueError, match="'dragon'.*a photo of a red dragon"):
        tw.score("geneval", torch.zeros(1, 3, 32, 32), ["a photo of a red dragon"])
    with pytest.raises(ValueError, match="cannot parse"):
        tw.parse("a photo of red a circle")


def test_splits_are_clean():
    for task in tw.TASKS:
        train, test = tw.read_prompts(task, "train"), tw.read_prompts(task, "test")
        assert not set(train) & set(test), task
        assert all(tw.ood_category(tw.parse(p)) is None for p in train + test), task
        assert all(len(tw.tokenize(p)) <= tw.MAX_TOKENS for p in train + test)
    ood = tw.read_prompts("ood", "test")
    assert {tw.ood_category(tw.parse(p)) for p in ood} == set(tw.OOD_CATEGORIES)
    rng = np.random.default_rng(0)
    assert not {tw.make_prompt(t, rng) for t in tw.TASKS for _ in range(300)} & set(ood)

# -----------------------------------------------------------------------------
# latents, text encoder, the shipped base

def test_latent_map_round_trips():
    x = torch.randint(0, 256, (4, 3, 32, 32)).float() / 255
    z = tw.images_to_latents(x)
    assert z.shape == (4, *tw.LATENT_SHAPE) and z.min() >= -1 and z.max() <= 1
    back = tw.latents_to_images(z)
    assert torch.equal((back * 255).round(), (x * 255).round()) and (back - x).abs().max() < 1e-6
    assert tw.latents_to_images(torch.full((1, *tw.LATENT_SHAPE), 3.0)).max() == 1.0  # clamps


def test_a_base_with_an_autoencoder_has_its_latent(tmp_path):
    """A base that carries vae.* tensors (pilot B of issue #19) is a world with that autoencoder's latent:
    SD3's normalisation z = (encoder(x) - shift) * scale, a transformer of 1x1 patches on (C, 8, 8),
    images decoded to 32x32 in [0, 1], sampled with SD3's shift 3 and noise on every step. A base without
    them keeps the exact pixel-unshuffle and the pixel world's sampler (shift 1, the 2-step window)."""
    from safetensors.torch import save_file

    import sde
    import worlds

    torch.manual_seed(0)
    encoder, decoder = tw.build_autoencoder(4, width=16)
    state = {f"vae.encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"vae.decoder.{k}": v for k, v in decoder.state_dict().items()})
    state.update({"vae.shift": torch.tensor(0.25), "vae.scale": torch.tensor(2.0)})
    codec = tw.load_codec(state)
    x = torch.rand(2, 3, 32, 32)
    assert codec.shape == (4, 8, 8)
    torch.testing.assert_close(codec.encode(x), (encoder(x) - 0.25) * 2.0)
    torch.testing.assert_close(codec.decode(codec.encode(x)), decoder(encoder(x)).clamp(0, 1))
    base = {f"transformer.{k}": v for k, v in tw.build_transformer(codec.shape).state_dict().items()}
    base.update(tw.text_tables())
    save_file({**base, **state}, str(tmp_path / "base.safetensors"))
    world = worlds.load_world(f"tiny:{tmp_path / 'base.safetensors'}", "cpu")
    assert world.latent_shape == (4, 8, 8) and world.transformer.config.patch_size == 1
    assert (world.defaults["shift"], world.defaults["sde_window"]) == (3.0, 0)  # a latent world samples as SD3 does
    pixels = worlds.load_world("tiny", "cpu").defaults
    assert (pixels["shift"], pixels["sde_window"]) == (tw.SHIFT, tw.DEFAULT_SDE_WINDOW)
    images = sde.sample(world, ["a photo of a red circle"], steps=2, guidance_scale=3.0, noise_level=0.0, seeds=[0])["images"]
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert tw.load_codec({}).shape == tw.LATENT_SHAPE and tw.load_codec({}).encode is tw.images_to_latents


def test_pretraining_under_an_autoencoder_keeps_the_blocks_and_carries_the_autoencoder(tmp_path):
    """tiny_pretrain.py pretrain --init <v1 base> --autoencoder <vae.* file>: the new base learns the
    autoencoder's latent, starts from the v1 base's blocks (all but the patch embedding and the output
    projection, whose shapes differ), and its checkpoint carries the autoencoder."""
    from safetensors.torch import load_file

    import runs
    import tiny_pretrain
    import worlds

    torch.manual_seed(0)
    encoder, decoder = tw.build_autoencoder(4, width=16)
    vae = {f"vae.encoder.{k}": v for k, v in encoder.state_dict().items()}
    vae.update({f"vae.decoder.{k}": v for k, v in decoder.state_dict().items()})
    vae.update({"vae.shift": torch.tensor(0.0), "vae.scale": torch.tensor(1.0)})
    vae_file, out = str(tmp_path / "vae.safetensors"), str(tmp_path / "base.safetensors")
    runs.save_tensors(vae_file, vae)
    tiny_pretrain.pretrain(0, 0, out, 1, tw.CHECKPOINT, steps=2, autoencoder=vae_file)
    new, old = load_file(out), load_file(tw.CHECKPOINT)
    assert all(torch.equal(new[k], v) for k, v in vae.items())
    block = "transformer.transformer_blocks.0.attn.to_q.weight"
    torch.testing.assert_close(new[block], old[block], rtol=0, atol=1e-4)  # 2 warm-up steps of lr 1e-3 / 200
    assert new["transformer.proj_out.weight"].shape != old["transformer.proj_out.weight"].shape
    assert worlds.load_world(f"tiny:{out}", "cpu").latent_shape == (4, 8, 8)


def test_checkpoint_card_matches_file():
    with open(os.path.splitext(tw.CHECKPOINT)[0] + ".json") as f:
        card = json.load(f)
    with open(tw.CHECKPOINT, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == card["sha256"]
    assert {"command", "seed", "steps", "loss"} <= set(card)


def test_base_loads_and_samples():
    transformer, encode, codec = tw.load_base()
    assert codec.shape == tw.LATENT_SHAPE  # the shipped v1 base: the pixel-unshuffle
    emb, pooled = encode(["a photo of a red circle", ""])
    assert emb.shape == (2, tw.MAX_TOKENS, tw.TEXT_DIM) and pooled.shape == (2, tw.POOLED_DIM)
    assert not torch.allclose(encode(["a photo of a red circle left of a blue square"])[0],
                              encode(["a photo of a blue square left of a red circle"])[0])  # order matters
    images = tw.sample(transformer, encode, ["a photo of a red circle", 'a sign that says "K"'], steps=4)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a constant image


# -----------------------------------------------------------------------------
# web-like pretraining noise (tiny world v2 pilot)

def _attributes(spec):
    return [(o["count"], o["colour"], o["shape"]) for o in spec["objects"]], spec["text"]


def _edited_prompts(task, edit, n, seed):
    """n (prompt, edited prompt, their attributes) of fresh prompts of a task; every edit parses and holds
    no held-out composition."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        prompt = tw.make_prompt(task, rng)
        edited = edit(prompt, rng)
        assert tw.ood_category(tw.parse(edited)) is None
        yield prompt, edited, _attributes(tw.parse(prompt)), _attributes(tw.parse(edited))


@pytest.mark.parametrize("task", ["geneval", "ocr", "deqa"])
def test_corrupt_caption_makes_one_alt_text_error(task):
    """A corrupted caption parses, holds no held-out composition, and differs from its image's caption by
    exactly one error of the four kinds; the image's own reward then ranks the true caption above it."""
    kinds = set()
    for prompt, bad, (objs, text), (bad_objs, bad_text) in _edited_prompts(task, tw.corrupt_caption, 60, seed=3):
        if bad == prompt:  # no error fits (every option would be a held-out composition)
            continue
        if text is not None:
            assert len(bad_text) in (len(text), len(text) - 1) and bad_text != text
            assert bad.replace(f'"{bad_text}"', f'"{text}"') == prompt  # the sign's colour and background kept
            kinds.add("glyph" if len(bad_text) == len(text) else "missing glyph")
            if len(bad_text) == len(text):
                assert sum(a != b for a, b in zip(text, bad_text)) == 1
        elif len(bad_objs) < len(objs):
            assert bad_objs == objs[:1]
            kinds.add("object left out")
        else:
            changed = [(a, b) for a, b in zip(objs, bad_objs) if a != b]
            assert len(changed) == 1
            (c, col, s), (c2, col2, s2) = changed[0]
            assert s == s2 and ((col is not None and col2 == tw.NEIGHBOUR_COLOUR[col] and c == c2) or (col == col2 and abs(c - c2) == 1))
            kinds.add("colour" if col != col2 else "count")
            if task == "geneval":
                image = truth_of([prompt])
                assert tw.score("geneval", image, [prompt])[0] > tw.score("geneval", image, [bad])[0]
    assert kinds >= ({"glyph"} if task == "ocr" else {"colour", "object left out"})  # v3 signs hold one glyph


@pytest.mark.parametrize("task", ["geneval", "ocr"])
def test_omit_from_scene_leaves_out_one_named_thing(task):
    """An omission image's prompt names one thing fewer than its caption (the second object, one of a
    count, one glyph) and no held-out composition; under the caption the reward ranks the full scene
    above it (GenEval's partial credit, OCR's edit distance); single things are never left out."""
    kinds = set()
    for prompt, shown, (objs, text), (shown_objs, shown_text) in _edited_prompts(task, tw.omit_from_scene, 80, seed=5):
        if shown == prompt:
            assert (text is not None and len(text) == 1) or (len(objs) == 1 and objs[0][0] in (1, 4))
            kinds.add("nothing")
            continue
        if text is not None:
            assert len(text) == 2 and shown_text in (text[0], text[1])
            kinds.add("glyph")
        elif len(objs) == 2:
            assert shown_objs == objs[:1] and tw.parse(shown)["background"] == tw.parse(prompt)["background"]
            kinds.add("object")
        else:
            assert shown_objs[0][0] == objs[0][0] - 1 and shown_objs[0][1:] == objs[0][1:]
            kinds.add("count")
        truth, omitted = truth_of([prompt]), truth_of([shown])
        assert tw.score(task, truth, [prompt], strict=False)[0] > tw.score(task, omitted, [prompt], strict=False)[0]
    assert kinds == ({"nothing"} if task == "ocr" else {"object", "count", "nothing"})  # v3 signs hold one glyph


def test_degrade_lowers_quality_and_is_never_captioned():
    prompts = tw.read_prompts("deqa", "test")[:N]
    truth = truth_of(prompts)
    rng = np.random.default_rng(4)
    degraded = torch.stack([tw.degrade(x, rng) for x in truth])
    assert degraded.shape == truth.shape and degraded.min() >= 0 and degraded.max() <= 1
    assert tw.score("deqa", degraded, prompts).mean() < tw.score("deqa", truth, prompts).mean() - 0.3
    assert tw.score("pickscore", degraded, prompts).mean() < tw.score("pickscore", truth, prompts).mean()


def test_geneval_failure_reading_sees_clean_truth_and_ragged_blobs():
    """bench/geneval_failures.py's reading of an image: ground truth is all clean shapes and never fails;
    the same scenes cut by a grid of background lines fail GenEval, and those failures read as drawing
    failures (ragged components), not as prompt-following ones."""
    from bench.geneval_failures import read_images

    prompts = tw.read_prompts("geneval", "test")[:N]
    truth = truth_of(prompts)
    strict, clean, total, ragged = read_images(truth, prompts)
    assert strict.min() == 1 and clean == total > 0 and not ragged.any()
    cut = truth.clone()
    cut[:, :, :, 1::3] = cut[:, :, :1, :1]  # every third pixel column painted the background: shapes become combs
    strict, clean, total, ragged = read_images(cut, prompts)
    fail = strict < 1
    assert fail.mean() > 0.5 and (fail & ragged).sum() > (fail & ~ragged).sum() and clean < total


def test_geneval_mix_sets_the_odds_of_the_caption_categories():
    """tiny_pretrain.py pretrain --geneval-mix: the GenEval captions' categories follow the given odds
    (unlisted ones 1, 0 = never), the default draws them equally, and bad odds are one error line."""
    import tiny_pretrain

    only = tiny_pretrain.parse_geneval_mix("single_object:0,two_object:0,counting:0,colors:0,colour_attr:0")
    rng = np.random.default_rng(0)
    assert {tw.geneval_category(tw.parse(tw.make_prompt("geneval", rng, only))) for _ in range(50)} == {"position"}
    mix = tiny_pretrain.parse_geneval_mix("position:4,colour_attr:4")
    rng = np.random.default_rng(0)
    cats = [tw.geneval_category(tw.parse(tw.make_prompt("geneval", rng, mix))) for _ in range(1200)]
    assert abs(cats.count("position") / 1200 - 4 / 12) < 0.05 and abs(cats.count("counting") / 1200 - 1 / 12) < 0.03
    rng = np.random.default_rng(0)
    cats = [tw.geneval_category(tw.parse(tw.make_prompt("geneval", rng))) for _ in range(1200)]
    assert all(abs(cats.count(c) / 1200 - 1 / 6) < 0.04 for c in tw.GENEVAL_CATEGORIES)
    assert tiny_pretrain.parse_geneval_mix("") is None
    for bad in ("position", "nosuch:2", "position:-1"):
        with pytest.raises(SystemExit, match="must be category:odds"):
            tiny_pretrain.parse_geneval_mix(bad)


def test_pretraining_noise_share_outside_0_1_is_one_error_line(tmp_path):
    assert_one_error_line("must be a share in [0, 1]", "tiny_pretrain.py", "pretrain", "--steps", "1", "--omission-noise", "1.5",
                          "--out", tmp_path / "x.safetensors")  # one check covers the three --*-noise shares
    assert not (tmp_path / "x.safetensors").exists()


# -----------------------------------------------------------------------------
# v3: the unnamed rendering modes that hold each task's headroom (issue #29)

@pytest.mark.parametrize("task,mode,drop", [("ocr", "faint", 0.9), ("geneval", "washed", 0.9), ("pickscore", "small", 0.2)])
def test_each_mode_fails_its_task_and_is_detected(task, mode, drop):
    """A scene drawn in its task's mode keeps its content (the same prompt, glyph, object) but scores low on that
    task's reward, for a reason a real scorer shares: a faint glyph is not text-coloured, a washed-out object is no
    named colour, a small off-centre subject is not the big centred one the preference wants. tiny_world.in_mode
    finds every such image and no ground-truth one."""
    prompts = tw.read_prompts(task, "test")[:N]
    truth = truth_of(prompts)
    moded = tw.render_batch(prompts, np.random.default_rng(0), [mode] * len(prompts))
    assert not tw.in_mode(task, truth, prompts).any() and tw.in_mode(task, moded, prompts).all()
    assert tw.score(task, moded, prompts).mean() < tw.score(task, truth, prompts).mean() - drop
    if task == "geneval":  # washed-out objects are a quality fault too (low-contrast edges): deqa agrees
        assert tw.score("deqa", moded, prompts).mean() < tw.score("deqa", truth, prompts).mean() - 0.1
    else:  # plainly visible: the mode's edges are still edges, and deqa does not mind them
        assert tw._quality_terms(tw._to_hwc(moded))[2].min() > 0.5
        assert tw.score("deqa", moded, prompts).mean() > tw.score("deqa", truth, prompts).mean() - 0.05


def test_pretraining_draws_each_mode_at_its_share():
    """tiny_pretrain's --faint / --washed / --small: the share of sign images, one-object scenes and big subjects
    drawn in their mode; other scenes (two objects, counts) are never in a mode, and captions never name one."""
    import tiny_pretrain

    rng = np.random.default_rng(0)
    kinds = {"ocr": 'a red sign that says "K"', "one": "a photo of a red circle", "big": "a photo of a big red circle",
             "two": "a photo of a red circle and a blue ring on a gray background", "count": "a photo of two red circles"}
    shares = {k: np.mean([tiny_pretrain._mode(p, rng, {"faint": 0.7, "washed": 0.6, "small": 0.5}) is not None for _ in range(2000)]) for k, p in kinds.items()}
    assert abs(shares["ocr"] - 0.7) < 0.04 and abs(shares["one"] - 0.6) < 0.04 and abs(shares["big"] - 0.5) < 0.04
    assert shares["two"] == shares["count"] == 0
    assert all(tiny_pretrain._mode(p, rng, {}) is None for p in kinds.values())


# -----------------------------------------------------------------------------
# v4: modes that change what is legible, not its colour (issue #38)

@pytest.mark.parametrize("task,mode,drop", [("ocr", "broken", 0.9), ("geneval", "ghost", 0.9), ("geneval", "melted", 0.8),
                                            ("deqa", "blurred", 0.9)])
def test_each_v4_mode_fails_its_task_and_is_detected_by_how_it_is_drawn(task, mode, drop):
    """A glyph with half its strokes missing is no glyph, an object washed almost into the background (a ghost) is
    no object, a melted object is no shape, a blurred image is no quality image: each task's reward drops, and
    tiny_world.drawn_mode (no palette threshold) finds every such image and no ground-truth one. The broken glyph
    and the melted object keep their edges, and deqa does not mind them; a ghost leaves no edge, and deqa's
    content term scores the empty image 0 as it scores a blank one."""
    prompts = tw.read_prompts(task, "test")[:N]
    truth = truth_of(prompts)
    moded = tw.render_batch(prompts, np.random.default_rng(0), [mode] * len(prompts))
    modes = dict(tw.TASK_MODES, **{task: mode})
    assert not tw.drawn_mode(task, truth, prompts, modes).any() and tw.drawn_mode(task, moded, prompts, modes).all()
    assert tw.score(task, moded, prompts).mean() < tw.score(task, truth, prompts).mean() - drop
    if mode in ("broken", "melted"):
        assert tw.score("deqa", moded, prompts).mean() > tw.score("deqa", truth, prompts).mean() - 0.05
    if mode == "ghost":
        assert tw.score("deqa", moded, prompts).mean() < 0.1


def test_pretraining_draws_each_v4_mode_at_its_share():
    """tiny_pretrain's --broken / --melted / --ghost (sharing one draw with --faint / --washed) and --blurred,
    which blurs any scene that the other modes left crisp."""
    import tiny_pretrain

    rng = np.random.default_rng(0)
    kinds = {"ocr": 'a red sign that says "K"', "one": "a photo of a red circle", "big": "a photo of a big red circle",
             "two": "a photo of a red circle and a blue ring on a gray background"}
    draws = {k: [tiny_pretrain._mode(p, rng, dict(faint=0.2, small=0.5, broken=0.5, melted=0.2, blurred=0.4, ghost=0.4))
                 for _ in range(4000)] for k, p in kinds.items()}
    share = lambda k, m: np.mean([d == m for d in draws[k]])  # noqa: E731
    assert abs(share("ocr", "faint") - 0.2) < 0.03 and abs(share("ocr", "broken") - 0.5) < 0.03
    assert abs(share("ocr", "blurred") - 0.3 * 0.4) < 0.03 and abs(share("one", "melted") - 0.2) < 0.03
    assert abs(share("one", "ghost") - 0.4) < 0.03
    assert abs(share("big", "small") - 0.5) < 0.03 and abs(share("two", "blurred") - 0.4) < 0.03
    assert share("two", None) + share("two", "blurred") == 1
