"""
evaluate.py: the paper's tables from any set of checkpoints (Flow-OPD, arXiv 2605.08063, section 5).

Every model is the one shared base with (or without) a LoRA adapter, sampled as the paper evaluates: the
deterministic ODE (noise level 0) with the world's evaluation steps and CFG (40 steps, 4.5 on SD3.5-M), and
the same prompts and seeds for every model (image k of prompt i: seed + i * images_per_prompt + k).
Tables (Markdown and JSON under --out):
  main     each task on its own test split with its own reward, and the paper's Average: on SD3
           mean(GenEval, OCR, DeQA / 5, PickScore / 26) (rewards.paper_average); in the tiny world every
           reward is in [0, 1] and the Average is the plain mean.
  ood      held-out compositions, T2I-CompBench-style categories (tiny world only: SD3 needs
           T2I-CompBench's own evaluators, which are not shipped).
  quality  quality rewards on the deqa + pickscore test prompts; in the tiny world also objects drawn and diversity.
  paired   each model minus each reference of --paired-with, per task, on the same prompts and seeds.
  gain     with --gain-of: each model's share (model - base) / (teacher - base) of each teacher's gain.
Every cell carries its standard error over prompts (JSON '<column>_se', Markdown 'mean +- se'): a prompt's
K images are averaged first, as prompts are what is drawn and what two models are paired on. A prompt is a
distinct (text, metadata) pair: a file that writes a prompt on several lines (Flow-GRPO's GenEval test file:
553 prompts, each 4 times) is read as its distinct prompts, each sampled K times and counted once.
Plus grid_<model>.png, grid_compare.png (one row per model) and main.png (the main table as bars).
Resumable: every prompt's per-image scores are cached in --cache, one JSON per (model, prompt set), named by
a hash of the model's weights, the base and the sampling settings; a rerun with everything cached samples nothing.

Commands:
  # CPU, tiny world (2 cores: a few minutes with --limit 16)
  python evaluate.py --world tiny --models base,grpo-ocr=results/tiny/runs/grpo-ocr/adapter.safetensors --limit 16
  # 1 GPU, SD3.5-Medium (GenEval / DeQA reward servers running, see rewards.py)
  python evaluate.py --world /models/stable-diffusion-3.5-medium \
      --models base,opd=results/sd3/runs/opd/adapter.safetensors
  # N GPUs on one node: prompts are split over ranks, identical numbers to 1 process
  torchrun --standalone --nproc_per_node 8 evaluate.py --world /models/stable-diffusion-3.5-medium --models ...
  # 4 nodes x 8 GPUs
  torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $MASTER:29500 evaluate.py ...
"""

import math
import os
import re

import numpy as np
import torch
from tqdm import tqdm

import rewards
import runs
import sde
import worlds

# -----------------------------------------------------------------------------
# Settings. None means "the world's default" (worlds.World.defaults; the paper's values on SD3.5-M).

SETTINGS = dict(
    world=("tiny", "'tiny', or the folder / hub id of a Stable Diffusion 3.5 pipeline"),
    models=("base", "comma-separated 'base' (no adapter) and label=path/to/adapter.safetensors entries"),
    tables=("main,ood,quality", "which tables to make: main, ood, quality"),
    tasks=("", "tasks of the main table (default: all of the world's; e.g. 'ocr,pickscore' without reward servers)"),
    gain_of=("", "task=label pairs naming each task's teacher among --models ('deqa=grpo-deqa,...'): the gain table"),
    paired_with=("base,grpo-mix", "labels of --models every other model is compared with, paired"),
    quality_metrics=("", "rewards of the quality table (default: tiny 'deqa,pickscore', sd3 'aesthetic,pickscore')"),
    images_per_prompt=(None, int, "images per distinct prompt (default: tiny 2; sd3 4, GenEval's protocol)"),
    limit=(0, "evaluate K distinct prompts of each prompt file, evenly spread over it (0 = all)"),
    steps=(None, int, "ODE steps (default: the world's eval_steps; 40 on SD3)"),
    guidance_scale=(None, float, "CFG scale (default: the world's; 4.5 on SD3)"),
    seed=(0, "base seed: image k of prompt i starts from noise seeded seed + i * images_per_prompt + k"),
    batch_size=(32, "images per sampling forward, per rank"),
    chunk_prompts=(16, "prompts per rank between cache writes (what an interruption can lose)"),
    grid_prompts=(2, "prompts per main-table task in the sample grids (image k = 0 of each)"),
    reward_dtype=("", "precision of the CLIP scorers (PickScore, aesthetic, HPS-v2.1) on CUDA: '' = float16, 'float32'"),
    deqa_scale=(1.0, "sd3 only: multiply the DeQA server's answers (5 for yifan123/reward-server's [0.2, 1])"),
    threads=(0, "CPU only: torch threads per rank (0 = OMP_NUM_THREADS if set, else cores / ranks)"),
    out=(None, str, "folder of the tables and plots (default results/<world kind>)"),
    cache=(None, str, "folder of the per-image score cache (default <out>/eval_cache)"),
)
cfg = runs.parse_settings(__doc__, SETTINGS)

OOD_CATEGORIES = ("colour", "shape", "spatial", "numeracy")  # tiny_world's held-out compositions
QUALITY_SETS = ("deqa", "pickscore")  # the quality table's common prompts: these tasks' test splits
NOT_WIRED = "The QwenVL judge of the paper's quality table is not wired in"

# -----------------------------------------------------------------------------
# Set-up: distributed, world, models, prompt sets and what each set is scored with

dist = runs.setup_distributed()
if dist.device.type == "cpu":  # share the cores between local ranks
    runs.set_threads(cfg.threads, dist)
world = worlds.load_world(cfg.world, dist.device)
sd3 = world.kind == "sd3"
steps = cfg.steps or world.defaults["eval_steps"]
guidance = world.defaults["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
K = cfg.images_per_prompt or (4 if sd3 else 2)
tables = runs.comma_list(cfg.tables)
for t in (t for t in tables if t not in ("main", "ood", "quality")):
    raise SystemExit(f"error: unknown table {t!r}: main, ood or quality")
main_tasks = runs.comma_list(cfg.tasks) or list(world.tasks)
for t in (t for t in main_tasks if t not in world.tasks):
    raise SystemExit(f"error: --tasks {t!r} is not a task of the {world.kind} world {world.tasks}")
quality_metrics = runs.comma_list(cfg.quality_metrics or ("aesthetic,pickscore" if sd3 else "deqa,pickscore"))
quality_columns = quality_metrics + ([] if sd3 else ["objects", "diversity"])  # the tiny world's two of its own
for m in quality_metrics:  # one line at set-up, not a traceback after sampling
    if m not in (rewards.SD3_REWARDS if sd3 else rewards.TINY_REWARDS):
        raise SystemExit(f"error: --quality-metrics {m!r} is not a reward of the {world.kind} world: "
                         f"{', '.join(rewards.SD3_REWARDS if sd3 else rewards.TINY_REWARDS)}")
if "quality" in tables and K < 2 and not sd3:
    raise SystemExit("error: the quality table's diversity compares images of one prompt: use --images-per-prompt 2+")
out = cfg.out or os.path.join(runs.HERE, "results", world.kind)
cache_dir = cfg.cache or os.path.join(out, "eval_cache")

models = worlds.parse_models(cfg.models)  # label -> LoRA path (None = the base model)
gain_of = {}  # task -> label of its teacher among the models
for part in runs.comma_list(cfg.gain_of):
    task, sep, label = (x.strip() for x in part.partition("="))
    if not sep or task not in main_tasks or label not in models:
        raise SystemExit(f"error: --gain-of part {part!r}: write task=label with a task of the main table {main_tasks} "
                         f"and a label of --models {list(models)}")
    gain_of[task] = label
paired_with = runs.comma_list(cfg.paired_with)
if gain_of and ("base" not in models or "main" not in tables):
    raise SystemExit("error: --gain-of measures gains over the base: put 'base' in --models and 'main' in --tables")

# prompt set -> the rewards its images are scored with (a set shared by two tables is sampled once)
set_metrics = {t: {t} for t in main_tasks} if "main" in tables else {}
if "quality" in tables:
    for t in QUALITY_SETS:
        set_metrics.setdefault(t, set()).update(quality_columns)
if "ood" in tables and not sd3:
    set_metrics["ood"] = {"ood"}
prompt_sets = {}  # set -> (file, prompts, metadata): --limit distinct prompts evenly spread over the file
merged = {}  # set -> how many duplicate lines were merged into the line of their first appearance
for name in set_metrics:
    path = worlds.prompt_file(world, name, "test")
    prompts, metadata, merged[name] = worlds.read_test_prompts(path, cfg.limit)
    prompt_sets[name] = (path, prompts, metadata)
worlds.encode_once(world, [p for _, prompts, _ in prompt_sets.values() for p in prompts],
                   os.path.join(runs.HERE, "results", world.kind, "prompt_cache"))  # SD3: then frees the text encoders

# GenEval as GenEval scores it (sd3): the server's `rewards`, GenEval's own correctness (at least the asked count);
# its `strict_rewards` (exact counts) is the extra column geneval_strict; training uses the partial-credit `scores`.
# The tiny world has one correctness, its strict rule.
options = {"geneval": dict(field="rewards" if sd3 else "strict_rewards")}
if sd3:
    options["deqa"] = dict(scale=cfg.deqa_scale)
    if cfg.reward_dtype:
        options.update({m: dict(dtype=cfg.reward_dtype) for m in ("pickscore", "aesthetic", "hpsv2")})
    if "geneval" in set_metrics:
        set_metrics["geneval"].add("geneval_strict")
DERIVED = ("ood", "diversity", "geneval_strict")  # columns no reward function of their own gives
# every reward model on this rank's device, as in the training stages (PickScore's CLIP-H on the GPU in float16)
scorers = {m: rewards.get_reward(m, world.kind, dist.device, **options.get(m, {}))
           for ms in set_metrics.values() for m in ms if m not in DERIVED}
# GenEval's categories (sd3 metadata 'tag'): its score is the mean of the category means
geneval_tags = None
if sd3 and "geneval" in prompt_sets and all(isinstance(m, dict) and m.get("tag") for m in prompt_sets["geneval"][2]):
    geneval_tags = [m["tag"] for m in prompt_sets["geneval"][2]]


# what each adapter computes (weights by content, with a PEFT adapter_config.json): equal rewrites hit the cache
model_ids = {label: worlds.adapter_sha256(path) if path else "base" for label, path in models.items()}
base_id = worlds.base_fingerprint(world)  # a rebuilt tiny base, or another SD3 folder, reuses no cached score
sampling = dict(world=world.name, base=base_id[:16], steps=steps, guidance_scale=guidance,
                shift=world.defaults["shift"], images_per_prompt=K, seed=cfg.seed, noise_level=0.0)


def cache_path(label, name):
    """One JSON per (model, prompt set), named by everything its scores depend on."""
    key = dict(sampling, model=model_ids[label], prompts=runs.file_sha256(prompt_sets[name][0]),
               options=options if name in ("deqa", "pickscore") or (sd3 and name == "geneval") else {})
    if "ocr" in set_metrics[name] and sd3:  # another OCR engine or model reads other text
        key["ocr_engine"] = rewards.ocr_engine()
    # index i counts distinct prompts now, lines before: a new name, as line i's scores are not prompt i's
    if merged[name]:
        key["distinct_prompts"] = True
    return os.path.join(cache_dir, f"{label}-{name}-{runs.json_digest(key, sort_keys=True)}.json")


def seeds_of(i):
    return [cfg.seed + i * K + k for k in range(K)]


# columns of the gathered score tensor of a prompt set: (prompts, K, columns); NaN = not scored
def columns_of(name):
    cols = sorted(m for m in set_metrics[name] if m not in ("ood", "diversity"))  # geneval, geneval_strict, ...
    if "ood" in set_metrics[name]:
        cols += [f"ood_{c}" for c in OOD_CATEGORIES]
    if "diversity" in set_metrics[name]:
        cols.append("diversity")  # a per-prompt value, repeated over the K images
    return cols


def score_prompts(name, images, units):
    """Score the images of whole prompts: images (len(units) * K, 3, H, W) -> (len(units), K, columns)."""
    _, prompts, metadata = prompt_sets[name]
    cols = columns_of(name)
    p = [prompts[i] for i in units for _ in range(K)]
    meta = [metadata[i] for i in units for _ in range(K)]
    scores = torch.full((len(units) * K, len(cols)), float("nan"))
    for c, col in enumerate(cols):
        if col == "geneval" and "geneval_strict" in cols:  # one request, both correctness fields
            both = scorers[col].scorer.fields(images, meta, ("rewards", "strict_rewards"))
            scores[:, c], scores[:, cols.index("geneval_strict")] = (torch.tensor(both[f], dtype=torch.float32)
                                                                   for f in ("rewards", "strict_rewards"))
        elif col in scorers:
            scores[:, c] = scorers[col](images, p, meta)
    if "ood" in set_metrics[name]:  # one call per image: the categories are per prompt
        for j in range(len(p)):
            for cat, value in rewards.ood_scores(images[j: j + 1], p[j: j + 1], world.kind).items():
                if cat not in OOD_CATEGORIES:
                    raise SystemExit(f"error: OOD category {cat!r} is not one of {OOD_CATEGORIES}")
                scores[j, cols.index(f"ood_{cat}")] = value
    scores = scores.reshape(len(units), K, len(cols))
    if "diversity" in set_metrics[name]:
        for u, i in enumerate(units):
            scores[u, :, -1] = rewards.diversity(images[u * K: (u + 1) * K], [prompts[i]] * K, world.kind)
    return scores


grid_sets = [t for t in main_tasks if t in prompt_sets] or list(prompt_sets)
grid_units = [(t, i) for t in grid_sets for i in range(min(cfg.grid_prompts, len(prompt_sets[t][1])))]
if dist.master:
    os.makedirs(out, exist_ok=True)
    runs.write_json(os.path.join(out, "eval_config.json"), dict(
        vars(cfg), steps=steps, guidance_scale=guidance, images_per_prompt=K, world_size=dist.world_size,
        models=models, model_sha256=model_ids, reward_options=options,
        **({"ocr_engine": rewards.ocr_engine()} if sd3 else {})))
    print(f"world {world.name} ({world.kind}) on {dist.device} x {dist.world_size} | ODE {steps} steps, CFG "
          f"{guidance}, shift {world.defaults['shift']} | {K} images/prompt, seeds {cfg.seed} + i * {K} + k | {tables}")
    for name, (path, prompts, _) in prompt_sets.items():
        dups = f", {merged[name]} duplicate lines merged" if merged[name] else ""
        print(f"  set {name:10s} {len(prompts):5d} prompts x {K} = {len(prompts) * K:6d} images, "
              f"scored by {columns_of(name)} ({os.path.relpath(path, runs.HERE)}{dups})")
    print(f"{sum(len(p[1]) for p in prompt_sets.values()) * K} images per model, {len(models)} models "
          f"{list(models)} | cache {cache_dir}")

# -----------------------------------------------------------------------------
# Sampling and scoring: for each model, each prompt set, the prompts the cache lacks

transformer = world.transformer
grids = {}  # label -> (grid images, 3, H, W)
for label, path in models.items():
    adapter_name = None
    todo = {}  # set -> indices of the prompts the cache lacks
    if dist.master:
        for name, (_, prompts, _) in prompt_sets.items():
            cached = runs.read_score_cache(cache_path(label, name))
            todo[name] = [i for i in range(len(prompts))
                          if not runs.has_scores(cached.get(str(i)), prompts[i], set_metrics[name])]
    # the master's cache alone decides (it alone writes it): ranks reading a node-local --cache could disagree
    # on the work, so on how many collective calls follow, and hang
    todo = runs.from_master(dist, todo)
    grid_key = [sampling, model_ids[label], grid_units, [prompt_sets[t][1][i] for t, i in grid_units]]
    grid_file = os.path.join(cache_dir, f"{label}-grid-{runs.json_digest(grid_key)}.safetensors")
    need_grid = dist.master and not os.path.isfile(grid_file)
    n_todo = sum(len(v) for v in todo.values())
    if dist.master:
        print(f"{label}: {n_todo} of {sum(len(p[1]) for p in prompt_sets.values())} prompts to sample "
              f"({n_todo * K} images), rest cached")
    if path and (n_todo or need_grid):
        adapter_name = "eval_" + re.sub(r"\W", "_", label)
        worlds.load_lora(transformer, path, adapter_name)

    with worlds.adapter(transformer, adapter_name):
        bar = tqdm(total=n_todo * K, desc=label, unit="img", disable=not dist.master or n_todo == 0)
        for name, missing in todo.items():
            _, prompts, _ = prompt_sets[name]
            file = cache_path(label, name)
            cached = runs.read_score_cache(file) if dist.master else {}
            step = cfg.chunk_prompts * dist.world_size
            for c in range(0, len(missing), step):
                units = missing[c: c + step]
                n_local = math.ceil(len(units) / dist.world_size)
                mine = units[dist.rank::dist.world_size]  # strided: ranks get near-equal shares
                scores = torch.full((n_local, K, len(columns_of(name))), float("nan"))
                with runs.all_or_none(dist):  # a scorer that fails on one rank stops every rank, with its message
                    if mine:
                        batch_prompts = [prompts[i] for i in mine for _ in range(K)]
                        seeds = [s for i in mine for s in seeds_of(i)]
                        images = sde.sample(world, batch_prompts, steps, guidance, noise_level=0, seeds=seeds,
                                            batch_size=cfg.batch_size)["images"]  # (len(mine) * K, 3, H, W) in [0, 1]
                        scores[: len(mine)] = score_prompts(name, images, mine)
                gathered = runs.gather_indexed(scores, mine, dist)  # every rank's [(prompt index, (K, columns))]
                if dist.master:
                    for i, row in gathered:
                        cached[str(i)] = runs.score_entry(prompts[i], columns_of(name), row, per_prompt=("diversity",))
                    runs.write_json(file, dict(settings=dict(sampling, model=model_ids[label], set=name),
                                               prompts=cached))
                bar.update(len(units) * K)
        bar.close()

        if need_grid:  # image k = 0 of the first prompts of each task: the same seeds as in the tables
            grid_prompts = [prompt_sets[t][1][i] for t, i in grid_units]
            images = sde.sample(world, grid_prompts, steps, guidance, noise_level=0,
                                seeds=[seeds_of(i)[0] for _, i in grid_units], batch_size=cfg.batch_size)["images"]
            runs.save_tensors(grid_file, {"images": images})
    if adapter_name:
        transformer.delete_adapters(adapter_name)
    if dist.master:
        grids[label] = runs.load_tensors(grid_file)[0]["images"]
    runs.barrier(dist)

# -----------------------------------------------------------------------------
# Tables (master): means over the cached per-image scores of the prompts evaluated now


def prompt_means(label, name, col):
    """{prompt index: mean of the column over that prompt's K images} for the set's prompts that have the column
    (an OOD prompt scores only its own category): the unit that is drawn, and that two models are paired on."""
    cached = runs.read_score_cache(cache_path(label, name))
    values = {i: np.atleast_1d(cached[str(i)].get(col, [])) for i in range(len(prompt_sets[name][1]))}
    return {i: float(np.mean(v)) for i, v in values.items() if len(v)}


def mean_se(values, groups=None):
    """Mean and standard error of the mean of per-prompt values (SE None with fewer than 2). With groups (a
    label per value: GenEval's categories) the mean of the group means, as GenEval's overall score, and its
    SE over prompts within groups: sqrt(sum_c se_c^2) / C (None if a group has fewer than 2)."""
    values = np.asarray(list(values), np.float64)
    if not len(values):
        return None, None
    if groups is not None:
        groups = np.asarray(list(groups))
        parts = [mean_se(values[groups == g]) for g in dict.fromkeys(groups.tolist())]
        return float(np.mean([m for m, _ in parts])), combined_se([1 / len(parts)] * len(parts), [se for _, se in parts])
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def task_mean_se(task, by_prompt, tags=None):
    """mean_se of a main-table column's {prompt index: value}; GenEval's columns by category where tags gives
    each GenEval prompt's category (sd3 metadata 'tag')."""
    grouped = task.startswith("geneval") and tags is not None
    return mean_se(by_prompt.values(), [tags[i] for i in by_prompt] if grouped else None)


def combined_se(coefficients, ses):
    """SE of sum_i c_i x_i for independent x_i (different prompt sets) with SEs ses; None if any is None."""
    return None if None in ses else float(math.sqrt(sum((c * se) ** 2 for c, se in zip(coefficients, ses))))


def main_row(row, values_of, tasks, sd3, tags=None, extra=()):
    """Fill row's task columns (the paper's order: geneval, ocr, deqa, pickscore, then `extra` columns) with the
    mean +- SE of values_of(column), the column's {prompt index: value}, and the Average from the four: on sd3
    mean(GenEval, OCR, DeQA/5, PickScore/26), in the tiny world (every reward in [0, 1]) the plain mean."""
    coef = [rewards.paper_average(*unit) if sd3 else 1 / 4 for unit in np.eye(4)]  # the Average is linear
    for t in rewards.TINY_REWARDS + tuple(extra):
        row[t], row[f"{t}_se"] = task_mean_se(t, values_of(t), tags) if t in (*tasks, *extra) else (None, None)
    parts = [row[t] for t in rewards.TINY_REWARDS]
    row["average"] = row["average_se"] = None
    if None not in parts:
        row["average"] = rewards.paper_average(*parts) if sd3 else float(np.mean(parts))
        row["average_se"] = combined_se(coef, [row[f"{t}_se"] for t in rewards.TINY_REWARDS])
    return row


def main_rows(per_prompt, models, tasks, sd3, tags=None, extra=()):
    """The main table. per_prompt[(label, column)] = {prompt index: the prompt's mean score, in the table's units};
    tags: each GenEval prompt's category (its column is then the mean of the category means, as GenEval's)."""
    return [main_row({"model": label}, lambda t: per_prompt[label, t], tasks, sd3, tags, extra) for label in models]


def paired_rows(per_prompt, models, references, tasks, sd3, tags=None, extra=()):
    """Each model minus each reference, per task: the mean over the prompts both hold of the per-prompt difference
    (same prompts, same seeds) +- its paired SE. The Average of the differences is the difference of the Averages."""
    rows = []
    for ref in (r for r in references if r in models):
        for label in (m for m in models if m != ref):
            rows.append(main_row({"model": label, "minus": ref}, lambda t: {
                i: v - per_prompt[ref, t][i] for i, v in per_prompt[label, t].items() if i in per_prompt[ref, t]},
                tasks, sd3, tags, extra))
    return rows


def gain_rows(rows_of_main, per_prompt, models, gain_of, tags=None):
    """Each model's share of each teacher's gain over the base on the teacher's task (the paper: OPD keeps >= 90%):
    (model - base) / (teacher - base) from the main table's rows, +- its SE over prompts by the delta method
    (paired). Returns (rows, {task: the teacher's gain}); a teacher that does not beat the base shares None."""
    by_label = {row["model"]: row for row in rows_of_main}
    base_row = by_label["base"]
    gains = {t: by_label[teacher][t] - base_row[t] for t, teacher in gain_of.items()}
    rows = []
    for label in (m for m in models if m != "base"):
        row = {"model": label}
        for t, g in gains.items():
            row[t] = row[f"{t}_se"] = None
            if g > 0:
                row[t] = (by_label[label][t] - base_row[t]) / g
                # SE of a ratio of paired means: std(d_model - share * d_teacher) / (sqrt(n) gain)
                base, model, teacher = per_prompt["base", t], per_prompt[label, t], per_prompt[gain_of[t], t]
                _, se = task_mean_se(t, {i: (model[i] - base[i]) - row[t] * (teacher[i] - base[i]) for i in base}, tags)
                row[f"{t}_se"] = se / g if se is not None else None
        rows.append(row)
    return rows, gains


def ood_rows(per_prompt, models):
    """The OOD table: per category, the mean over its prompts (per_prompt[(label, category)] = {prompt: mean});
    overall = the mean of the category means."""
    rows = []
    for label in models:
        row = {"model": label}
        for c in OOD_CATEGORIES:
            row[c], row[f"{c}_se"] = mean_se(per_prompt[label, c].values())
        present = [c for c in OOD_CATEGORIES if row[c] is not None]
        row["overall"] = float(np.mean([row[c] for c in present])) if present else None
        row["overall_se"] = (combined_se([1 / len(present)] * len(present), [row[f"{c}_se"] for c in present])
                             if present else None)
        rows.append(row)
    return rows


def quality_rows(values, models, metrics):
    """The quality table: values[(label, metric)] = per-prompt values pooled over the quality prompt sets."""
    rows = []
    for label in models:
        row = {"model": label}
        for m in metrics:
            row[m], row[f"{m}_se"] = mean_se(values[label, m])
        rows.append(row)
    return rows


def save_table(name, title, columns, rows, note="", signed=False):
    runs.write_json(os.path.join(out, f"{name}.json"), dict(rows=rows, **({"note": note} if note else {}),
                                                           settings=sampling,
                                                           prompts={s: len(prompt_sets[s][1]) for s in prompt_sets}))
    text = runs.markdown_table(title, columns, rows, note, signed)
    runs.atomic_write(os.path.join(out, f"{name}.md"), text)
    print("\n" + text)


if dist.master:
    n_prompts = ", ".join(f"{s} {len(prompt_sets[s][1])}" + (f" ({merged[s]} duplicate lines merged)" if merged[s]
                                                             else "") for s in prompt_sets)
    setting_note = f"ODE {steps} steps, CFG {guidance}, {K} images/prompt, seed {cfg.seed}; prompts: {n_prompts}."

    if "main" in tables:
        units = {"pickscore": rewards.PICKSCORE_SCALE} if sd3 else {}  # sd3's reward is logit / 26; the table's, logit
        extra = ["geneval_strict"] if sd3 and "geneval" in main_tasks else []  # sd3's strict GenEval: an extra column
        per_prompt = {(label, t): {i: v * units.get(t, 1) for i, v in prompt_means(label, t, t).items()}
                      for label in models for t in main_tasks}
        per_prompt.update({(label, c): prompt_means(label, "geneval", c) for label in models for c in extra})
        main = [dict(row, adapter_sha256=model_ids[row["model"]])
                for row in main_rows(per_prompt, models, main_tasks, sd3, geneval_tags, extra)]
        avg = "mean(GenEval, OCR, DeQA/5, PickScore/26)" if sd3 else "the plain mean (tiny-world rewards are in [0, 1])"
        geneval_note = (" GenEval = GenEval's score: the mean of its category means of GenEval's correctness (at least "
                        "the asked count), SE over prompts within categories; geneval_strict = every clause with exact "
                        "counts (not in the Average)." if extra else "")
        save_table("main", "Main table: each task on its own test split",
                   ["model", *rewards.TINY_REWARDS, "average", *extra], main,
                   f"Average = {avg}. Each cell: mean +- its standard error over prompts (the Average's from the four "
                   f"columns' SEs, independent prompt sets).{geneval_note} Adapters by sha256 in main.json. "
                   f"{setting_note}")
        paired = paired_rows(per_prompt, models, paired_with, main_tasks, sd3, geneval_tags, extra)
        if paired:
            save_table("paired", "Paired differences: each model minus a reference, on the same prompts and seeds",
                       ["model", "minus", *rewards.TINY_REWARDS, "average"], paired,
                       "Each cell: the mean over prompts of (model - reference) +- its paired standard error. "
                       "A difference is a claim only beyond 2 SE and beyond the run-to-run spread of two seeds "
                       f"(README). {setting_note}", signed=True)

    if gain_of:
        rows, gains = gain_rows(main, per_prompt, models, gain_of, geneval_tags)
        save_table("gain", "Share of each teacher's gain over the base on the teacher's task", ["model", *gain_of],
                   rows, "(model - base) / (teacher - base) on each task's main-table column, +- its SE over prompts "
                   "(delta method, paired); teachers: "
                   + ", ".join(f"{t} {teacher} ({gains[t]:+.3f})" for t, teacher in gain_of.items())
                   + f". '-': the teacher does not beat the base. {setting_note}")

    if "ood" in tables and sd3:
        save_table("ood", "Out-of-domain compositions (T2I-CompBench)", ["model", *OOD_CATEGORIES, "overall"], [],
                   "Not evaluated: the SD3 OOD numbers need T2I-CompBench's own evaluators (BLIP-VQA, UniDet, "
                   "...), which are not shipped with this code; run them on images sampled with these settings.")
    elif "ood" in tables:  # each OOD prompt holds one category
        ood = {(label, c): prompt_means(label, "ood", f"ood_{c}") for label in models for c in OOD_CATEGORIES}
        save_table("ood", "Out-of-domain compositions (held-out, GenEval-strict correctness)",
                   ["model", *OOD_CATEGORIES, "overall"], ood_rows(ood, models),
                   f"Overall = mean of the category means. Each cell +- its SE over prompts. {setting_note}")

    if "quality" in tables:
        values = {(label, m): [(rewards.PICKSCORE_SCALE if sd3 and m == "pickscore" else 1) * v
                               for s in QUALITY_SETS for v in prompt_means(label, s, m).values()]
                  for label in models for m in quality_columns}  # pooled over both sets, each prompt counted once
        tiny = ("Objects = the share of a prompt's named objects that the GenEval program finds; diversity = mean "
                "pairwise RMS pixel distance between the images of one prompt.")
        note = f"Prompts: the {' + '.join(QUALITY_SETS)} test splits. " + (f"{NOT_WIRED}." if sd3 else tiny)
        save_table("quality", "Quality", ["model", *quality_columns], quality_rows(values, models, quality_columns),
                   f"{note} Each cell +- its SE over prompts. {setting_note}")

    # Pictures: one grid per model, one comparison grid (a row per model), the main table as bars
    scale = max(1, 128 // world.defaults["resolution"])
    for label, images in grids.items():
        runs.save_grid(images, os.path.join(out, f"grid_{label}.png"), nrow=len(images), scale=scale)
    runs.save_grid(torch.cat(list(grids.values())), os.path.join(out, "grid_compare.png"), nrow=len(grid_units),
                   scale=scale)
    print(f"grids: columns = {', '.join(f'{t}[{i}]' for t, i in grid_units)}; "
          f"grid_compare.png rows = {', '.join(grids)}")
    if "main" in tables:
        norm = {"deqa": rewards.DEQA_MAX, "pickscore": rewards.PICKSCORE_SCALE} if sd3 else {}
        runs.plot_bars(main, [*rewards.TINY_REWARDS, "average"], norm, f"{world.kind}: main table",
                       os.path.join(out, "main.png"))
    print(f"tables and pictures in {out}")

runs.end_distributed(dist)
