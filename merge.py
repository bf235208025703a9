"""
merge.py: the model-merging cold start of Flow-OPD (no training). K expert LoRA adapters (one per
reward, trained by Flow-GRPO) become one student LoRA that opd.py starts from. The paper says the
merge "superposes the anisotropic priors of divergent teachers" and gives no formula; the public code
averages the experts' A and B matrices separately (`--method lora-mean`). The default here is the
exact merge of the weight updates (task arithmetic); TIES is the third option.

Commands (CPU is enough; --device cuda only speeds up the SVDs of SD3.5-Medium's 1536x1536 modules):
  python merge.py --adapters runs/geneval/lora.safetensors,runs/ocr/lora.safetensors,runs/pickscore/lora.safetensors \\
                  --out runs/merge/student.safetensors                        # task arithmetic, mean of updates, exact
  python merge.py --adapters geneval_teacher/,ocr_teacher/ --out m.safetensors  # PEFT folders (Flow-GRPO's release)
  python merge.py --adapters ... --rank 32 --alpha 64 --out student_r32.safetensors  # the SFT student's rank and scale
  python merge.py --adapters a.safetensors,b.safetensors,c.safetensors --weights 1,1,1 --out sum.safetensors
  python merge.py --adapters ... --rank 64 --out student_r64.safetensors     # SVD-truncated to rank 64 (error reported)
  python merge.py --adapters ... --method lora-mean --out official.safetensors   # the public release's merge
  python merge.py --adapters ... --method ties --density 0.2 --rank 128 --out ties.safetensors
  python merge.py --adapters ... --fold-into tiny --out student.safetensors  # also base + dW as a full transformer

Inputs: diffusers-format LoRA files (worlds.save_lora, save_lora_weights) or PEFT adapter folders
(PeftModel.save_pretrained), anything worlds.read_lora reads. Outputs: `--out` (a diffusers-format LoRA whose
config is only its layout, rank and alpha: worlds.load_lora and StableDiffusion3Pipeline.load_lora_weights read
it), the card `<out without .safetensors>.json` (inputs with runs.input_sha256: a file's content, a folder's
fingerprint; method, weights, ranks, reconstruction errors, settings) and, with --fold-into,
`<out without .safetensors>.folded.safetensors` (the base transformer's state dict with the written LoRA's dW
added, float32). Everything is validated before the first file is written, and every file is written atomically.

Notation: adapter k has factors A_k (r_k, in), B_k (out, r_k) per module and scale s_k = alpha_k / r_k
(alpha_k / sqrt(r_k) with rsLoRA), so its weight update ("task vector") is dW_k = s_k B_k A_k (out, in).
The output has one rank r and one alpha, scale s = alpha / r, and (alpha / r) B A is the merged dW (exactly, or
its best rank-R approximation with --rank R). Matching the SFT student's r and alpha (--rank 32 --alpha 64) makes
the two cold starts the same adapter size and scale: the exact task-arithmetic merge of four r 32 experts is an
r 128 adapter at scale 1, so the same AdamW learning rate moves it differently.
"""

import math
import os
import time

import torch

import runs
import worlds

# -----------------------------------------------------------------------------
# settings

SETTINGS = dict(
    adapters=("", "comma-separated expert LoRAs: files (worlds.save_lora, diffusers) or PEFT folders; required"),
    weights=("", "comma-separated lambda_k, one per adapter; empty = 1/K each (ties: 1 each, it averages already)"),
    method=("task-arithmetic", "task-arithmetic (sum_k lambda_k dW_k) | lora-mean (official: mean A, mean B) | ties"),
    rank=(0, "output rank: 0 = exact (sum_k r_k; lora-mean r; ties min(out, in)); R > 0 = truncated SVD at rank R"),
    alpha=(0.0, "output lora_alpha (scale alpha / r): 0 = scale 1 (lora-mean: the first adapter's alpha)"),
    density=(0.2, "ties only: fraction of each task vector's entries kept, by magnitude, per module (trim)"),
    out=("", "output LoRA file, must end in .safetensors; required"),
    fold_into=("", "also write base + dW as a full state dict; base: a world ('tiny', an SD3 folder) or .safetensors"),
    device=("cpu", "where the merge maths runs (float64): cpu or cuda"),
)
METHODS = ("task-arithmetic", "lora-mean", "ties")
cfg = runs.parse_settings(__doc__, SETTINGS)
t_start = time.time()

# -----------------------------------------------------------------------------
# checks on the settings (all before reading or writing anything)

paths = [p.strip() for p in cfg.adapters.split(",") if p.strip()]
if not paths:
    raise SystemExit("error: --adapters is empty; pass the expert LoRA files, "
                     "e.g. --adapters a.safetensors,b.safetensors")
if cfg.method not in METHODS:
    raise SystemExit(f"error: --method {cfg.method!r} is not one of {', '.join(METHODS)}")
if not cfg.out.endswith(".safetensors"):
    raise SystemExit(f"error: --out {cfg.out!r} must be a path ending in .safetensors")
# a PEFT folder is read through its adapter_model.safetensors: writing there would overwrite an input too
if os.path.abspath(cfg.out) in {os.path.abspath(os.path.join(p, worlds.PEFT_WEIGHTS) if os.path.isdir(p) else p)
                                for p in paths}:
    raise SystemExit(f"error: --out {cfg.out} is one of the inputs; write the merge to a new file")
if cfg.rank < 0:
    raise SystemExit(f"error: --rank {cfg.rank} is negative; use 0 for the exact merge or R > 0 to truncate")
if not (math.isfinite(cfg.alpha) and cfg.alpha >= 0):
    raise SystemExit(f"error: --alpha {cfg.alpha} must be a positive number (the output lora_alpha) or 0 for the "
                     f"default scale")
if cfg.method == "ties" and not 0 < cfg.density <= 1:
    raise SystemExit(f"error: --density {cfg.density} must be in (0, 1] (the fraction of entries TIES keeps)")
K = len(paths)
if cfg.weights.strip():
    try:
        weights = [float(w) for w in cfg.weights.split(",")]
    except ValueError:
        raise SystemExit(f"error: --weights {cfg.weights!r} is not a comma-separated list of numbers")
else:
    weights = [1.0] * K if cfg.method == "ties" else [1.0 / K] * K
if len(weights) != K:
    raise SystemExit(f"error: {len(weights)} weights for {K} adapters; pass one weight per adapter (--weights)")
if not all(math.isfinite(w) for w in weights):
    raise SystemExit(f"error: --weights {weights} contains NaN or inf")
# A negative lambda is task negation in task arithmetic (meaningful); in a weighted mean of factors or in
# TIES' sign election it is not.
if cfg.method != "task-arithmetic" and any(w < 0 for w in weights):
    raise SystemExit(f"error: --weights {weights} has a negative weight, meaningless for {cfg.method} "
                     f"(only task-arithmetic negates tasks)")
if not any(w != 0 for w in weights):
    raise SystemExit(f"error: --weights {weights} are all zero; the merge would be empty")
device = torch.device(cfg.device)

# -----------------------------------------------------------------------------
# read the adapters: per module (A_k, B_k, s_k); check each is a plain LoRA and all agree on modules/shapes


def read_adapter(path, device):
    """{module: (A (r, in), B (out, r), scale)} in float64 on `device`, and the peft config dict, or one error line."""
    weights, config = worlds.read_lora(path)  # SystemExit with one line for missing / unreadable / no LoRA config
    if config.get("use_dora"):
        raise SystemExit(f"error: {path} is a DoRA adapter; merge.py handles plain LoRA only")
    if config.get("alpha_pattern"):
        raise SystemExit(f"error: {path} has a per-module alpha_pattern; merge.py handles one lora_alpha per adapter")
    if not weights:
        raise SystemExit(f"error: {path} holds no LoRA weights")
    modules = {}
    for key in weights:
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix[6]] = weights[key]
                break
        else:
            raise SystemExit(f"error: {path} is not a plain LoRA file: unexpected key {key!r}")
    out = {}
    for name, f in sorted(modules.items()):
        A, B = f.get("A"), f.get("B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise SystemExit(f"error: {path} is not a LoRA file: module {name} lacks a matching lora_A (r, in) / "
                             f"lora_B (out, r) pair")
        r = A.shape[0]  # per module, so peft's rank_pattern is honoured
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        out[name] = (A.to(device, torch.float64), B.to(device, torch.float64), scale)
    return out, config


adapters, configs = zip(*[read_adapter(p, device) for p in paths])
for p, a in zip(paths[1:], adapters[1:]):
    if a.keys() != adapters[0].keys():
        first = sorted(a.keys() ^ adapters[0].keys())[0]
        where = paths[0] if first in adapters[0] else p
        raise SystemExit(f"error: {paths[0]} and {p} target different modules: first difference {first} "
                         f"(only in {where})")
    for name in adapters[0]:
        shape0 = (adapters[0][name][1].shape[0], adapters[0][name][0].shape[1])
        shape = (a[name][1].shape[0], a[name][0].shape[1])
        if shape != shape0:
            raise SystemExit(f"error: {paths[0]} and {p} differ in module {name}: dW shape (out, in) {shape0} "
                             f"vs {shape}")
        if cfg.method == "lora-mean" and a[name][0].shape[0] != adapters[0][name][0].shape[0]:
            raise SystemExit(f"error: lora-mean needs equal ranks: {paths[0]} has r={adapters[0][name][0].shape[0]} "
                             f"and {p} r={a[name][0].shape[0]} at module {name}; use task-arithmetic")
names = list(adapters[0])

# The optional base for folding is loaded now, so that a bad base stops the run before any file is written.
base_state = None
if cfg.fold_into:
    if cfg.fold_into.endswith(".safetensors"):
        if not os.path.isfile(cfg.fold_into):
            raise SystemExit(f"error: --fold-into {cfg.fold_into} does not exist")
        base_state, _ = runs.load_tensors(cfg.fold_into)
    else:
        base_state = worlds.load_world(cfg.fold_into, device="cpu", dtype=torch.float32).transformer.state_dict()
    missing = [n for n in names if n + ".weight" not in base_state]
    if missing:
        raise SystemExit(f"error: --fold-into {cfg.fold_into} has no weight for module {missing[0]} "
                         f"({len(missing)} of {len(names)} modules missing); is it the experts' base transformer?")

print(f"merge: {cfg.method} of {K} adapters over {len(names)} modules, weights {weights}")
for p, a, c in zip(paths, adapters, configs):
    print(f"  {p}: r={c['r']} alpha={c['lora_alpha']} scale={a[names[0]][2]:g}")

# -----------------------------------------------------------------------------
# the merge, one module at a time: a target dW (out, in) and, where one exists, exact factors of it


def lora_mean(A, B, s, weights):
    """The public release's merge of one module's factors A_k (r, in), B_k (out, r), scales s_k, with weights w_k.
    A = sum_k w_k A_k, B = sum_k w_k (s_k / s) B_k with the first adapter's
    r and alpha (s = s_1; equal alphas make s_k / s = 1), w_k = 1/K by default: the mean of the factors.
    Kept for reproduction only: s mean(B) mean(A) = (s/K^2) sum_{j,k} B_j A_k is NOT the mean of the updates
    (s/K) sum_k B_k A_k; the cross terms B_j A_k (j != k) pair factors of different experts."""
    A_out = sum(w * a for w, a in zip(weights, A))
    B_out = sum(w * (sk / s[0]) * b for w, b, sk in zip(weights, B, s))
    return A_out, B_out, s[0]


def task_arithmetic(A, B, s, weights):
    """dW = sum_k lambda_k dW_k = sum_k lambda_k s_k B_k A_k (Ilharco et al. 2023), exactly, as one LoRA of
    rank sum_k r_k: stacking the factors, [c_1 B_1 | ... | c_K B_K] [A_1; ...; A_K] = sum_k c_k B_k A_k with
    c_k = lambda_k s_k, and output scale 1 (alpha = r)."""
    A_out = torch.cat(list(A), dim=0)  # (sum r_k, in)
    B_out = torch.cat([w * sk * b for w, b, sk in zip(weights, B, s)], dim=1)  # (out, sum r_k)
    return A_out, B_out, 1.0


def ties(dWs, weights, density):
    """TIES-merging (Yadav et al. 2023) of the task vectors dW_k of one module, (K, out, in):
      1. trim:     keep the ceil(density * out * in) largest-magnitude entries of each dW_k, zero the rest
      2. weight:   tau_k = lambda_k * trimmed dW_k (lambda_k = 1 by default; peft's add_weighted_adapter order)
      3. elect:    gamma = sign(sum_k tau_k), per entry
      4. merge:    dW = sum_{k: sign(tau_k) = gamma} tau_k / #{k: sign(tau_k) = gamma}  (0 where none agree)
    With equal lambda_k = lambda this is lambda times Yadav's merge. Compromise: the trim is per module
    (as peft), where Yadav et al. trim over the whole flattened task vector."""
    flat = dWs.flatten(1)  # (K, out*in)
    keep = min(flat.shape[1], math.ceil(density * flat.shape[1]))
    top = flat.abs().topk(keep, dim=1).indices
    trimmed = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top))
    tau = trimmed * torch.tensor(weights, dtype=flat.dtype, device=flat.device)[:, None]
    gamma = torch.sign(tau.sum(0))
    agree = (torch.sign(tau) == gamma) & (tau != 0)
    merged = (tau * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.view(dWs.shape[1:])


def svd_factors(dW, rank):
    """Best rank-R approximation (Eckart-Young): dW ~ U_R S_R V_R^T, split evenly as B = U_R S_R^1/2 (out, R),
    A = S_R^1/2 V_R^T (R, in), so neither factor dominates when the student trains from them."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    root = S[:rank].sqrt()
    return Vh[:rank] * root[:, None], U[:, :rank] * root[None, :]


merged = {}  # module: (A (r_m, in), B (out, r_m), scale, target dW (out, in) float64)
for name in names:
    A, B, s = zip(*(a[name] for a in adapters))
    if cfg.method == "ties":
        target = ties(torch.stack([sk * b @ a for a, b, sk in zip(A, B, s)]), weights, cfg.density)
        factors = None  # a dense dW: always through the SVD, full rank min(out, in) when --rank 0
    else:
        A_out, B_out, scale = (lora_mean if cfg.method == "lora-mean" else task_arithmetic)(A, B, s, weights)
        target = scale * B_out @ A_out
        factors = (A_out, B_out, scale)
    if cfg.rank > 0 or factors is None:
        A_out, B_out = svd_factors(target, cfg.rank or min(target.shape))
        factors = (A_out, B_out, 1.0)
    merged[name] = (*factors, target)

# -----------------------------------------------------------------------------
# output LoRA: one rank r and one alpha for every module (modules with a smaller rank are padded with zero
# rows of A / columns of B, which changes nothing; such a direction also stays zero under training, as both of
# its factors are zero), reconstruction errors of the float32 file


# r: R with --rank (a module narrower than R is padded, so the file has the rank asked for), else the largest
# module's rank. Scale: alpha / r with --alpha; else 1, or for lora-mean the first adapter's alpha/r.
r_out = cfg.rank or max(m[0].shape[0] for m in merged.values())
scale_out = cfg.alpha / r_out if cfg.alpha else merged[names[0]][2]
alpha_out = cfg.alpha or scale_out * r_out
alpha_out = int(alpha_out) if float(alpha_out).is_integer() else alpha_out
lora, errors, err2, norm2 = {}, {}, 0.0, 0.0
for name, (A_m, B_m, scale, target) in merged.items():
    # s_out B' A' = s B A with both factors times sqrt(s / s_out): the SVD's even split stays even
    # (B' = U_R (S_R / s_out)^1/2, A' = (S_R / s_out)^1/2 V_R^T); c = 1 (no change) without --alpha.
    c = math.sqrt(scale / scale_out)
    pad = r_out - A_m.shape[0]
    A_m = torch.cat([c * A_m, A_m.new_zeros(pad, A_m.shape[1])]).float().cpu()
    B_m = torch.cat([c * B_m, B_m.new_zeros(B_m.shape[0], pad)], dim=1).float().cpu()
    lora[name + ".lora_A.weight"], lora[name + ".lora_B.weight"] = A_m, B_m
    # relative Frobenius error ||dW - s B A||_F / ||dW||_F of what a loader will see (float32 factors)
    diff = (target.cpu() - scale_out * B_m.double() @ A_m.double()).norm() ** 2
    ref = target.cpu().norm() ** 2
    errors[name] = math.sqrt(diff / ref) if ref > 0 else 0.0
    err2, norm2 = err2 + float(diff), norm2 + float(ref)
overall = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
# The output's LoraConfig: the layers it adapts (as the first input names them: all inputs adapt the same modules),
# its rank and alpha, and nothing of an input's bookkeeping (a PEFT folder's inference_mode: true would load the
# student frozen in diffusers; base_model_name_or_path, revision, peft_version), so that a peft of any version
# builds LoraConfig(**config) from it as diffusers' load_lora_weights does. The other fields take peft's defaults
# (no rsLoRA, DoRA or per-module patterns: read_adapter refused those, and the output needs none). An init
# such as "pissa" or "loftq" is not carried over: peft runs it at load time, and it rewrites the base weights.
LAYOUT = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights",
          "lora_dropout")
config = {k: configs[0][k] for k in LAYOUT if configs[0].get(k) is not None}
if config.get("init_lora_weights") not in (True, False, "gaussian"):
    config.pop("init_lora_weights", None)
config.update(r=r_out, lora_alpha=alpha_out)

# lora-mean is not the mean of the updates: say by how much (relative to sum_k w_k dW_k)
lora_mean_gap = None
if cfg.method == "lora-mean":
    gap2, ref2 = 0.0, 0.0
    for name in names:
        updates = sum(w * sk * b @ a for w, (a, b, sk) in zip(weights, (ad[name] for ad in adapters)))
        gap2 += float((merged[name][3] - updates).norm() ** 2)
        ref2 += float(updates.norm() ** 2)
    lora_mean_gap = math.sqrt(gap2 / ref2) if ref2 > 0 else 0.0

# -----------------------------------------------------------------------------
# write: the LoRA, the folded transformer (optional), then the card that names them

stem = cfg.out[: -len(".safetensors")]
worlds.write_lora(cfg.out, lora, config)
folded_path = None
if base_state is not None:
    # W' = W + (alpha/r) B A for every merged module, from the float32 factors just written, so the folded
    # model is the base with the written adapter (not the untruncated target) merged in.
    folded = dict(base_state)
    for name in names:
        W = base_state[name + ".weight"]
        dW = scale_out * lora[name + ".lora_B.weight"] @ lora[name + ".lora_A.weight"]
        folded[name + ".weight"] = (W.float() + dW).to(W.dtype)
    folded_path = stem + ".folded.safetensors"
    runs.save_tensors(folded_path, folded, metadata={"format": "pt"})

card = dict(
    method=cfg.method,
    inputs=[dict(path=os.path.abspath(p), sha256=runs.input_sha256(p), r=c["r"], lora_alpha=c["lora_alpha"],
                 use_rslora=bool(c.get("use_rslora")), weight=w) for p, c, w in zip(paths, configs, weights)],
    weights=weights,
    density=cfg.density if cfg.method == "ties" else None,
    rank_requested=cfg.rank,
    rank_out=r_out,
    lora_alpha_out=alpha_out,
    modules=len(names),
    reconstruction_error=dict(overall=overall, max=max(errors.values()), per_module=errors),
    lora_mean_vs_mean_of_updates=lora_mean_gap,
    out=os.path.abspath(cfg.out),
    out_sha256=runs.input_sha256(cfg.out),
    folded=os.path.abspath(folded_path) if folded_path else None,
    settings=vars(cfg),
    seconds=round(time.time() - t_start, 2),
)
runs.write_json(stem + ".json", card)

print(f"  output: rank {r_out}, alpha {alpha_out} (scale {scale_out:g}); "
      f"reconstruction error (||dW - (alpha/r) B A||_F / ||dW||_F) "
      f"overall {overall:.3g}, worst module {max(errors.values()):.3g}" + (" (truncated SVD)" if cfg.rank else ""))
if lora_mean_gap is not None:
    print(f"  lora-mean vs the mean of the updates: relative difference {lora_mean_gap:.3g}")
print(f"  wrote {cfg.out}, {stem}.json" + (f", {folded_path}" if folded_path else "")
      + f" ({time.time() - t_start:.1f}s)")
