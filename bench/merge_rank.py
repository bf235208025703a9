"""
bench/merge_rank.py: what a merge cut to the SFT student's rank keeps of the full merge (issue 27, "equal cold
starts"). A benchmark script, not a timed test.

The default task-arithmetic merge of K experts of rank r is an adapter of rank K r at scale 1; the SFT student
is rank 32 at alpha 64 (sft_init.py's --lora-rank / --lora-alpha defaults, also in the tiny world). So 'OPD from
Merge' against 'OPD from SFT' also compares adapter sizes and scales, unless the merge is written at the
student's rank and alpha: `merge.py --rank 32 --alpha 64`, the best rank-32 approximation of each module's
merged dW (truncated SVD, Eckart-Young). This script runs merge.py both ways on the same experts and prints:

  kept     per module and overall, the fraction of the full merge's ||dW||_F^2 that the rank-R merge keeps,
           sum_{i<=R} S_i^2 / sum_i S_i^2 from the singular values S of each module's dW (overall: summed over
           modules first), checked against merge.py's card (its reconstruction error e: kept = 1 - e^2);
  curve    the same overall fraction at other ranks (--ranks);
  table    with --eval-limit N: evaluate.py's main table of both merges on N prompts a task and their paired
           differences (same prompts and seeds), rank-R minus full.

Commands (CPU):
  python bench/merge_rank.py                     # the tiny world's shipped experts, rank 32 / alpha 64 (seconds)
  python bench/merge_rank.py --eval-limit 4      # and the main table, paired (about 2 min on 2 idle cores)
  python bench/merge_rank.py --experts runs/grpo-geneval/adapter.safetensors,runs/grpo-ocr/adapter.safetensors \\
      --rank 32 --alpha 64 --world /models/stable-diffusion-3.5-medium --eval-limit 16
"""

import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: bench/ sits above nothing
sys.path.insert(0, ROOT)
import runs  # noqa: E402
import worlds  # noqa: E402

TINY_EXPERTS = ",".join(f"assets/tiny_experts/{t}.safetensors" for t in ("geneval", "ocr", "deqa", "pickscore"))
SETTINGS = dict(
    experts=(TINY_EXPERTS, "comma-separated expert LoRAs merged by task arithmetic (default: the tiny world's four)"),
    rank=(32, "rank R of the cut merge (the SFT student's)"),
    alpha=(64.0, "lora_alpha of the cut merge (the SFT student's: scale alpha / R = 2)"),
    ranks=("8,16,32,64,96", "other ranks for the curve of the overall fraction kept"),
    eval_limit=(0, "prompts a task for evaluate.py's main table of both merges; 0 = no evaluation"),
    world=("tiny", "evaluate.py --world"),
    out=("", "folder of the merges and the evaluation; empty = a temporary folder"),
)
cfg = runs.parse_settings(__doc__, SETTINGS)
out = cfg.out or tempfile.mkdtemp(prefix="merge_rank_")
os.makedirs(out, exist_ok=True)


def run(*args):
    """Run a stage script of the repository; its output is printed only if it fails."""
    res = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"error: {args[0]} failed (exit {res.returncode})")
    return res.stdout


# -----------------------------------------------------------------------------
# the two merges: exact (rank sum_k r_k, scale 1) and cut to rank R at alpha

full, cut = os.path.join(out, "full.safetensors"), os.path.join(out, f"r{cfg.rank}.safetensors")
run("merge.py", "--adapters", cfg.experts, "--out", full)
run("merge.py", "--adapters", cfg.experts, "--rank", cfg.rank, "--alpha", cfg.alpha, "--out", cut)
with open(cut[: -len(".safetensors")] + ".json") as f:
    card = json.load(f)  # merge.py's card of the cut merge: its reconstruction errors
weights, config = worlds.read_lora(full)
scale = config["lora_alpha"] / config["r"]
modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
cut_config = worlds.read_lora(cut)[1]
print(f"experts: {cfg.experts}")
print(f"full merge: rank {config['r']}, alpha {config['lora_alpha']} | cut: rank {cut_config['r']}, alpha {cut_config['lora_alpha']}")

# -----------------------------------------------------------------------------
# kept fraction of ||dW||_F^2: per module at R, overall at every rank of the curve

S2 = {m: torch.linalg.svdvals(scale * weights[m + ".lora_B.weight"].double() @ weights[m + ".lora_A.weight"].double()) ** 2
      for m in modules}
total = sum(float(s.sum()) for s in S2.values())
R = cfg.rank
print(f"\nfraction of ||dW||_F^2 kept at rank {R} (share: the module's part of the merge's ||dW||_F^2)")
print(f"{'module':<45} {'kept':>8} {'card':>8} {'share':>7}")
per_module = []
for m in modules:
    if S2[m].sum() == 0:  # e.g. SD3's last block's add_q_proj: its output is unused, so the experts never moved it
        print(f"{m:<45} {'dW = 0':>8}")
        continue
    per_module.append(float(S2[m][:R].sum() / S2[m].sum()))
    print(f"{m:<45} {per_module[-1]:8.4f} {1 - card['reconstruction_error']['per_module'][m] ** 2:8.4f} {float(S2[m].sum()) / total:7.3f}")
kept = sum(float(s[:R].sum()) for s in S2.values()) / total
print(f"{'overall':<45} {kept:8.4f} {1 - card['reconstruction_error']['overall'] ** 2:8.4f} {1:7.3f}")
per_module.sort()
print(f"modules with dW != 0: min {per_module[0]:.4f}, median {per_module[len(per_module) // 2]:.4f}, max {per_module[-1]:.4f}")
print("\noverall fraction kept by rank: " + ", ".join(
    f"r {r}: {sum(float(s[:r].sum()) for s in S2.values()) / total:.4f}" for r in sorted({*map(int, cfg.ranks.split(",")), R})))

# -----------------------------------------------------------------------------
# optional: both merges through evaluate.py, paired on the same prompts and seeds

if cfg.eval_limit:
    label = f"r{R}"
    run("evaluate.py", "--world", cfg.world, "--models", f"full={full},{label}={cut}", "--tables", "main",
        "--limit", cfg.eval_limit, "--paired-with", "full", "--grid-prompts", 1, "--out", os.path.join(out, "eval"))
    for table in ("main", "paired"):
        with open(os.path.join(out, "eval", table + ".md")) as f:
            print("\n" + f.read().strip())
print(f"\nfiles: {out}")
