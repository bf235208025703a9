#!/usr/bin/env bash
# bench/gpu.sh: the GPU check (issues #16 and #26): the STAGE SCRIPTS THEMSELVES (grpo_expert.py, then opd.py), run
# as a user runs them, on ONE H100 / H200, at SD3.5-Medium's size with random weights, in under 8 minutes (a hard
# `timeout` on every step, TIMEOUT=470 s in all; whatever finished is reported).
#
#   bash bench/gpu.sh --prepare     # HERE, with network: the wheels the device lacks -> bench/wheels/ (git-ignored)
#   bash bench/gpu.sh               # ON THE DEVICE, no network: carry bench/wheels; results in $OUT (default results/bench/gpu)
#   DRY_RUN_CPU=1 bash bench/gpu.sh # the same steps on a CPU at tiny width (~25 s): a check of this file (tests/test_gpu_check.py)
#   the device call:  run(command="bash bench/gpu.sh", carry=["bench/wheels"], timeout_s=540)  ($OUT comes back)
#
# The device's image has CUDA torch, transformers 5, peft, safetensors, huggingface_hub, numpy, tqdm, but no diffusers
# and no package index. --prepare downloads (pip download --only-binary=:all: --no-deps, manylinux x86_64, CPython
# $PREPARE_PYTHONS, default 3.11 3.12 3.13 3.14: the device's Python is not known, and diffusers 0.42 requires
# >= 3.11) diffusers 0.42.* (the pinned version), Pillow (7 MB a Python), and what diffusers imports that transformers 5
# no longer brings (requests and its dependencies, importlib_metadata, ...): 38 MiB, under the 64 MiB that a device call
# carries. The real OCR reward's wheels do not fit (rapidocr 28 MB, onnxruntime 28 MB a Python, opencv 58 MB, scipy
# 35 MB a Python for rewards.levenshtein's import of tiny_world: ~160 MB for ONE Python): PREPARE_OCR=1 adds them anyway,
# for a machine that can take them, and the size check says so. So the GPU run's GRPO reward is PickScore.
# On the device, bench/install_wheels.py install puts into a temporary site folder only what the Python lacks, from
# bench/wheels (pip --no-index --no-deps: torch and transformers are never touched), and puts it on PYTHONPATH.
#
# What runs (bench/gpu_check.py; every figure comes from the stage scripts' own log.jsonl and the probe around them):
#   build   a random-weight StableDiffusion3Pipeline folder with SD3.5-Medium's configs (the transformer's: 24 layers,
#           24 heads x 64 = 1536 wide, joint_attention_dim 4096, caption_projection_dim 1536, pooled_projection_dim
#           2048, in/out_channels 16, patch_size 2, sample_size 128, pos_embed_max_size 384, dual_attention_layers
#           0..12, qk_norm rms_norm: 2.24 B parameters; CLIP-L and CLIP-G at their sizes; T5 at T5-XXL's widths but 2
#           layers of 24, to save minutes of writing and loading; SD3's VAE; character-level tokenizers built
#           offline), bf16, created on the GPU; 4 random teacher LoRAs (r 32, worlds.save_lora); small prompt files
#           (FLOWOPD_PROMPTS); a random PickScore (CLIP ViT-H/14, float32; FLOWOPD_PICKSCORE_MODEL / _PROCESSOR)
#   grpo    python grpo_expert.py --world <that folder> --task pickscore (GRPO_TASK; ocr needs rapidocr) for EPOCHS
#           epochs (default 2: the first holds the first-call costs, the table shows the last). PickScore runs where
#           rewards.get_reward puts it: the CPU unless the script passes its device
#   opd     python opd.py --world <that folder> --teachers <the 4 LoRAs> --task geneval:1,ocr:1,deqa:1,pickscore:1
#           --no-score (4 teachers + the MAR anchor, the base, as the paper; no reward servers here) for EPOCHS epochs
#   both    the paper's per-GPU batch (Flow-GRPO's SD3.5-M configs: 9 images per GPU per sampling / training batch):
#           1 prompt x 9 images per epoch, --sample-batch 9 --train-batch 9 --updates-per-epoch 1; SD3 defaults
#           (T = 10 SDE steps, 9 trained, CFG 4.5, noise 0.7); a stage that runs out of memory is rerun once with
#           --gradient-checkpointing, and so is every later stage (the log says so)
#   report  per stage: s/image per phase (the scripts' sec_* timers), forwards / backwards per image (hooks on the
#           transformer; opd.py's logged forwards_* beside them), peak GPU memory per phase (the probe:
#           torch.cuda.max_memory_allocated around each phase of the script's own timer), model TFLOP/s and MFU
#           (FLOPs per row counted on the meta device, against PEAK_TFLOPS, default 989 = H100 SXM / H200 dense bf16)
# Writes $OUT/gpu_log.txt (everything printed), $OUT/gpu_check.json, $OUT/<stage>.log, $OUT/runs/<stage>/{log.jsonl,
# config.json}, $OUT/stats_<stage>.json. Settings from the environment: PYTHON, OUT, WHEELS (default bench/wheels),
# WORK (default a temp folder, removed at the end unless KEEP_WORK=1), TIMEOUT, STAGE_TIMEOUT (default 200 s),
# EPOCHS, GROUP (images per prompt), STEPS, GRPO_TASK, GRPO_ARGS / OPD_ARGS (extra arguments), PEAK_TFLOPS.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}

# -----------------------------------------------------------------------------------------------------------------
# --prepare: download the wheels (here, with network)
if [ "${1:-}" = --prepare ]; then
  PY=${PYTHON:-}; [ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
  PYS=${PREPARE_PYTHONS:-3.11 3.12 3.13 3.14}  # diffusers 0.42 requires Python >= 3.11
  PKGS=("diffusers==0.42.*" importlib_metadata zipp lazy-importer tqdm pillow requests urllib3 certifi charset-normalizer idna
        filelock regex)
  [ -n "${PREPARE_OCR:-}" ] && PKGS+=("rapidocr>=3,<4" onnxruntime opencv-python-headless shapely pyclipper omegaconf
                                      antlr4-python3-runtime colorlog six flatbuffers protobuf scipy)
  mkdir -p "$WHEELS"
  for v in $PYS; do
    echo "prepare: wheels for CPython $v, manylinux x86_64 -> $WHEELS"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --python-version "$v" -d "$WHEELS" "${PKGS[@]}" || exit 1
  done
  ls -l "$WHEELS"
  kib=$(du -sk "$WHEELS" | cut -f1)
  echo "prepare: $WHEELS holds $(( kib / 1024 )) MiB ($(ls "$WHEELS" | wc -l) wheels); carry it to the device: run(carry=[\"$WHEELS\"], ...)"
  [ "$kib" -le $(( 60 * 1024 )) ] || echo "WARNING: over 60 MiB: a device call carries 64 MiB in all; fetch fewer Pythons (PREPARE_PYTHONS=\"3.11 3.12\") or leave PREPARE_OCR unset"
  if [ -d .git ] && [ -n "$(git status --porcelain --untracked-files=all -- "$WHEELS")" ]; then
    echo "error: git sees files in $WHEELS: it must be git-ignored (.gitignore)"; exit 1
  fi
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: bash bench/gpu.sh [--prepare]   (settings come from the environment: see the header)" >&2; exit 2; }

# -----------------------------------------------------------------------------------------------------------------
OUT_DIR=${OUT:-results/bench/gpu}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_log.txt") 2>&1
TEE=$!
MADE_WORK=""
cleanup() {  # the temporary folder, then let tee write the last lines of gpu_log.txt before this script ends
  [ -n "$MADE_WORK" ] && [ -z "${KEEP_WORK:-}" ] && rm -rf "$WORK"
  exec >&- 2>&-
  wait "$TEE" 2>/dev/null
}
trap cleanup EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PIP_NO_INDEX=1
BUDGET=${TIMEOUT:-470}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
if [ -n "${DRY_RUN_CPU:-}" ]; then  # a check of this file at tiny width, not a measurement
  SIZE=tiny; DEVICE=cpu; GROUP=${GROUP:-2}; EPOCHS=${EPOCHS:-1}; STEPS=${STEPS:-3}; THREADS=(--threads 1); export OMP_NUM_THREADS=1
else
  SIZE=medium; DEVICE=cuda; GROUP=${GROUP:-9}; EPOCHS=${EPOCHS:-2}; STEPS=${STEPS:-}; THREADS=()
fi

# 1. a Python with torch (CUDA on the device), transformers, peft, safetensors
NEED="import torch, transformers, peft, safetensors"
[ -n "${DRY_RUN_CPU:-}" ] || NEED="$NEED; assert torch.cuda.is_available()"
PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$cand" ] || continue
  if "$cand" -c "$NEED" >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  echo "error: no Python here has torch (with CUDA), transformers, peft and safetensors (set PYTHON=...); what each says:"
  for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$cand" ] && { echo "  $cand:"; "$cand" -c "import torch; print('   torch', torch.__version__, 'cuda available', torch.cuda.is_available()); import transformers, peft, safetensors" 2>&1 | tail -2; }
  done
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv,noheader 2>/dev/null || true

# 2. what it lacks, from the wheels, into a temporary site folder on PYTHONPATH
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); MADE_WORK=1; fi
mkdir -p "$WORK"
timeout 120 "$PY" bench/install_wheels.py install --wheels "$WHEELS" --site "$WORK/site" || exit 3
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

# 3. the imports, and the versions
timeout 120 "$PY" - <<'EOF' || exit 3
import sys, time
t = time.perf_counter()
import numpy, PIL, peft, safetensors, torch, transformers
import diffusers
from diffusers import StableDiffusion3Pipeline  # noqa: F401
print(f"imports: {time.perf_counter() - t:.1f} s | python {sys.version.split()[0]} | torch {torch.__version__} cuda {torch.version.cuda} | "
      f"transformers {transformers.__version__} | diffusers {diffusers.__version__} ({diffusers.__file__.rsplit('/', 2)[0]}) | "
      f"peft {peft.__version__} | safetensors {safetensors.__version__} | pillow {PIL.__version__} | numpy {numpy.__version__} | "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
try:
    import importlib.metadata, rapidocr  # noqa: F401
    print(f"rapidocr {importlib.metadata.version('rapidocr')}: the OCR reward can run (GRPO_TASK=ocr)")
except ImportError:
    print("rapidocr: not installed (GRPO_TASK=ocr needs it; PREPARE_OCR=1 fetches it, ~160 MB a Python)")
EOF

# 4. the random pipeline, teachers, prompts, PickScore
timeout "$(left)" "$PY" bench/gpu_check.py build --dir "$WORK" --size "$SIZE" --device "$DEVICE" || { echo "bench/gpu.sh: build failed (exit $?)"; exit 4; }
export FLOWOPD_PROMPTS="$WORK/prompts" FLOWOPD_PICKSCORE_MODEL="$WORK/pickscore" FLOWOPD_PICKSCORE_PROCESSOR="$WORK/pickscore"

# 5. the stage scripts, each under the probe and a hard timeout; one rerun with --gradient-checkpointing on out-of-memory
COMMON=(--world "$WORK/sd3" --epochs "$EPOCHS" --prompts-per-epoch 1 --group-size "$GROUP" --sample-batch "$GROUP"
        --train-batch "$GROUP" --updates-per-epoch 1 --grid-every 0 --no-resume "${THREADS[@]}")
[ -n "$STEPS" ] && COMMON+=(--steps "$STEPS")
T=$WORK/teachers
TEACHERS="geneval=$T/geneval.safetensors,ocr=$T/ocr.safetensors,deqa=$T/deqa.safetensors,pickscore=$T/pickscore.safetensors"
STATUS=0; CKPT=()  # --gradient-checkpointing for every later stage once one ran out of memory
run_stage() {  # name script args...
  local name=$1 script=$2; shift 2
  local limit; limit=$(left); limit=$(( limit - 10 < ${STAGE_TIMEOUT:-200} ? limit - 10 : ${STAGE_TIMEOUT:-200} ))
  if [ "$limit" -lt 20 ]; then echo "bench/gpu.sh: $name skipped: $(left) s left of TIMEOUT=$BUDGET"; STATUS=124; return; fi
  echo "== $name: $script $* (timeout $limit s)"
  rm -rf "$WORK/runs/$name"
  timeout -k 10 "$limit" "$PY" bench/gpu_check.py stage --stats "$WORK/stats_$name.json" "$script" "$@" "${CKPT[@]}" \
    --out "$WORK/runs/$name" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && grep -qi "out of memory" "$OUT_DIR/$name.log" && [ ${#CKPT[@]} -eq 0 ]; then
    echo "bench/gpu.sh: $name ran out of memory: once more, and every later stage, with --gradient-checkpointing (the same gradients, less memory)"
    CKPT=(--gradient-checkpointing)
    run_stage "$name" "$script" "$@"
    return
  fi
  [ "$rc" -eq 0 ] || { echo "bench/gpu.sh: $name failed (exit $rc; 124 = cut off by its timeout)"; STATUS=$rc; }
  mkdir -p "$OUT_DIR/runs/$name"
  cp "$WORK/runs/$name/log.jsonl" "$WORK/runs/$name/config.json" "$OUT_DIR/runs/$name/" 2>/dev/null
  cp "$WORK/stats_$name.json" "$OUT_DIR/" 2>/dev/null
}
# shellcheck disable=SC2086
run_stage grpo grpo_expert.py "${COMMON[@]}" --task "${GRPO_TASK:-pickscore}" ${GRPO_ARGS:-}
# shellcheck disable=SC2086
run_stage opd opd.py "${COMMON[@]}" --teachers "$TEACHERS" --task geneval:1,ocr:1,deqa:1,pickscore:1 --no-score ${OPD_ARGS:-}

# 6. the report
PEAK=(); [ -n "${PEAK_TFLOPS:-}" ] && PEAK=(--peak-tflops "$PEAK_TFLOPS")
"$PY" bench/gpu_check.py report --dir "$WORK" --out "$OUT_DIR" "${PEAK[@]}" || { [ "$STATUS" -ne 0 ] || STATUS=5; }
echo "bench/gpu.sh: exit $STATUS after $(( $(date +%s) - T0 )) s (results in $OUT_DIR)"
exit "$STATUS"
