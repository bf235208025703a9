"""
A synthetic text-to-image world in which the whole Flow-OPD method runs on a CPU in minutes.

32x32 RGB scenes of coloured shapes and one-glyph signs, drawn procedurally from a caption grammar of ~60
words. Four tasks mirror the paper's rewards with real, hand-written scorers:
  geneval    strict per-prompt correctness (colour segmentation + connected components + shape test)
  ocr        template-matching recogniser for the file's 3x5 font, Flow-GRPO's edit-distance reward
  deqa       no-reference quality: sharp edges, clean flat regions, some content
  pickscore  a fixed "human preference": big, centred, colourful, contrasting, clean subjects
Since v3 (issue #29) each task's headroom is mostly an unnamed rendering mode that the pretraining data holds
and the base therefore draws some of the time, over content the base draws right when it draws crisply. v4
(issue #38) draws modes that change what is legible, which any reader fails (TASK_MODES: glyphs with strokes
missing, objects washed almost into the background, small subjects, blur), where v3's faint glyphs and washed-out
objects sat in the rewards' palette blind spots. drawn_mode finds each mode from how the image is drawn, with
no threshold of the rewards (in_mode, v3's test, is the rewards' own).
The "VAE" is an exact invertible pixel-unshuffle (or, for a base that carries one, a frozen learnt
autoencoder: load_codec, issue #19's pilot B), the "text encoder" a frozen word embedding, and the
denoiser is diffusers' SD3Transformer2DModel with a ~2.3M-parameter config.

Its commands (writing the prompt files, pretraining the base, calibrating the rewards) are in
tiny_pretrain.py. This file imports only torch, numpy, scipy, diffusers and the stdlib: it is the
ground floor.
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# settings
IMAGE_SIZE = 32                 # pixels per side
LATENT_SHAPE = (12, 16, 16)     # pixel-unshuffle x2 of (3, 32, 32)
TASKS = ("geneval", "ocr", "deqa", "pickscore")
MAX_TOKENS = 16                 # L: text tokens per prompt (captions are <= 16 tokens)
TEXT_DIM = 64                   # D: per-token embedding width (joint_attention_dim)
POOLED_DIM = 64                 # P: pooled embedding width (pooled_projection_dim)
TEXT_SEED = 1234                # seed of the frozen word-embedding table (also stored in the checkpoint)
SHIFT = 1.0                     # sigma-schedule shift. 1.0, not SD3's 3.0: in pixel space the SDE's last
                                # steps' noise stays in the image (no VAE decoder smooths it), and shift 3
                                # makes those steps large (measured: pickscore of SDE samples 0.42 at shift 1,
                                # 0.00 at shift 3, a = 0.7; ODE samples score alike at both)
DEFAULT_NOISE_LEVEL = 0.7       # SDE noise a for RL, as on SD3 ...
DEFAULT_SDE_WINDOW = 2          # ... but only on a window of 2 of the 10 steps (Flow-GRPO-Fast; sde.sde_window_steps).
                                # With noise on every step the samples keep late-step grain (no VAE decoder
                                # smooths pixels); with a window they are ODE-clean and differ in composition.
                                # Measured (four-run base), 12-epoch deqa experts: 0.775 full SDE, 0.813 window, base 0.785
                                # (docs/NOTES.md, "Pixel-space departures: the 2-step SDE window", has the commands).
DEFAULT_STEPS_EVAL = 20         # Euler ODE steps for evaluation
DEFAULT_GUIDANCE = 3.0          # classifier-free guidance scale (4.5 over-saturates this tiny base)
HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "assets", "tiny_base.safetensors")
PROMPT_DIR = os.path.join(HERE, "prompts", "tiny")

# -----------------------------------------------------------------------------
# vocabulary, palette, font

COLOURS = {  # object colours (RGB in [0,1]); pairwise far apart so nearest-colour segmentation is exact
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10), "white": (0.95, 0.95, 0.95), "purple": (0.65, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90), "orange": (1.00, 0.55, 0.05),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.35, 0.35, 0.38), "brown": (0.40, 0.25, 0.15)}
SHAPES = ("circle", "square", "triangle", "ring")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
SIGN_COLOURS = ("red", "green", "blue", "purple")  # never white: the text is white

# 3x5 bitmap font. v3 draws one glyph a sign at 4x (12x20 px), its cells on the transformer's 4-px token grid;
# v1 drew 1-2 glyphs at 3x anywhere, and its base read them 0.46 (one glyph) and 0.25 (two) of the time. Every
# glyph touches its left and right columns, so a glyph is always exactly 3 cells wide and the recogniser can cut
# cells by width alone; look-alikes (0/O, 1/I, 5/S, 8/B) are left out on purpose.
FONT_V1 = {
    "A": [".#.", "#.#", "###", "#.#", "#.#"], "C": ["###", "#..", "#..", "#..", "###"],
    "E": ["###", "#..", "###", "#..", "###"], "F": ["###", "#..", "##.", "#..", "#.."],
    "H": ["#.#", "#.#", "###", "#.#", "#.#"], "K": ["#.#", "##.", "#..", "##.", "#.#"],
    "L": ["#..", "#..", "#..", "#..", "###"], "P": ["##.", "#.#", "##.", "#..", "#.."],
    "T": ["###", ".#.", ".#.", ".#.", ".#."], "U": ["#.#", "#.#", "#.#", "#.#", "###"],
    "X": ["#.#", "#.#", ".#.", "#.#", "#.#"], "Y": ["#.#", "#.#", ".#.", ".#.", ".#."],
    "2": ["##.", "..#", ".#.", "#..", "###"], "3": ["##.", "..#", ".##", "..#", "##."],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "7": ["###", "..#", ".#.", "#..", "#.."],
}
# v3: the signs use the 8 glyphs that differ most (every two in at least 4 of the 15 cells; the v1 font's
# closest pairs, C/E, C/L, F/P, H/U, H/X, differ in 2), so that a glyph the base draws nearly right is read right.
# The vocabulary keeps all 16 glyph words, so that the v1 base's word table still fits.
FONT = {g: FONT_V1[g] for g in "AKLTY347"}
GLYPHS = "".join(FONT)
GLYPH_SCALE, GLYPH_GAP = 4, 4   # v3: a font cell is 4x4 px, one image token of the transformer (2x2 latent patch)
MAX_GLYPHS = 1      # v3: one 12x20-px glyph a sign, placed on the 4-px token grid, so that the base draws it well
TEMPLATES = np.array([[[c == "#" for c in row] for row in FONT[g]] for g in GLYPHS], np.float32)  # (8, 5, 3)

WORDS = (["<pad>", "a", "an", "photo", "of", "and", "left", "right", "above", "below", "big", "on",
          "background", "sign", "that", "says", '"'] + list(COLOURS) + list(BACKGROUNDS) + list(SHAPES)
         + [s + "s" for s in SHAPES] + list(NUMBERS) + list(FONT_V1))
WORD_ID = {w: i for i, w in enumerate(WORDS)}

# Held-out compositions: never in pretraining or the train/test splits, only in ood_test.txt.
OOD_PAIRS = {("cyan", "triangle"), ("orange", "square"), ("purple", "ring")}   # colour binding
OOD_COOCCUR = {"ring", "triangle"}                                              # shapes together
OOD_RELATION = ("triangle", "above", "circle")                                  # spatial
OOD_COUNTS = {(4, "triangle"), (3, "ring")}                                     # numeracy
OOD_CATEGORIES = ("colour", "shape", "spatial", "numeracy")

# -----------------------------------------------------------------------------
# caption grammar: tokenise and parse (the rewards read everything from the prompt text)

def tokenize(prompt):
    """Words outside quotes (lower-cased) and single characters inside them; unknown -> ValueError."""
    tokens, parts = [], prompt.split('"')
    if len(parts) not in (1, 3):
        raise ValueError(f"unbalanced quotes in prompt {prompt!r}")
    for k, part in enumerate(parts):
        if k == 1:  # quoted text: one token per glyph of the font
            bad = [c for c in part.replace(" ", "") if c not in FONT]
            if bad:
                raise ValueError(f"unknown glyph {bad[0]!r} in prompt {prompt!r} (the font has {GLYPHS})")
            tokens += ['"'] + list(part.replace(" ", "")) + ['"']
        else:
            tokens += part.lower().split()
    for t in tokens:
        if t not in WORD_ID or t == "<pad>":
            raise ValueError(f"unknown word {t!r} in prompt {prompt!r}")
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"prompt has {len(tokens)} tokens > {MAX_TOKENS}: {prompt!r}")
    return tokens


def _object(words, i):
    """Parse `a|an|two.. [big] [colour] shape[s]` at words[i]; returns (object dict, next index)."""
    if words[i] not in ("a", "an") and words[i] not in NUMBERS:
        raise ValueError
    count = NUMBERS.get(words[i], 1)
    i += 1
    big = words[i] == "big"
    i += big
    colour = words[i] if words[i] in COLOURS else None
    i += colour is not None
    shape = words[i]
    if count > 1 and shape.endswith("s"):
        shape = shape[:-1]
    if shape not in SHAPES or (count > 1) != words[i].endswith("s"):
        raise ValueError
    return dict(count=count, big=big, colour=colour, shape=shape), i + 1


def parse(prompt):
    """Prompt -> scene spec: {kind, objects, relation, text, background}. Raises ValueError."""
    tokens = tokenize(prompt)
    if "sign" in tokens[:3]:  # a [colour] sign that says "X" [on a <bg> background]
        background, sign = None, None
        if tokens[-4:-2] == ["on", "a"] and tokens[-1] == "background" and tokens[-2] in BACKGROUNDS:
            background, tokens = tokens[-2], tokens[:-4]
        if tokens[1] in SIGN_COLOURS:
            sign, tokens = tokens[1], tokens[:1] + tokens[2:]
        text = "".join(tokens[5:-1])
        if (tokens[:5] != ["a", "sign", "that", "says", '"'] or tokens[-1] != '"'
                or not 1 <= len(text) <= MAX_GLYPHS):
            raise ValueError(f"cannot parse sign prompt {prompt!r}")
        return dict(kind="ocr", objects=[], relation=None, text=text, background=background, sign=sign)
    words = tokens
    try:
        assert words[:3] == ["a", "photo", "of"]
        background = None
        if words[-4:-2] == ["on", "a"] and words[-1] == "background" and words[-2] in BACKGROUNDS:
            background, words = words[-2], words[:-4]
        first, i = _object(words, 3)
        objects, relation = [first], None
        if i < len(words):
            rel = " ".join(words[i:i + 2]) if words[i] in ("left", "right") else words[i]
            assert rel == "and" or rel in RELATIONS
            second, i = _object(words, i + len(rel.split()))
            assert first["count"] == 1 and second["count"] == 1
            objects.append(second)
            relation = None if rel == "and" else rel
        assert i == len(words)
    except (AssertionError, ValueError, IndexError):
        raise ValueError(f"cannot parse prompt {prompt!r}") from None
    return dict(kind="scene", objects=objects, relation=relation, text=None, background=background)


def geneval_category(spec):
    """GenEval's six categories, read off the spec."""
    objs = spec["objects"]
    if len(objs) == 2:
        if spec["relation"]:
            return "position"
        return "colour_attr" if objs[0]["colour"] or objs[1]["colour"] else "two_object"
    if objs[0]["count"] > 1:
        return "counting"
    return "colors" if objs[0]["colour"] else "single_object"


def held_out(spec):
    """The held-out compositions a spec contains, as a list of OOD categories (empty: in-distribution)."""
    objs, found = spec["objects"], []
    if any((o["colour"], o["shape"]) in OOD_PAIRS for o in objs):
        found.append("colour")
    if {o["shape"] for o in objs} == OOD_COOCCUR:
        found.append("shape")
    if len(objs) == 2 and (objs[0]["shape"], spec["relation"], objs[1]["shape"]) == OOD_RELATION:
        found.append("spatial")
    if any((o["count"], o["shape"]) in OOD_COUNTS for o in objs):
        found.append("numeracy")
    return found


def ood_category(spec):
    """The OOD category of a spec (its first held-out composition), None if in-distribution."""
    found = held_out(spec)
    return found[0] if found else None

# -----------------------------------------------------------------------------
# prompt generators (one per task) and the split files

def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _phrase(colour, shape, big=False):
    words = (["big"] if big else []) + ([colour] if colour else []) + [shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _one_object_prompt(spec, count=1):
    """The prompt of `count` of a spec's first object alone, on the spec's background."""
    o, bg = spec["objects"][0], f" on a {spec['background']} background" if spec["background"] else ""
    if count == 1:
        return f"a photo of {_phrase(o['colour'], o['shape'], o['big'])}{bg}"
    words = [list(NUMBERS)[count - 1]] + (["big"] if o["big"] else []) + ([o["colour"]] if o["colour"] else []) + [o["shape"] + "s"]
    return f"a photo of {' '.join(words)}{bg}"


def _geneval_prompt(rng, category, bg_all=False):
    c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
    s1, s2 = rng.choice(SHAPES, 2, replace=False)
    bg = f" on a {rng.choice(list(BACKGROUNDS))} background" if rng.random() < 0.5 else ""
    if category == "single_object":  # backgrounds only widen these two small categories
        return f"a photo of {_phrase(None, s1)}{bg}"
    if category == "colors":
        return f"a photo of {_phrase(c1, s1)}" + (bg if bg_all else "")
    if category == "counting":
        n = int(rng.integers(2, 5))
        colour = f"{c1} " if rng.random() < 0.5 else ""
        return f"a photo of {list(NUMBERS)[n - 1]} {colour}{s1}s"
    if category == "two_object":
        return f"a photo of {_phrase(None, s1)} and {_phrase(None, s2)}{bg}"
    if category == "colour_attr":
        return f"a photo of {_phrase(c1, s1)} and {_phrase(c2, s2)}"
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    return f"a photo of {_phrase(c1, s1)} {rel} {_phrase(c2, s2)}"


GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "colour_attr")


V3_GENEVAL = ("single_object", "colors")  # v3: GenEval's task prompts are its one-object categories, which the base
                                          # draws well when it draws crisply (pretraining still sees all six)


def _raw_prompt(task, rng, geneval_mix=None):
    """One prompt of a caption source: a task of TASKS, or "geneval-task" (the GenEval task's one-object
    prompts, V3_GENEVAL). As a caption source, "geneval" is the pretraining grammar of all six categories;
    the GenEval task's prompt files are drawn from "geneval-task" (write_prompt_files)."""
    if task == "geneval-task":
        return _geneval_prompt(rng, V3_GENEVAL[rng.integers(2)], bg_all=True)
    if task == "geneval":  # categories equally likely unless geneval_mix gives their odds {category: weight}
        if geneval_mix:
            w = np.array([geneval_mix.get(c, 0.0) for c in GENEVAL_CATEGORIES], np.float64)
            return _geneval_prompt(rng, GENEVAL_CATEGORIES[rng.choice(len(w), p=w / w.sum())])
        return _geneval_prompt(rng, GENEVAL_CATEGORIES[rng.integers(len(GENEVAL_CATEGORIES))])
    if task == "ocr":  # v3: one glyph; the sign's colour and the background sometimes named
        sign = f"a {rng.choice(SIGN_COLOURS)} sign" if rng.random() < 0.7 else "a sign"
        bg = f" on a {rng.choice(list(BACKGROUNDS))} background" if rng.random() < 0.6 else ""
        return f'{sign} that says "{rng.choice(list(GLYPHS))}"{bg}'
    bg = f" on a {rng.choice(list(BACKGROUNDS))} background" if rng.random() < 0.6 else ""
    c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
    s1, s2 = rng.choice(SHAPES, 2, replace=False)
    if task == "deqa":  # v3: free scene descriptions, disjoint from GenEval's: two coloured objects on a named background
        bg = f" on a {rng.choice(list(BACKGROUNDS))} background"
        return f"a photo of {_phrase(c1, s1)} and {_phrase(c2, s2)}{bg}"
    if task == "pickscore":  # big subjects in saturated colours: what the preference score likes
        c1 = rng.choice([c for c in COLOURS if c != "white"])
        return f"a photo of {_phrase(c1, s1, big=True)}{bg}"
    raise ValueError(f"unknown task {task!r}")


def make_prompt(task, rng, geneval_mix=None):
    """A fresh in-distribution prompt of a task (held-out OOD compositions are rejected); geneval_mix:
    the odds of GenEval's categories (default: equal)."""
    while True:
        prompt = _raw_prompt(task, rng, geneval_mix)
        if ood_category(parse(prompt)) is None:
            return prompt


def _ood_prompt(rng, category):
    """A candidate prompt built around the held-out composition of a category."""
    colours = list(COLOURS)
    if category == "colour":
        c, s = sorted(OOD_PAIRS)[rng.integers(len(OOD_PAIRS))]
        if rng.random() < 0.3:
            return f"a photo of {_phrase(c, s)}"
        return f"a photo of {_phrase(c, s)} and {_phrase(rng.choice(colours), rng.choice(SHAPES))}"
    if category == "shape":
        if rng.random() < 0.1:
            return "a photo of a ring and a triangle"
        return f"a photo of {_phrase(rng.choice(colours), 'ring')} and {_phrase(rng.choice(colours), 'triangle')}"
    if category == "spatial":
        return f"a photo of {_phrase(rng.choice(colours), 'triangle')} above {_phrase(rng.choice(colours), 'circle')}"
    n, s = sorted(OOD_COUNTS)[rng.integers(len(OOD_COUNTS))]
    colour = f"{rng.choice(colours)} " if rng.random() < 0.8 else ""
    return f"a photo of {list(NUMBERS)[n - 1]} {colour}{s}s"


def _ood_prompts(rng, per_category=32):
    """Distinct prompts per category, each holding exactly one held-out composition."""
    out = []
    for category in OOD_CATEGORIES:
        found = []
        for _ in range(100 * per_category):
            p = _ood_prompt(rng, category)
            if p not in found and held_out(parse(p)) == [category]:
                found.append(p)
            if len(found) == per_category:
                break
        out += found
    return out


SPLIT_SIZES = {"geneval": (68, 64), "ocr": (96, 64), "deqa": (300, 64), "pickscore": (70, 30)}  # (train, test)
# pickscore's grammar (big subject x colour x shape x background) has only ~100 distinct prompts


def write_prompt_files(seed=0):
    """Deterministic train/test splits; test prompts never appear in train."""
    os.makedirs(PROMPT_DIR, exist_ok=True)
    for k, task in enumerate(TASKS):
        rng = np.random.default_rng(seed * 100 + k)
        n_train, n_test = SPLIT_SIZES[task]
        if task == "geneval":  # v3: every distinct one-object prompt, every k-th to test
            seen = []
            for _ in range(20000):
                p = make_prompt("geneval-task", rng)
                if p not in seen:
                    seen.append(p)
            seen.sort()
            rng.shuffle(seen)
            assert len(seen) >= n_train + n_test, f"{task}: only {len(seen)} distinct prompts"
            test, train = seen[:n_test], seen[n_test:n_test + n_train]
        else:
            seen = []
            for _ in range(100 * (n_train + n_test)):
                p = make_prompt(task, rng)
                if p not in seen:
                    seen.append(p)
                if len(seen) == n_train + n_test:
                    break
            assert len(seen) == n_train + n_test, f"{task}: only {len(seen)} distinct prompts"
            # every k-th distinct prompt goes to test: common (short) prompts come first, so a plain
            # head/tail cut would leave test with only the rare ones
            k = len(seen) // n_test
            test = seen[::k][:n_test]
            train = [p for p in seen if p not in test]
        for split, lst in (("train", train), ("test", test)):
            with open(os.path.join(PROMPT_DIR, f"{task}_{split}.txt"), "w") as f:
                f.write("\n".join(lst) + "\n")
    with open(os.path.join(PROMPT_DIR, "ood_test.txt"), "w") as f:
        f.write("\n".join(_ood_prompts(np.random.default_rng(seed + 99))) + "\n")


def read_prompts(task, split):
    """task in TASKS or "ood" (only split "test" exists for ood)."""
    name = "ood_test" if task == "ood" else f"{task}_{split}"
    with open(os.path.join(PROMPT_DIR, f"{name}.txt")) as f:
        return [line.strip() for line in f if line.strip()]

# -----------------------------------------------------------------------------
# web-like noise in pretraining data (tiny world v2 pilot): captions that do not quite match their image,
# and images of lower quality than their caption says. The base then draws cleanly but does not always
# follow its prompt, and its images are of mixed quality, as SD3.5-M's are after web pretraining.

NEIGHBOUR_COLOUR = {c: min((d for d in COLOURS if d != c), key=lambda d: sum((a - b) ** 2 for a, b in zip(COLOURS[c], COLOURS[d])))
                    for c in COLOURS}  # the nearest other colour in RGB: the colour a careless caption names


def corrupt_caption(prompt, rng):
    """A caption with one alt-text-like error about its image: a colour named for its nearest neighbour,
    a count off by one, a wrong or missing glyph, or the second object left out. Returns a caption that
    parses and holds no held-out composition, or the prompt itself when no such error exists."""
    spec, words = parse(prompt), prompt.split(" ")
    options = []
    if spec["kind"] == "ocr":
        text = spec["text"]
        wrong = [text[:i] + g + text[i + 1:] for i in range(len(text)) for g in GLYPHS if g != text[i]]
        options += wrong + ([text[1:], text[:1]] if len(text) == 2 else [])
        options = [prompt.replace(f'"{text}"', f'"{x}"') for x in options]
    else:
        for i, w in enumerate(words):
            if w in COLOURS:
                new = words[:i] + [NEIGHBOUR_COLOUR[w]] + words[i + 1:]
                if new[i - 1] in ("a", "an"):
                    new[i - 1] = _article(new[i])
                options.append(" ".join(new))
            if w in ("two", "three", "four"):
                for n in (NUMBERS[w] - 1, NUMBERS[w] + 1):
                    if 2 <= n <= 4:
                        options.append(" ".join(words[:i] + [list(NUMBERS)[n - 1]] + words[i + 1:]))
        if len(spec["objects"]) == 2:  # "a photo of X and|rel Y [on a ... background]" -> "a photo of X [on ...]"
            options.append(_one_object_prompt(spec))
    options = [c for c in options if ood_category(parse(c)) is None]
    return options[rng.integers(len(options))] if options else prompt


def omit_from_scene(prompt, rng):
    """The prompt of an image that leaves out one thing its caption names, as web images leave out what
    their alt-text mentions: the second object, one of a count, or one glyph of a two-glyph sign.
    Rendered under the original caption, it teaches a base to leave things out for every kind of prompt
    alike. Returns the prompt itself when nothing can be left out (one object, one glyph)."""
    spec = parse(prompt)
    if spec["kind"] == "ocr":
        text = spec["text"]
        return f'a sign that says "{text[rng.integers(2)]}"' if len(text) == 2 else prompt
    if len(spec["objects"]) == 2:
        return _one_object_prompt(spec)
    count = spec["objects"][0]["count"]
    fewer = _one_object_prompt(spec, count - 1) if count > 1 else prompt
    return fewer if ood_category(parse(fewer)) is None else prompt  # four rings -> three: held out


def _ndimage():
    """scipy.ndimage, imported where the tiny world's image maths needs it: rewards.py imports this module for
    its edit distance on the SD3 path too, where scipy is not installed."""
    from scipy import ndimage

    return ndimage


def degrade(image, rng):
    """One web-like quality fault of an image (3, H, W) in [0, 1], never named by its caption: blur,
    sensor noise, low contrast, or blocky compression."""
    kind = rng.integers(4)
    x = image.numpy()
    if kind == 0:
        x = _ndimage().gaussian_filter(x, (0, rng.uniform(0.6, 1.2), rng.uniform(0.6, 1.2)))
    elif kind == 1:
        x = x + rng.normal(0, rng.uniform(0.04, 0.10), x.shape)
    elif kind == 2:
        x = 0.5 + (x - 0.5) * rng.uniform(0.4, 0.65)
    else:  # 4x4 blocks averaged, as a harsh JPEG does
        h, w = x.shape[1:]
        x = x.reshape(3, h // 4, 4, w // 4, 4).mean((2, 4)).repeat(4, 1).repeat(4, 2)
    return torch.from_numpy(np.clip(x, 0, 1).astype(np.float32))


# -----------------------------------------------------------------------------
# renderer: a ground-truth scene for a prompt

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres


def _shape_mask(shape, cx, cy, r):
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.5 * r) ** 2)
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    # triangle pointing up: half-width grows linearly from apex (top) to base (bottom)
    return (np.abs(dx) <= (dy + r) / 2) & (dy <= r) & (dy >= -r)


def _background(rng, name):
    """A plain colour with a faint smooth texture (amplitude well below the rewards' thresholds)."""
    base = np.array(BACKGROUNDS[name or rng.choice(list(BACKGROUNDS))], np.float32)
    tex = _ndimage().gaussian_filter(rng.normal(size=(IMAGE_SIZE, IMAGE_SIZE)), 2.0)
    tex *= 0.025 / (tex.std() + 1e-8)
    return np.clip(base + tex[..., None], 0, 1)


def _place(rng, r, placed):
    """Rejection-sample a centre for radius r, 2 px clear of the placed (x, y, r) and inside the image."""
    for _ in range(200):
        cx, cy = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2)
        if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
            return cx, cy
    return None


MODES = ("faint", "washed", "small", "broken", "melted", "blurred", "ghost")
# the unnamed rendering modes of web-like data (tiny_pretrain.py --faint/--washed/...): v3's faint glyphs and
# washed objects sit in the tiny rewards' palette blind spots (docs/TINY_WORLD.md: a colour-agnostic reader reads
# them all), so v4 draws modes that change what is legible instead: a glyph with strokes missing ("broken"), an
# object washed almost into the background ("ghost"), the whole image out of focus ("blurred"); and "melted", an
# object whose outline has melted into a blob (tried and dropped: docs/TINY_WORLD.md)


def render(prompt, rng, mode=None):
    """A ground-truth scene for a prompt: uint8 (32, 32, 3). Deterministic given the rng state.
    mode: None (crisp), "small" (a big subject drawn at an ordinary object's size, off-centre), "faint" (a sign's glyph blended 35-55% from the sign's colour toward white: plainly
    visible, but not white, as low-contrast text defeats a real OCR engine) or "washed" (each object's colour
    blended 55-70% toward the background: no detector finds an object of the named colour)."""
    return render_at(prompt, rng, mode)


MODE_RANGES = {"faint": (0.35, 0.55), "washed": (0.55, 0.70), "small": (5.0, 6.5),  # render's strength draws, v3
               "broken": (0.35, 0.55), "melted": (0.8, 1.0), "blurred": (0.9, 1.4), "ghost": (0.88, 0.95)}  # v4
# faint: the share of the way from the sign's colour to white the glyph's ink goes (1 = crisp white);
# washed, ghost: the share of the way each object's paint goes toward the background's mean (0 = crisp; a ghost
# is washed almost into the background, past where a colour-agnostic segmentation still finds it);
# small: the radius in pixels of a "big" subject (crisp: 10-12.5, centred);
# broken: the share of the glyph's strokes (its template's 4x4-px cells) that are drawn (1 = crisp);
# melted: how far the blob is drawn out along its axis, as a share of the object's radius (_blob_mask);
# blurred: the Gaussian blur's sigma in pixels over the whole image (0 = crisp)


def _strength(rng, mode, strength):
    """A mode's strength: the one given, else a draw from MODE_RANGES (render's)."""
    return rng.uniform(*MODE_RANGES[mode]) if strength is None else strength


def render_at(prompt, rng, mode=None, strength=None):
    """render() with a mode's strength fixed (issue #38, the v4 design sweep): strength None draws it from
    MODE_RANGES, as render always has (the same rng draws, so the same bytes)."""
    spec = parse(prompt)
    while True:  # retry the rare layouts where objects do not fit
        img = _draw(spec, rng, mode, strength)
        if img is not None:
            if mode == "blurred":
                sigma = _strength(rng, "blurred", strength)
                img = _ndimage().gaussian_filter(img, (sigma, sigma, 0), mode="nearest")
            return (img * 255).round().astype(np.uint8)


def _draw(spec, rng, mode=None, strength=None):
    img = _background(rng, spec["background"])
    if spec["kind"] == "ocr":  # the glyph on the 4-px token grid, the sign 4 px around it
        w, h = len(spec["text"]) * (3 * GLYPH_SCALE + GLYPH_GAP) - GLYPH_GAP, 5 * GLYPH_SCALE
        x0 = GLYPH_SCALE * int(rng.integers(1, (IMAGE_SIZE - w) // GLYPH_SCALE))
        y0 = GLYPH_SCALE * int(rng.integers(1, (IMAGE_SIZE - h) // GLYPH_SCALE))
        sign = np.array(COLOURS[spec.get("sign") or SIGN_COLOURS[rng.integers(4)]], np.float32)
        img[y0 - 4:y0 + h + 4, x0 - 4:x0 + w + 4] = sign
        ink = np.array(COLOURS["white"], np.float32)
        if mode == "faint":
            ink = sign + _strength(rng, "faint", strength) * (ink - sign)
        for k, ch in enumerate(spec["text"]):
            cells = np.array(TEMPLATES[GLYPHS.index(ch)])
            if mode == "broken":  # keep a share of the strokes, at least one: the glyph is there but illegible
                on = np.flatnonzero(cells)
                keep = _strength(rng, "broken", strength)
                cells = np.zeros_like(cells)
                cells.flat[rng.choice(on, max(1, int(round(keep * len(on)))), replace=False)] = 1
            glyph = np.kron(cells, np.ones((GLYPH_SCALE, GLYPH_SCALE)))
            xs = x0 + k * (3 * GLYPH_SCALE + GLYPH_GAP)
            img[y0:y0 + h, xs:xs + 3 * GLYPH_SCALE][glyph > 0] = ink
        return img
    objs = spec["objects"]
    if objs[0]["big"]:  # one big centred subject (mode "small": drawn at an ordinary object's size, off-centre)
        o, r = objs[0], rng.uniform(10, 12.5)
        c = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, size=2)
        if mode == "small":
            r = _strength(rng, "small", strength)
            c = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2)
        img[_shape_mask(o["shape"], c[0], c[1], r)] = COLOURS[o["colour"]]
        return img
    bg = img.mean((0, 1))
    items = [(o["colour"], o["shape"]) for o in objs for _ in range(o["count"])]
    colours = [c or rng.choice(list(COLOURS)) for c, _ in items]
    radii = [rng.uniform(5.0, 6.5) if s == "ring" else rng.uniform(4.5, 6.0) for _, s in items]
    placed = []
    for k, ((_, shape), colour, r) in enumerate(zip(items, colours, radii)):
        pos = _place(rng, r, placed)
        if pos is None:
            return None
        if k == 1 and spec["relation"]:  # re-sample the second object until the relation holds clearly
            for _ in range(200):
                if _relation_holds(spec["relation"], placed[0][:2], pos, margin=4):
                    break
                pos = _place(rng, r, placed)
                if pos is None:
                    return None
            else:
                return None
        placed.append((pos[0], pos[1], r))
        paint = np.array(COLOURS[colour], np.float32)
        if mode in ("washed", "ghost"):
            paint = paint + _strength(rng, mode, strength) * (bg - paint)
        if mode == "melted":
            img[_blob_mask(rng, pos[0], pos[1], r, _strength(rng, "melted", strength))] = paint
        else:
            img[_shape_mask(shape, pos[0], pos[1], r)] = paint
    return img


def _blob_mask(rng, cx, cy, r, stretch):
    """A melted object: an ellipse at a random angle, drawn out to (1 + stretch) r along it and squeezed to 0.5 r
    across, with two lobes of radius 0.4 r on its rim. Its area is about an object's, but its outline is no
    shape's (below MIN_SHAPE_IOU for each of SHAPES, circles included)."""
    a = rng.uniform(0, np.pi)
    u, v = (_XX - cx) * np.cos(a) + (_YY - cy) * np.sin(a), -(_XX - cx) * np.sin(a) + (_YY - cy) * np.cos(a)
    mask = (u / ((1 + stretch) * r)) ** 2 + (v / (0.5 * r)) ** 2 <= 1
    for b in rng.uniform(0, 2 * np.pi, 2):
        mask |= _shape_mask("circle", cx + 0.6 * r * np.cos(b), cy + 0.6 * r * np.sin(b), 0.4 * r)
    return mask


def _relation_holds(relation, a, b, margin):
    """Is object a `relation` object b? (x right, y down); centroids, margin in pixels."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[relation]


def render_batch(prompts, rng, modes=None):
    """Ground-truth scenes as a float tensor (B, 3, 32, 32) in [0, 1]; modes: one render mode a prompt."""
    imgs = np.stack([render(p, rng, m) for p, m in zip(prompts, modes or [None] * len(prompts))])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255

# -----------------------------------------------------------------------------
# the "VAE" and the "text encoder"

def images_to_latents(images):
    """(B,3,32,32) in [0,1] -> (B,12,16,16) in [-1,1]; exact and invertible."""
    return F.pixel_unshuffle(images, 2) * 2 - 1


def latents_to_images(latents):
    return F.pixel_shuffle((latents + 1) / 2, 2).clamp(0, 1)


def build_autoencoder(channels, width=64):
    """A learnt "VAE" (tiny world v2 pilot B, bench/pilot_autoencoder.py): an encoder 3x32x32 pixels ->
    channels x 8 x 8 and its mirror decoder (sigmoid pixels in [0, 1]). channels = 4 is SD3's 12x
    compression (16 latent channels for each 8x8x3 pixels). Returns (encoder, decoder)."""
    act = torch.nn.SiLU
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, width // 2, 3, padding=1), act(),
        torch.nn.Conv2d(width // 2, width, 4, stride=2, padding=1), act(),            # 16x16
        torch.nn.Conv2d(width, width, 3, padding=1), act(),
        torch.nn.Conv2d(width, width, 4, stride=2, padding=1), act(),                 # 8x8
        torch.nn.Conv2d(width, channels, 1))
    decoder = torch.nn.Sequential(
        torch.nn.Conv2d(channels, width, 3, padding=1), act(),
        torch.nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), act(),        # 16x16
        torch.nn.Conv2d(width, width, 3, padding=1), act(),
        torch.nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), act(),   # 32x32
        torch.nn.Conv2d(width // 2, 3, 3, padding=1), torch.nn.Sigmoid())
    return encoder, decoder


def load_codec(state):
    """The world's image <-> latent maps for a base checkpoint's tensors (or its path): the exact
    pixel-unshuffle, or, when the base carries one (vae.* tensors), a frozen learnt autoencoder whose
    latents are normalised as SD3's are, z = (encoder(x) - vae.shift) * vae.scale. Returns a namespace
    (encode, decode, shape); decode clamps to [0, 1]."""
    from types import SimpleNamespace
    if isinstance(state, str):
        from safetensors.torch import load_file
        state = load_file(state)
    if "vae.encoder.0.weight" not in state:
        return SimpleNamespace(encode=images_to_latents, decode=latents_to_images, shape=LATENT_SHAPE)
    channels = state["vae.encoder.8.weight"].shape[0]
    encoder, decoder = build_autoencoder(channels, width=state["vae.encoder.2.weight"].shape[0])
    encoder.load_state_dict({k[len("vae.encoder."):]: v for k, v in state.items() if k.startswith("vae.encoder.")})
    decoder.load_state_dict({k[len("vae.decoder."):]: v for k, v in state.items() if k.startswith("vae.decoder.")})
    encoder.eval().requires_grad_(False), decoder.eval().requires_grad_(False)
    shift, scale = state["vae.shift"].item(), state["vae.scale"].item()

    @torch.no_grad()
    def encode(images):
        return (encoder(images.float()) - shift) * scale

    @torch.no_grad()
    def decode(latents):
        return decoder(latents.float().cpu() / scale + shift).clamp(0, 1)
    return SimpleNamespace(encode=encode, decode=decode, shape=(channels, 8, 8))


def text_tables(seed=TEXT_SEED):
    """Frozen word embeddings (random, near-orthogonal) + sinusoidal positions so order matters."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(len(WORDS), TEXT_DIM, generator=g)
    pos = torch.arange(MAX_TOKENS)[:, None] / 10000 ** (torch.arange(0, TEXT_DIM, 2) / TEXT_DIM)
    positions = torch.cat([pos.sin(), pos.cos()], dim=1)
    return {"text.words": words, "text.positions": positions}


def make_encoder(tables, device="cpu"):
    """encode_prompts(list[str]) -> (embeds (B,L,D), pooled (B,P)); "" is the unconditional prompt."""
    words, positions = tables["text.words"].to(device), tables["text.positions"].to(device)

    def encode_prompts(prompts):
        ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)  # 0 = <pad>
        for b, p in enumerate(prompts):
            toks = tokenize(p) if p else []
            ids[b, :len(toks)] = torch.tensor([WORD_ID[t] for t in toks], dtype=torch.long)
        ids = ids.to(device)
        emb = words[ids]                                        # (B, L, D)
        real = (ids > 0).float()[..., None]
        # pooled = mean of the real tokens' word vectors (a bag of words), <pad>'s vector for ""
        pooled = (emb * real).sum(1) / real.sum(1).clamp(min=1) + words[0] * (real.sum(1) == 0)
        return emb + positions, pooled
    return encode_prompts

# -----------------------------------------------------------------------------
# the denoiser

def build_transformer(latent_shape=LATENT_SHAPE):
    """SD3's MMDiT at toy size: 64 image tokens (2x2 patches of 16x16x12, or 1x1 patches of an 8x8
    autoencoder latent) + 16 text tokens."""
    from diffusers import SD3Transformer2DModel
    channels, size, _ = latent_shape
    return SD3Transformer2DModel(
        sample_size=size, patch_size=2 if size == 16 else 1, in_channels=channels, out_channels=channels, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
        caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16)  # the same 8x8 crop of
                                                                                               # positions for both


def load_base(path=CHECKPOINT, device="cpu"):
    """The pretrained base: (transformer in eval mode, encode_prompts, codec), codec its latent's
    load_codec."""
    from safetensors.torch import load_file
    state = load_file(path)
    codec = load_codec(state)
    transformer = build_transformer(codec.shape)
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    transformer.to(device).eval().requires_grad_(False)
    return transformer, make_encoder({k: v for k, v in state.items() if k.startswith("text.")}, device), codec


def sigma_schedule(steps, shift=SHIFT):
    """SD3's shifted schedule from 1 to ~0, then a final 0: steps+1 values."""
    s = torch.linspace(1, 1 / 1000, steps)
    return torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1)])


@torch.no_grad()
def sample(transformer, encode_prompts, prompts, steps=DEFAULT_STEPS_EVAL, guidance=DEFAULT_GUIDANCE,
           seed=0, shift=SHIFT, codec=None):
    """Euler ODE with classifier-free guidance (v = v_u + g (v_c - v_u)); returns images (B,3,32,32).
    codec: the base's load_codec (default: the pixel-unshuffle)."""
    decode, shape = (codec.decode, codec.shape) if codec else (latents_to_images, LATENT_SHAPE)
    device = next(transformer.parameters()).device
    emb, pooled = encode_prompts(list(prompts) + [""] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), *shape, generator=g).to(device)
    sigmas = sigma_schedule(steps, shift).to(device)
    for i in range(steps):
        t = sigmas[i].expand(2 * len(prompts))
        v = transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=emb, pooled_projections=pooled,
                        timestep=1000 * t, return_dict=False)[0]
        v_c, v_u = v.chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + guidance * (v_c - v_u))
    return decode(x)

# -----------------------------------------------------------------------------
# rewards: shared image analysis

_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32)  # (11, 3)
_N_OBJ_COLOURS = len(COLOURS)
MAX_COLOUR_DIST = 0.3   # a pixel farther than this from every palette colour is "unassigned"
MIN_OBJECT_AREA = 12    # connected components smaller than this are specks, not objects
MIN_SHAPE_IOU = 0.5     # a component must overlap its best ideal shape this much to count


def _to_hwc(images):
    """(B,3,H,W) float tensor/array in [0,1] -> float32 numpy (B,H,W,3)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 2, 3, 1))


def _colour_classes(x):
    """(B,H,W,3) -> (B,H,W) palette index, -1 where no palette colour is close."""
    d2 = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)
    cls = d2.argmin(-1)
    cls[np.take_along_axis(d2, cls[..., None], -1)[..., 0] > MAX_COLOUR_DIST ** 2] = -1
    return cls


def _components(cls):
    """The object-sized connected components of each object colour in one image: (colour, shape or None
    for a ragged blob, cx, cy) per component of at least MIN_OBJECT_AREA pixels."""
    for k, colour in enumerate(COLOURS):
        mask = cls == k
        if mask.sum() < MIN_OBJECT_AREA:
            continue
        labels, n = _ndimage().label(mask)
        for sl, lab in zip(_ndimage().find_objects(labels), range(1, n + 1)):
            comp = labels[sl] == lab
            if comp.sum() < MIN_OBJECT_AREA:
                continue
            ys, xs = np.nonzero(comp)
            yield colour, _classify_shape(labels == lab, sl), xs.mean() + sl[1].start + 0.5, ys.mean() + sl[0].start + 0.5


def _detect(cls):
    """Objects in one image: list of (colour, shape, cx, cy) from per-colour connected components."""
    return [c for c in _components(cls) if c[1]]


def _classify_shape(mask, sl):
    """Best-IoU ideal shape drawn into the component's bounding box; None below MIN_SHAPE_IOU
    (a ragged blob is not an object, as a detector's confidence threshold would say)."""
    h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
    cy, cx = (sl[0].start + sl[0].stop) / 2, (sl[1].start + sl[1].stop) / 2
    r = (w + h) / 4
    best, best_iou = None, MIN_SHAPE_IOU
    for shape in SHAPES:
        ideal = _shape_mask(shape, cx, cy, r / 0.8 if shape == "square" else r)
        iou = (ideal & mask).sum() / (ideal | mask).sum()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _matches(obj, want):
    return obj[1] == want["shape"] and (want["colour"] is None or obj[0] == want["colour"])


def _geneval_clauses(spec, found):
    """Credit per clause of the prompt, each in [0, 1]:
      object clause   1 if enough matching objects (counting: 1 - |found - n| / n, floored at 0);
                      0.5 if only the shape is right but not the named colour
      relation clause 1 if it holds between some pair of matching objects (present in both).
    GenEval's strict rule (evaluation) is "every clause is 1"; the partial credit Flow-GRPO trains
    GenEval experts with (its reward server's "scores" field) is their mean."""
    credits, matched = [], []
    for want in spec["objects"]:
        hits = [f for f in found if _matches(f, want)]
        matched.append(hits)
        if want["count"] > 1:
            c = max(0.0, 1 - abs(len(hits) - want["count"]) / want["count"])
        else:
            c = 1.0 if hits else 0.0
        if c == 0 and want["colour"] and any(f[1] == want["shape"] for f in found):
            c = 0.5
        credits.append(c)
    if spec["relation"]:
        a, b = matched
        credits.append(float(any(_relation_holds(spec["relation"], fa[2:], fb[2:], margin=1) for fa in a for fb in b)))
    return credits


def _geneval_correct(spec, found):
    """GenEval's strict rule: every clause of the prompt holds."""
    return all(c == 1.0 for c in _geneval_clauses(spec, found))


def _geneval_partial(spec, found):
    """Partial credit: the mean credit of the prompt's clauses."""
    return float(np.mean(_geneval_clauses(spec, found)))

# -----------------------------------------------------------------------------
# rewards: the four tasks

def _reward_geneval(x, specs, strict=True):
    cls = _colour_classes(x)
    rule = _geneval_correct if strict else _geneval_partial
    return np.array([float(rule(s, _detect(c))) for s, c in zip(specs, cls)])


def _recognise(white):
    """Read glyphs from a boolean (H,W) mask of text pixels: cut column runs into glyph-wide cells, then
    nearest template after block-averaging each cell to 5x3."""
    labels, n = _ndimage().label(white)
    if n == 0:
        return ""
    sizes = _ndimage().sum(white, labels, range(1, n + 1))
    white = np.isin(labels, 1 + np.nonzero(sizes >= 4)[0])  # drop specks
    cols = np.concatenate([[False], white.any(0), [False]])
    starts, ends = np.nonzero(cols[1:] & ~cols[:-1])[0], np.nonzero(~cols[1:] & cols[:-1])[0]
    text = ""
    for a, b in zip(starts, ends):
        m = max(1, round((b - a + GLYPH_GAP) / (3 * GLYPH_SCALE + GLYPH_GAP)))
        edges = np.linspace(a, b + GLYPH_GAP, m + 1)
        for k in range(m):
            lo, hi = int(round(edges[k])), max(int(round(edges[k + 1] - GLYPH_GAP)), int(round(edges[k])) + 1)
            cell = white[:, lo:hi]
            rows = np.nonzero(cell.any(1))[0]
            if len(rows) < 3:
                continue
            cell = cell[rows[0]:rows[-1] + 1].astype(np.float32)
            ry = np.minimum((np.arange(cell.shape[0]) * 5) // cell.shape[0], 4)
            rx = np.minimum((np.arange(cell.shape[1]) * 3) // cell.shape[1], 2)
            grid = np.zeros((5, 3), np.float32)
            np.add.at(grid, (ry[:, None], rx[None, :]), cell)
            grid /= np.maximum(np.bincount(ry, minlength=5)[:, None] * np.bincount(rx, minlength=3)[None, :], 1)
            d = ((TEMPLATES - grid) ** 2).sum((1, 2))
            text += GLYPHS[d.argmin()] if d.min() < 2.5 else "?"
    return text


def levenshtein(a, b):
    """Edit distance with unit costs (two-row dynamic programme); rewards.py uses this one too."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_reward(target, recognised):
    """Flow-GRPO's rule: lowercase, no spaces; distance 0 if the target is a substring."""
    target, recognised = target.lower().replace(" ", ""), recognised.lower().replace(" ", "")
    d = 0 if target in recognised else levenshtein(recognised, target)
    return 1 - min(d, len(target)) / len(target)


def _reward_ocr(x, specs):
    white = _colour_classes(x) == list(COLOURS).index("white")
    return np.array([ocr_reward(s["text"], _recognise(w)) for s, w in zip(specs, white)])


def _grain(x):
    """Per-image fraction of pixels more than 0.06 from their 3x3 median (B,H,W,3) -> (B,)."""
    return (np.abs(x - _ndimage().median_filter(x, size=(1, 3, 3, 1))).max(-1) > 0.06).mean((1, 2))


def _foreground(x):
    """(background colour (B, 3): the median of the border pixels, foreground mask (B, H, W): pixels more
    than 0.25 from it)."""
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)   # (B, 4W, 3)
    bg = np.median(border, axis=1)                                                   # (B, 3)
    return bg, np.sqrt(((x - bg[:, None, None]) ** 2).sum(-1)) > 0.25


def _quality_terms(x):
    """Per-image (clean, sharpness, content) in [0,1]. Ground truth is piecewise flat with hard
    edges: its gradients are either ~0 (texture) or large (edges); blur makes middling gradients,
    grain makes pixels disagree with their 3x3 median.
    clean = exp(-(grain - 0.005) / 0.1), grain = fraction of pixels > 0.06 from their 3x3 median. Measured
    (32 test prompts): ground truth grain 0.004, the base's ODE samples ~0.05, its SDE samples (a = 0.5,
    10 steps) ~0.18. A smooth exponential, not a hard threshold, so that the noisy SDE samples GRPO
    trains on still differ in reward within a group."""
    gx = np.abs(np.diff(x, axis=2, append=x[:, :, -1:])).max(-1)
    gy = np.abs(np.diff(x, axis=1, append=x[:, -1:])).max(-1)
    g = np.maximum(gx, gy)                                      # (B, H, W)
    edge = (g > 0.25).mean((1, 2))
    mid = ((g > 0.15) & (g <= 0.25)).mean((1, 2))  # > 0.15: faint grain (std <= 0.03) is not blur
    grain = _grain(x)
    clean = np.exp(-np.maximum(grain - 0.005, 0) / 0.1)
    sharp = np.clip(1 - (mid / (edge + mid + 1e-6) - 0.15) / 0.35, 0, 1)
    content = np.clip(edge / 0.02, 0, 1)
    return clean, sharp, content


def _reward_deqa(x, specs):
    clean, sharp, content = _quality_terms(x)
    return clean * sharp * content


def _reward_pickscore(x, specs):
    """A fixed preference: a big (>= 25% of the image), centred, colourful subject that stands out
    from the background, in the colours the prompt names, on a clean image. It dislikes small
    off-centre objects, so it fights GenEval's position/counting prompts a little. Score in [0,1]:
    sqrt(clean) * (0.85 + 0.15 sharp) * (0.3 size + 0.2 centred + 0.2 colourful + 0.15 contrast + 0.15 colour match)
    (sqrt: people mind grain less than the quality model does)."""
    bg, fg = _foreground(x)
    area = fg.mean((1, 2))
    n = np.maximum(fg.sum((1, 2)), 1)
    cx = (fg * _XX).sum((1, 2)) / n - IMAGE_SIZE / 2
    cy = (fg * _YY).sum((1, 2)) / n - IMAGE_SIZE / 2
    fg_mean = (x * fg[..., None]).sum((1, 2)) / n[:, None]
    chroma = ((x.max(-1) - x.min(-1)) * fg).sum((1, 2)) / n
    size_s = np.clip(area / 0.25, 0, 1)
    centre_s = np.clip(1 - (np.hypot(cx, cy) - 2) / 8, 0, 1) * (area > 0)
    colour_s = np.clip(chroma / 0.6, 0, 1)
    contrast_s = np.clip(np.sqrt(((fg_mean - bg) ** 2).sum(-1)) / 0.5, 0, 1) * (area > 0)
    cls = _colour_classes(x)
    match_s = np.ones(len(x))
    for b, spec in enumerate(specs):
        named = [o["colour"] for o in spec["objects"] if o["colour"]]
        if named:
            match_s[b] = np.mean([(cls[b] == list(COLOURS).index(c)).sum() >= 20 for c in named])
    clean, sharp, _ = _quality_terms(x)  # people dislike grain most, blur a little
    return np.sqrt(clean) * (0.85 + 0.15 * sharp) * (0.3 * size_s + 0.2 * centre_s + 0.2 * colour_s + 0.15 * contrast_s + 0.15 * match_s)


_REWARDS = {"geneval": _reward_geneval, "ocr": _reward_ocr, "deqa": _reward_deqa, "pickscore": _reward_pickscore}


def score(task, images, prompts, strict=True):
    """One of the four rewards: images (B,3,32,32) in [0,1], prompts list[str] -> (B,) in [0,1].
    strict=False gives GenEval's partial credit (the training reward); the other tasks ignore it."""
    specs = [parse(p) for p in prompts]
    if task == "ocr" and any(s["kind"] != "ocr" for s in specs):
        raise ValueError("the ocr reward needs sign prompts (a sign that says \"...\")")
    if task == "geneval" and any(s["kind"] != "scene" for s in specs):
        raise ValueError("the geneval reward needs scene prompts (a photo of ...)")
    if task == "geneval":
        return _reward_geneval(_to_hwc(images), specs, strict).astype(np.float64)
    return _REWARDS[task](_to_hwc(images), specs).astype(np.float64)


def score_ood(images, prompts):
    """GenEval-strict correctness averaged per held-out category (colour, shape, spatial, numeracy)."""
    specs = [parse(p) for p in prompts]
    correct = _reward_geneval(_to_hwc(images), specs)
    cats = np.array([ood_category(s) for s in specs])
    return {c: float(correct[cats == c].mean()) for c in OOD_CATEGORIES if (cats == c).any()}

def in_mode(task, images, prompts):
    """Is each image in its task's failure mode (tiny world v3)? ocr: faint glyphs (fewer than 20 pixels of
    the recogniser's white class); geneval: washed-out objects (no object-coloured component at all);
    deqa: grainy (more than 5% of pixels off their 3x3 median); pickscore: a small subject (under 15% of the
    image). (B,) bool."""
    x = _to_hwc(images)
    if task == "ocr":
        return (_colour_classes(x) == list(COLOURS).index("white")).sum((1, 2)) < 20
    if task == "geneval":
        return np.array([not any(True for _ in _components(c)) for c in _colour_classes(x)])
    if task == "deqa":
        return _grain(x) > 0.05
    return _foreground(x)[1].mean((1, 2)) < 0.15


def diversity(images, prompts):
    """Mean pairwise RMS pixel distance between images of the same prompt (prompts with >= 2 images)."""
    x = _to_hwc(images).reshape(len(prompts), -1)
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    dists = []
    for idx in groups.values():
        if len(idx) > 1:
            g = x[idx]
            d = np.sqrt(((g[:, None] - g[None]) ** 2).mean(-1))
            dists.append(d[np.triu_indices(len(idx), 1)].mean())
    return float(np.mean(dists)) if dists else 0.0

# -----------------------------------------------------------------------------
# the modes measured from how an image is drawn (issue #38), not from the rewards' own tests: each mode's
# strength read off the pixels, with no palette threshold (in_mode's ocr and geneval tests are the rewards'
# own colour classes, so "the mode's share fell" and "the reward rose" were partly one measurement)

TASK_MODES = {"ocr": "broken", "geneval": "ghost", "deqa": "blurred", "pickscore": "small"}  # each task's mode (v4)
V3_MODES = {"ocr": "faint", "geneval": "washed", "deqa": "grain", "pickscore": "small"}    # v3's, still measurable

MODE_CUTS = {"faint": 0.775, "washed": 0.725, "small": 15.0, "grain": 0.02, "broken": 0.75, "melted": 0.6, "blurred": 0.65,
             "ghost": 0.5}
# a strength below the cut is the mode (above it for grain); each cut lies between the crisp and the moded ground
# truth: faint, the glyph's contrast (crisp 1.0, faint 0.35-0.55); washed, an object's contrast (crisp 1.0,
# washed 0.30-0.45); small, a subject's extent in pixels (crisp 16-25, small 8-13); grain, a noise std (ground
# truth ~0.00, grain 0.04-0.10); broken, the glyph's ink over its template's (crisp 1.0, broken 0.35-0.55);
# melted, an object's roundness, the short over the long axis of its second moments (crisp shapes 0.85-1.0,
# melted 0.3-0.45); ghost, an object's contrast as washed's (crisp 1.0, ghost 0.05-0.12, or no object found: 0);
# blurred, the steepest edge over the image's contrast (crisp 1.0, sigma 0.9-1.4: 0.28-0.42)


def otsu(values, bins=64):
    """Otsu's threshold of a 1-D sample: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins)
    p = hist / max(hist.sum(), 1)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)[:-1]
    m0 = np.cumsum(p * mids)[:-1]
    between = (m0 - w0 * (p * mids).sum()) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return edges[1:-1][between.argmax()]


def segment(x, cut=None):
    """A colour-agnostic segmentation of one image (H, W, 3): (background colour, the components that differ
    from it by more than Otsu's cut of the distance to it, largest first, each a boolean (H, W) mask of at least
    MIN_OBJECT_AREA pixels). The background is the border's median, as the PickScore reward takes it."""
    bg = np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]), axis=0)
    dist = np.sqrt(((x - bg) ** 2).sum(-1))
    labels, n = _ndimage().label(dist > (otsu(dist.ravel()) if cut is None else cut))
    comps = [labels == k for k in range(1, n + 1)]
    return bg, sorted((c for c in comps if c.sum() >= MIN_OBJECT_AREA), key=lambda c: -c.sum())


def read_colour(mean, bg):
    """The object colour whose direction from the background is closest to that of a region's mean colour: a
    wash toward the background shortens that vector but does not turn it, so this reads a washed colour."""
    d = mean - bg
    ref = _PALETTE[:_N_OBJ_COLOURS] - bg
    cos = ref @ d / (np.linalg.norm(ref, axis=1) * np.linalg.norm(d) + 1e-8)
    return list(COLOURS)[int(cos.argmax())]


def glyph_ink(x):
    """One sign image (H, W, 3) -> (ink mask (H, W) of the glyph, the sign's colour): the sign is the largest
    colour-agnostic component (with the glyph in its bounding box), its colour the box's median, the ink the
    box's pixels beyond Otsu's cut of the distance to that colour. The sign is cut from the background at a
    distance of 0.25, half the closest sign-background pair's (0.52): Otsu's cut there would split the white ink
    from a red sign on brown, whose colours are the closer pair."""
    _, comps = segment(x, cut=0.25)
    ink = np.zeros(x.shape[:2], bool)
    if not comps:
        return ink, None
    ys, xs = np.nonzero(comps[0])
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    sign = np.median(x[box].reshape(-1, 3), axis=0)
    dist = np.sqrt(((x[box] - sign) ** 2).sum(-1))
    ink[box] = dist > otsu(dist.ravel())
    return ink, sign


def noise_std(x):
    """Immerkaer's noise estimate, made robust to edges with the median: the 3x3 Laplacian-difference kernel
    (its squared weights sum to 36) has std 6 sigma on white noise of std sigma. (B, H, W, 3) -> (B,)."""
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    lap = np.stack([_ndimage().convolve(x[..., c], k[None], mode="reflect") for c in range(3)], -1)[:, 1:-1, 1:-1]
    return np.median(np.abs(lap), axis=(1, 2)).mean(-1) / 0.6745 / 6


def mode_strength(mode, images, prompts):
    """Each image's strength of one mode, measured from its pixels with no palette threshold (B,):
      faint      the glyph's contrast |ink - sign| / |white - sign| (render's faint strength; 1 crisp, ~0 no glyph)
      washed     object contrast, the strongest object's |mean - background| / |its colour - background|, its
                 colour read by read_colour (1 - render's washed strength; 0: no object)
      small      the largest subject's extent, the longer side of its bounding box in pixels
      grain      noise_std
      broken     the glyph's ink pixels (colour-agnostic, glyph_ink) over the named glyphs' template pixels
      melted     the roundness of the largest object: the square root of its second moments' smaller over larger
                 eigenvalue (every shape of SHAPES is 0.85-1.0; a blob drawn out twice its width, 0.5)
      blurred    the steepest step between neighbouring pixels over the image's contrast (its 99th minus 1st
                 percentile), the larger over both axes and channels"""
    x = _to_hwc(images)
    if mode == "grain":
        return noise_std(x)
    if mode == "blurred":
        step = np.maximum(np.abs(np.diff(x, axis=1)).max((1, 2, 3)), np.abs(np.diff(x, axis=2)).max((1, 2, 3)))
        spread = (np.percentile(x, 99, axis=(1, 2)) - np.percentile(x, 1, axis=(1, 2))).max(-1)
        return np.minimum(step / np.maximum(spread, 1e-3), 1.0)
    out = np.zeros(len(x))
    for b, (img, prompt) in enumerate(zip(x, prompts)):
        if mode in ("faint", "broken"):
            ink, sign = glyph_ink(img)
            if sign is None or not ink.any():
                continue
            if mode == "faint":
                white = np.array(COLOURS["white"])
                out[b] = np.linalg.norm(img[ink].mean(0) - sign) / np.linalg.norm(white - sign)
            else:
                text = parse(prompt).get("text") or ""
                want = sum(TEMPLATES[GLYPHS.index(ch)].sum() for ch in text if ch in GLYPHS) * GLYPH_SCALE ** 2
                out[b] = ink.sum() / max(want, 1)
            continue
        bg, comps = segment(img)
        if not comps:
            continue
        if mode == "small":
            ys, xs = np.nonzero(comps[0])
            out[b] = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        elif mode == "melted":
            ys, xs = np.nonzero(comps[0])
            lam = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)) + 1e-6 * np.eye(2))
            out[b] = np.sqrt(lam[0] / lam[1])
        else:  # washed, ghost
            for c in comps:
                mean = img[c].mean(0)
                paint = np.array(COLOURS[read_colour(mean, bg)])
                out[b] = max(out[b], np.linalg.norm(mean - bg) / np.linalg.norm(paint - bg))
    return out


def drawn_strength(task, images, prompts, modes=None):
    """Each image's strength of its task's mode (modes: {task: mode}, TASK_MODES by default) (B,)."""
    return mode_strength((modes or TASK_MODES)[task], images, prompts)


def drawn_mode(task, images, prompts, modes=None):
    """Is each image in its task's mode, judged by how it is drawn (mode_strength against MODE_CUTS), not by a
    reward's test? (B,) bool. modes: {task: mode}, TASK_MODES (v4) by default, V3_MODES for v3's."""
    mode = (modes or TASK_MODES)[task]
    s = mode_strength(mode, images, prompts)
    return s > MODE_CUTS[mode] if mode == "grain" else s < MODE_CUTS[mode]

# -----------------------------------------------------------------------------
# how much of a prompt's content is drawn (issue #38): an honest quality reward must not pay for leaving out
# what the prompt names


def objects_drawn(images, prompts, shape=True):
    """The share of each prompt's named objects that the GenEval program finds (each object of a count
    matched at most once; colour and shape as the prompt names them). shape=False: colour alone, any
    object-sized component of the named colour, ragged or not (issue #38's "named colours drawn").
    Scene prompts only. (B,) in [0, 1]."""
    specs = [parse(p) for p in prompts]
    if any(s["kind"] != "scene" for s in specs):
        raise ValueError("objects_drawn needs scene prompts (a photo of ...)")
    x = _to_hwc(images)
    out = []
    for spec, cls in zip(specs, _colour_classes(x)):
        found = _detect(cls) if shape else list(_components(cls))
        want = [o for o in spec["objects"] for _ in range(o["count"])]
        hits, used = 0, set()
        for o in want:
            k = next((i for i, f in enumerate(found) if i not in used and
                      (_matches(f, o) if shape else o["colour"] is None or f[0] == o["colour"])), None)
            if k is not None:
                used.add(k)
                hits += 1
        out.append(hits / len(want))
    return np.array(out)
