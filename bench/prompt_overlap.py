"""
How far are the test prompts from the training prompts? (issue #38, item 5: most test prompts should differ from
every training prompt in more than one incidental word). Per task, over the prompt files (prompts/tiny):
  within 1 word     test prompts that a training prompt matches up to one word (word-level edit distance <= 1)
  same content      test prompts whose content reappears in training with only incidental words changed: the
                    named objects (colour, shape, count, big; in any order, the relation word kept) or the
                    sign's glyph, with the background and the sign's colour ignored
  far               test prompts at more than one word from every training prompt, counting a swap of the two
                    objects as no change (the issue's bar: most test prompts should be far)
  grammar           distinct prompts and contents that the task's generator gives in 20,000 draws
                    (tiny_world.make_prompt; GenEval's task prompts are its one-object "geneval-task" source)

  python bench/prompt_overlap.py
  python bench/prompt_overlap.py --design 300 4,8 5,8 6,6     # the far share a bigger grammar would give

--design TRAIN SLOTS,VALUES ... (the v4 design input): for a grammar of SLOTS content words with VALUES choices
each (VALUES ** SLOTS prompts), a test prompt has SLOTS * (VALUES - 1) prompts one word away; with TRAIN training
prompts drawn at random, it is far from all of them with probability (1 - TRAIN / VALUES ** SLOTS) ** neighbours.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_world as tw  # noqa: E402


def content(prompt):
    """What a prompt asks for, without its incidental words (background, sign colour)."""
    spec = tw.parse(prompt)
    if spec["kind"] == "ocr":
        return ("sign", spec["text"])
    objs = tuple(sorted((o["count"], o["big"], o["colour"] or "", o["shape"]) for o in spec["objects"]))
    return ("scene", objs, spec["relation"])


def words(prompt):
    return tw.tokenize(prompt)


def word_distance(a, b):
    """Word-level edit distance; a two-object prompt also against its objects swapped (the same scene)."""
    d = tw.levenshtein(words(a), words(b))
    spec = tw.parse(a)
    if spec["kind"] == "scene" and len(spec["objects"]) == 2 and spec["relation"] is None:
        t = words(a)
        k = t.index("and")
        end = t.index("on") if "on" in t else len(t)
        swapped = t[:3] + t[k + 1:end] + ["and"] + t[3:k] + t[end:]
        d = min(d, tw.levenshtein(swapped, words(b)))
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-dir", default=None, help="read the prompt files from here (default prompts/tiny)")
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--design", nargs="+", default=None, metavar="TRAIN SLOTS,VALUES",
                    help="the far share of random splits of product grammars, instead of the prompt files")
    args = ap.parse_args()
    if args.design:
        n_train = int(args.design[0])
        print(f"| content slots | values a slot | prompts | neighbours one word away | far share, {n_train} train |")
        print("|---|---|---|---|---|")
        for g in args.design[1:]:
            k, v = map(int, g.split(","))
            print(f"| {k} | {v} | {v ** k} | {k * (v - 1)} | {max(0.0, 1 - n_train / v ** k) ** (k * (v - 1)):.2f} |")
        return
    if args.prompt_dir:
        tw.PROMPT_DIR = args.prompt_dir
    print("| task | train / test prompts | test within 1 word of a train prompt | test whose content is in train "
          "| test far (> 1 word from every train prompt) | grammar: distinct prompts / contents |")
    print("|---|---|---|---|---|---|")
    for task in tw.TASKS:
        train, test = tw.read_prompts(task, "train"), tw.read_prompts(task, "test")
        near = np.array([min(word_distance(p, q) for q in train) for p in test])
        seen = {content(q) for q in train}
        same = np.array([content(p) in seen for p in test])
        rng = np.random.default_rng(0)
        source = "geneval-task" if task == "geneval" else task
        drawn = {tw.make_prompt(source, rng) for _ in range(args.draws)}
        print(f"| {task} | {len(train)} / {len(test)} | {(near <= 1).sum()} | {same.sum()} | {(near > 1).sum()} | "
              f"{len(drawn)} / {len({content(p) for p in drawn})} |", flush=True)


if __name__ == "__main__":
    main()
