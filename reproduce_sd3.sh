#!/usr/bin/env bash
# The paper's recipe on Stable Diffusion 3.5 Medium (Flow-OPD, arXiv 2605.08063), one resumable script:
#   Stage 1   the four released teachers, fetched with `hf download`:          hf download
#             Flow-GRPO's GenEval, OCR and PickScore LoRAs and the authors'
#             DeQA teacher (CostaliyA/SD3.5M-FlowGRPO-Deqa-Mix, also the MAR
#             anchor); then the GRPO-Mix baseline (epochs 3:1:1, + DeQA 1:1)  grpo_expert.py   (torchrun)
#   Cold      merge the experts (task arithmetic, | SFT on their samples         merge.py | sft_init.py
#             cut to the SFT student's r 32 / alpha 64)
#   Stage 2   multi-teacher OPD from each cold start, with MAR                   opd.py           (torchrun)
#   Tables    the main table; the quality table's aesthetic, PickScore (+ ImageReward, HPS-v2.1) evaluate.py (torchrun)
#
#   bash reproduce_sd3.sh SD3_FOLDER                                   # one node, 8 GPUs
#   bash reproduce_sd3.sh --nnodes 4 --nproc-per-node 8 --head HOST --node-rank R SD3_FOLDER   # on EVERY node
#   bash reproduce_sd3.sh --dry-run --nnodes 4 --head HOST SD3_FOLDER  # print the commands, run nothing
#   bash reproduce_sd3.sh --toy TINY_SD3_FOLDER                        # the same stages, tiny budgets, plain CPU
#                                                                      # processes (what tests/test_sd3_pipeline.py runs)
# Options: --out DIR (default results/sd3; results/sd3-toy with --toy; on a filesystem every node sees),
#          --port P (rendezvous port on the head node, default 29500),
#          --released DIR (default $OUT/released): where the four released teachers (PEFT folders) are fetched once,
#              hf download <repo> --local-dir DIR/<name>, before any stage (the dry run prints the four lines). Every
#              teacher is then named by its content hash in each OPD run's config.json and resume check and in the
#              tables' rows (one hub name has held two uploads: Flow-GRPO issue #9).
#          --ocr-3240: the OCR teacher is the authors' re-optimised CostaliyA/SD3.5M-FlowGRPO-OCR-3240 instead of
#              jieliu/SD3.5M-FlowGRPO-Text (the official README lists it, on its GenEval line, beside "we optimized the
#              OCR and Deqa experts"; the paper does not say which one its Table 1 used).
#          --train-deqa: train the DeQA teacher as the paper describes instead of fetching it (~540 GPU-hours, est.).
#          --train-experts: train all four experts from scratch (~2,150 GPU-hours more, est.; what --toy does, having no
#              released teachers of a tiny random pipeline).
#          --mix-weights paper|official: GRPO-Mix's reward, the paper's text (task + DeQA, 1:1; default) or the official
#              config geneval_ocr_deqa_pickscore_32gpu (0.8 task + 0.2 DeQA, given as --reward deqa:0.25: advantages are
#              divided by the batch's std, so 0.8 (task + 0.25 DeQA) trains the same up to the std's 1e-4).
# Environment: FLOWOPD_GENEVAL_URL / FLOWOPD_DEQA_URL (the reward servers, default http://127.0.0.1:18085 / :18086),
#   FLOWOPD_PROMPTS (prompt root holding sd3/, default prompts/), FLOWOPD_AESTHETIC_MLP (the quality table's aesthetic
#   head; without it only the main table is made), FLOWOPD_IMAGEREWARD_DIR / FLOWOPD_HPSV2_CHECKPOINT (add the paper's
#   ImageReward / HPS-v2.1 columns; packages image-reward, hpsv2), the budgets below (EXPERT_EPOCHS=... bash reproduce_sd3.sh ...),
#   NOMAR=1 (also OPD from the merge without MAR, the quality table's "w/o MAR" row), PY / TORCHRUN (interpreters).
#
# Resumable: a stage is skipped when its output exists (its folder's DONE file, written when the stage's command
# exits 0, beside adapter.safetensors); an interrupted stage has no DONE and its script resumes from its own
# checkpoint when rerun. Delete a DONE file to redo a stage. Multi-node: every node runs this same script with its
# --node-rank (default $NODE_RANK or $SLURM_NODEID); the torchrun stages meet at the head node (c10d rendezvous, one
# rendezvous id per stage); the merge, a few seconds of CPU, runs on node 0 alone while the others wait for its DONE
# (a node that merged again could replace the adapter that a faster node's OPD is reading). --max-restarts R (default
# 2): torchrun restarts every node's workers from their last checkpoint after a worker fails, up to R times a stage
# (docs/FAILURES.md).
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: bash reproduce_sd3.sh [--toy] [--dry-run] [--nnodes N] [--nproc-per-node G] [--head HOST] [--node-rank R] [--port P] [--max-restarts N] [--out DIR] [--released DIR] [--ocr-3240] [--train-deqa] [--train-experts] [--mix-weights paper|official] SD3_FOLDER" >&2; exit 2; }
TOY=0; DRY=0; NNODES=1; NPROC=8; HEAD=""; PORT=29500; OUT=""; SD=""; RELEASED=""; TRAIN_EXPERTS=0; TRAIN_DEQA=0; OCR3240=0
MIX_WEIGHTS=paper; NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}; RESTARTS=2
while [ $# -gt 0 ]; do
  case $1 in
    --toy) TOY=1 ;;
    --dry-run) DRY=1 ;;
    --nnodes) NNODES=${2:?}; shift ;;
    --nproc-per-node|--nproc_per_node) NPROC=${2:?}; shift ;;
    --head) HEAD=${2:?}; shift ;;
    --port) PORT=${2:?}; shift ;;
    --node-rank) NODE_RANK=${2:?}; shift ;;
    --max-restarts) RESTARTS=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --released) RELEASED=${2:?}; shift ;;
    --train-experts) TRAIN_EXPERTS=1 ;;
    --train-deqa) TRAIN_DEQA=1 ;;
    --ocr-3240) OCR3240=1 ;;
    --mix-weights) MIX_WEIGHTS=${2:?}; shift ;;
    -h|--help) sed -n "2,$(($(grep -n '^set -euo pipefail' "$0" | cut -d: -f1) - 2))p" "$0"; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) [ -z "$SD" ] || { echo "error: one SD3 folder, got '$SD' and '$1'" >&2; usage; }; SD=$1 ;;
  esac
  shift
done
[ -n "$SD" ] || { echo "error: give the Stable Diffusion 3.5 Medium folder (or hub id)" >&2; usage; }
[[ $NNODES =~ ^[1-9][0-9]*$ && $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "error: --nnodes and --nproc-per-node take positive integers" >&2; exit 2; }
[ $NNODES -eq 1 ] || [ -n "$HEAD" ] || { echo "error: --nnodes $NNODES needs --head HOST (the first node's address)" >&2; exit 2; }
[ $NNODES -eq 1 ] || [ $DRY = 1 ] || [ -n "$NODE_RANK" ] || { echo "error: --nnodes $NNODES needs --node-rank R (0 on the head node; or NODE_RANK / SLURM_NODEID)" >&2; exit 2; }
[[ $RESTARTS =~ ^[0-9]+$ ]] || { echo "error: --max-restarts takes a whole number >= 0" >&2; exit 2; }
case $MIX_WEIGHTS in paper) MIX_DEQA=1 ;; official) MIX_DEQA=0.25 ;; *) echo "error: --mix-weights $MIX_WEIGHTS: paper (task + DeQA 1:1) or official (0.8 task + 0.2 DeQA)" >&2; exit 2 ;; esac
if [ $DRY = 0 ] && [ ! -f "$SD/model_index.json" ] && [[ ! $SD =~ ^[^/]+/[^/]+$ ]]; then
  echo "error: $SD is not a Stable Diffusion 3 pipeline folder (no model_index.json) nor a hub id" >&2; exit 2
fi
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}; HF=${HF:-.venv/bin/hf}; fi
PY=${PY:-python}; TORCHRUN=${TORCHRUN:-torchrun}; HF=${HF:-hf}  # hf: huggingface_hub's CLI (the older one is gone in 1.0)

# ---- budgets. The paper gives none of the epoch counts (Flow-GRPO's configs set a huge num_epochs and stop by hand
#      when the evaluation reward plateaus); these are this project's choices, override them from the environment.
EXPERT_EPOCHS=${EXPERT_EPOCHS:-1000}  # 2 optimizer steps each (Flow-GRPO: gradient accumulation = half an epoch)
MIX_EPOCHS=${MIX_EPOCHS:-1000}
SFT_ITEMS=${SFT_ITEMS:-256}           # teacher samples per task (paper silent: sft_init.py's default)
SFT_STEPS=${SFT_STEPS:-1000}          # optimizer steps of 32 items (paper silent: sft_init.py's default)
OPD_EPOCHS=${OPD_EPOCHS:-500}

# ---- the paper's settings (PAPER-NOTES sections 2-4; 512 px, T = 10 SDE steps with the first 9 trained, CFG 4.5,
#      noise level 0.7, 40 ODE evaluation steps, LoRA r 32 / alpha 64 on the attention projections, AdamW wd 1e-4,
#      grad clip 1, EMA 0.9 every 8 steps: worlds.SD3_DEFAULTS and the scripts' defaults, so not repeated here).
# Experts, Flow-GRPO: 48 prompts x G = 24 images per epoch, lr 3e-4, clip range 1e-4, advantages over the batch
# clipped to 5, beta 0.04 GenEval/OCR and 0.01 PickScore (DeQA: paper silent, 0.01; grpo_expert.py's per-task
# defaults). Flow-GRPO's per-GPU batch of 9 (its train_batch_size) sets the forwards; it changes no result (gradients
# sum over the epoch's half), so lower it if memory says so, or set TRAIN_EXTRA=--gradient-checkpointing (the same
# gradients; TRAIN_EXTRA is added to every training stage). 1152 images must divide over the ranks (8, 16, 32 GPUs do).
TRAIN_EXTRA=${TRAIN_EXTRA:-}
EXPERT="--prompts-per-epoch 48 --group-size 24 --sample-batch 9 --train-batch 9 $TRAIN_EXTRA"
# GRPO-Mix (the paper's appendix): epochs alternate 3:1:1 over GenEval, OCR and PickScore, each epoch on its task's
# prompts and reward, DeQA's reward summed 1:1 (--mix-weights official: 0.8 / 0.2, as deqa:0.25); lr 1e-4 and beta
# 0.04 (the official mix config: grpo_expert.py's defaults for a mix).
MIX="--task geneval:3,ocr:1,pickscore:1 --mix epochs --reward deqa:$MIX_DEQA --lr 1e-4 $EXPERT"
# The DeQA teacher, only with --train-deqa / --train-experts (by default the authors' released one): the paper's
# "trained across the three datasets by blending DeQA and PickScore rewards at a 4:6 ratio"; the epochs and beta 0.01
# (the smaller of DeQA's and PickScore's) are guesses.
DEQA="--prompts geneval,ocr,pickscore --reward deqa:0.4,pickscore:0.6 $EXPERT"
# The merge's output: the SFT student's rank and alpha (r 32, alpha 64), so that OPD from either cold start trains an
# adapter of one size at one effective learning rate (the exact task-arithmetic sum of four r 32 experts is r 128).
MERGE="--method task-arithmetic --rank 32 --alpha 64"
# OPD, the official config: 16 images per prompt, lr 1e-4, the KL minimised directly (its advantage -KL is not
# detached: opd.py --opd-loss direct, README "Which OPD loss"), EMA 0.9 every 8 steps (opd.py's defaults);
# 32 prompts per epoch (paper silent; 512 images, this project's choice); hard routing, each task to its own expert,
# tasks drawn 1:1:1:1 (paper silent; the official 8-GPU config has only OCR 1 : GenEval 3). MAR: lambda 0.02 (the
# paper's appendix; the official configs 0.04) toward the DeQA expert (the paper; the official code falls back to
# the base). Training forwards of 8 (16 with CFG) for memory; no result depends on it.
OPD="--prompts-per-epoch 32 --group-size 16 --sample-batch 16 --train-batch 8 --mar-weight 0.02 --mar-teacher deqa $TRAIN_EXTRA"
SFT="--prompts-per-task $SFT_ITEMS --steps $SFT_STEPS $TRAIN_EXTRA"
EVAL="--deqa-scale 5"  # yifan123/reward-server's DeQA answers score / 5: back to DeQA's 1-5 scale
TABLES="main,quality"
[ -n "${FLOWOPD_AESTHETIC_MLP:-}" ] || TABLES="main"  # the quality table's aesthetic score needs its MLP head
# the quality table: aesthetic and PickScore, plus the paper's ImageReward and HPS-v2.1 where their weights are set
# (optional packages image-reward, hpsv2; rewards.py); the paper's QwenVL judge is not wired
QUALITY="aesthetic,pickscore"
[ -z "${FLOWOPD_IMAGEREWARD_DIR:-}" ] || QUALITY="imagereward,$QUALITY"
[ -z "${FLOWOPD_HPSV2_CHECKPOINT:-}" ] || QUALITY="$QUALITY,hpsv2"
[ $TABLES = main ] || EVAL="$EVAL --quality-metrics $QUALITY"

if [ $TOY = 1 ]; then  # the same sequence with tiny budgets: 4 SDE steps, a few images per epoch, no EMA lag
  OUT=${OUT:-results/sd3-toy}; EXPERT_EPOCHS=1; MIX_EPOCHS=1; SFT_ITEMS=2; SFT_STEPS=2; OPD_EPOCHS=6
  SMALL="--group-size 2 --steps 4 --ema-every 1 --ema-decay 0 --grid-every 0 --threads 1"
  EXPERT="$SMALL --prompts-per-epoch 2 --sample-batch 4 --train-batch 4 --lr 1e-2"
  MIX="--task geneval:3,ocr:1,pickscore:1 --mix epochs --reward deqa:$MIX_DEQA $EXPERT"
  DEQA="--prompts geneval,ocr,pickscore --reward deqa:0.4,pickscore:0.6 $EXPERT"
  [ -n "$RELEASED" ] || TRAIN_EXPERTS=1  # a tiny random pipeline has no released teachers
  # OPD: 8 images an epoch over the four tasks (an epoch's KL is then not one task's), one optimizer step per image,
  # lr 1e-3: the toy teachers are 2 Adam steps from the base, and a larger step overshoots that gap (measured: KL
  # falls ~3x over 6 epochs at 1e-3, bounces at 3e-3). --no-score: OPD only logs its samples' task rewards, and
  # rapidocr on every epoch was most of a toy epoch's time.
  OPD="$SMALL --prompts-per-epoch 4 --sample-batch 8 --train-batch 8 --updates-per-epoch 8 --lr 1e-3 --no-score --mar-weight 0.02 --mar-teacher deqa"
  SFT="--prompts-per-task $SFT_ITEMS --steps $SFT_STEPS --batch 4 --train-batch 4 --sample-steps 4 --sample-batch 8 --probe 0 --ema-every 1 --ema-decay 0 --threads 1"
  EVAL="--deqa-scale 5 --limit 1 --images-per-prompt 1 --steps 4 --batch-size 8 --grid-prompts 1 --threads 1"
  TABLES="main"
fi
OUT=${OUT:-results/sd3}
RUNS=$OUT/runs
RELEASED=${RELEASED:-$OUT/released}
# the released teachers: hub repository per task (the folder under $RELEASED is the repository's name)
declare -A RELEASE_REPO=([geneval]=jieliu/SD3.5M-FlowGRPO-GenEval [ocr]=jieliu/SD3.5M-FlowGRPO-Text
                         [pickscore]=jieliu/SD3.5M-FlowGRPO-PickScore [deqa]=CostaliyA/SD3.5M-FlowGRPO-Deqa-Mix)
[ $OCR3240 = 0 ] || RELEASE_REPO[ocr]=CostaliyA/SD3.5M-FlowGRPO-OCR-3240
[ $TRAIN_EXPERTS = 0 ] || TRAIN_DEQA=1
trained() { [ $TRAIN_EXPERTS = 1 ] || { [ "$1" = deqa ] && [ $TRAIN_DEQA = 1 ]; }; }  # is task $1's teacher trained here?
TASKS="geneval ocr deqa pickscore"

if [ $TOY = 1 ]; then
  launch() { echo "$PY $*"; }
elif [ $NNODES = 1 ]; then
  launch() { echo "$TORCHRUN --nnodes 1 --nproc_per_node $NPROC --standalone --max-restarts $RESTARTS $*"; }
else
  launch() { echo "$TORCHRUN --nnodes $NNODES --nproc_per_node $NPROC --rdzv_backend c10d --rdzv_endpoint $HEAD:$PORT --rdzv_id flowopd-$STAGE --max-restarts $RESTARTS $*"; }
fi

# stage NAME FOLDER COMMAND...: run COMMAND unless FOLDER/DONE exists, then write FOLDER/DONE (the command line)
stage() {
  STAGE=$1; local dir=$2; shift 2
  local cmd; cmd=$("$@")
  if [ -f "$dir/DONE" ]; then
    echo "== $STAGE: done ($dir/DONE), skipped"; [ $DRY = 0 ] || echo "# $cmd"; return 0
  fi
  echo "== $STAGE"
  if [ $DRY = 1 ]; then echo "$cmd"; return 0; fi
  echo "+ $cmd"
  local start=$SECONDS
  eval "$cmd"
  mkdir -p "$dir" && { [ -f "$dir/DONE" ] || echo "$cmd" > "$dir/DONE"; }
  echo "== $STAGE finished in $((SECONDS - start)) s"
}
plain() { echo "$PY $*"; }
# once COMMAND...: a CPU stage that writes shared files: node 0 runs it, the other nodes wait for its DONE (an hour at most)
once() { if [ "${NODE_RANK:-0}" = 0 ]; then plain "$@"; else echo "wait_done $RUNS/$STAGE"; fi; }
wait_done() {
  local i; for ((i = 0; i < 720; i++)); do [ -f "$1/DONE" ] && return 0; sleep 5; done
  echo "error: node $NODE_RANK waited an hour for $1/DONE from node 0: is --out on a filesystem that every node shares?" >&2; return 1
}

# side NAME COMMAND...: with --toy, run COMMAND (a stage or a chain of stages) beside the others of its wave, its
# output in $OUT/logs/NAME.log, printed by `together`, which waits for the wave. A toy stage is mostly Python
# start-up on one CPU thread, so two cores take two at once. Without --toy: run it now, in order.
SIDE=()
side() {
  local name=$1; shift
  if [ $TOY = 1 ] && [ $DRY = 0 ]; then
    mkdir -p "$OUT/logs"; ("$@") > "$OUT/logs/$name.log" 2>&1 & SIDE+=("$!:$name")
  else
    "$@"
  fi
}
together() {
  local p failed=""
  for p in ${SIDE[@]+"${SIDE[@]}"}; do
    wait "${p%%:*}" || failed="$failed ${p#*:}"
    cat "$OUT/logs/${p#*:}.log"
  done
  SIDE=()
  [ -z "$failed" ] || { echo "error: failed:$failed (their output is above and in $OUT/logs/)" >&2; exit 1; }
}

# ---- preflight (not in --dry-run): every prompt file and reward server the recipe needs, before hours of GPU time
if [ $DRY = 0 ]; then
  "$PY" - "$SD" <<'EOF'
import os, socket, sys, types, urllib.parse
import rewards, worlds
world = types.SimpleNamespace(kind="sd3")
for task in worlds.TASKS:  # one error line naming the file and where to get it (worlds.prompt_file)
    for split in ("train", "test"):
        worlds.prompt_file(world, task, split)
for task, (env, default) in rewards.DEFAULT_URLS.items():
    url = urllib.parse.urlparse(os.environ.get(env) or default)
    try:
        socket.create_connection((url.hostname, url.port or 80), timeout=10).close()
    except OSError as e:
        sys.exit(f"error: no {task} reward server at {url.geturl()} ({e}): start yifan123/reward-server's app (README) or set {env}")
ocr = rewards.ocr_engine()  # one error line with the install command when the engine asked for is missing
print(f"preflight: prompt files and reward servers found on {socket.gethostname()}; "
      f"OCR: {ocr['engine']} {ocr['version']} ({ocr['models']})")
EOF
fi

# ---- the released teachers, fetched once (every node may run this: hf download skips the files it already has)
for t in $TASKS; do
  trained $t && continue
  f=$RELEASED/${RELEASE_REPO[$t]#*/}
  if [ $DRY = 1 ]; then echo "$HF download ${RELEASE_REPO[$t]} --local-dir $f"; continue; fi
  [ -f "$f/adapter_config.json" ] || "$HF" download "${RELEASE_REPO[$t]}" --local-dir "$f" \
    || { echo "error: could not fetch the released $t teacher: $HF download ${RELEASE_REPO[$t]} --local-dir $f (pip install -r requirements.txt installs hf), or pass --train-experts" >&2; exit 2; }
  [ -f "$f/adapter_config.json" ] || { echo "error: $f has no adapter_config.json: not a PEFT adapter folder (expected ${RELEASE_REPO[$t]})" >&2; exit 2; }
done

TEACHERS=""; ADAPTERS=""; GAIN=""; EXPERTS=""
teacher() {  # where task $1's teacher is: the released folder, or this recipe's own run
  if trained $1; then echo "$RUNS/grpo-$1/adapter.safetensors"; else echo "$RELEASED/${RELEASE_REPO[$1]#*/}"; fi
}
for t in $TASKS; do
  TEACHERS="$TEACHERS${TEACHERS:+,}$t=$(teacher $t)"
  ADAPTERS="$ADAPTERS${ADAPTERS:+,}$(teacher $t)"
  GAIN="$GAIN${GAIN:+,}$t=grpo-$t"
  EXPERTS="$EXPERTS,grpo-$t=$(teacher $t)"
done
W="--world $SD"
[ $DRY = 0 ] || echo "# teachers: $TEACHERS"

# ---- Stage 1: experts only where asked (--train-experts, --train-deqa), then GRPO-Mix
for t in geneval ocr pickscore; do
  trained $t || continue
  side grpo-$t stage grpo-$t $RUNS/grpo-$t launch grpo_expert.py $W --task $t $EXPERT --epochs $EXPERT_EPOCHS --out $RUNS/grpo-$t
done
if trained deqa; then
  side grpo-deqa stage grpo-deqa $RUNS/grpo-deqa launch grpo_expert.py $W $DEQA --epochs $EXPERT_EPOCHS --out $RUNS/grpo-deqa
fi
side grpo-mix stage grpo-mix $RUNS/grpo-mix launch grpo_expert.py $W $MIX --epochs $MIX_EPOCHS --out $RUNS/grpo-mix
together

# ---- Cold start, then Stage 2 from it: OPD with MAR, from each cold start
# Merge: the four experts' updates by task arithmetic, cut to the SFT student's rank by SVD (the paper gives no formula;
# the official code averages the A and B factors of three experts: merge.py --method lora-mean, also r 32).
from_merge() {
  stage merge $RUNS/merge once merge.py --adapters $ADAPTERS $MERGE --out $RUNS/merge/adapter.safetensors
  stage opd-merge $RUNS/opd-merge launch opd.py $W --student $RUNS/merge/adapter.safetensors --teachers $TEACHERS $OPD --epochs $OPD_EPOCHS --out $RUNS/opd-merge
  if [ "${NOMAR:-0}" = 1 ]; then
    stage opd-merge-nomar $RUNS/opd-merge-nomar launch opd.py $W --student $RUNS/merge/adapter.safetensors --teachers $TEACHERS $OPD --mar-weight 0 --epochs $OPD_EPOCHS --out $RUNS/opd-merge-nomar
  fi
}
# SFT on the experts' samples (sft_init.py: ODE samples of each task's expert, SD3's flow-matching loss)
from_sft() {
  stage sft-init $RUNS/sft-init launch sft_init.py $W --teachers $TEACHERS $SFT --out $RUNS/sft-init
  stage opd-sft $RUNS/opd-sft launch opd.py $W --student $RUNS/sft-init/adapter.safetensors --teachers $TEACHERS $OPD --epochs $OPD_EPOCHS --out $RUNS/opd-sft
}
side from-merge from_merge
side from-sft from_sft
together
MODELS="base$EXPERTS,grpo-mix=$RUNS/grpo-mix/adapter.safetensors,merge-init=$RUNS/merge/adapter.safetensors"
MODELS="$MODELS,sft-init=$RUNS/sft-init/adapter.safetensors,opd-sft=$RUNS/opd-sft/adapter.safetensors,opd-merge=$RUNS/opd-merge/adapter.safetensors"
[ "${NOMAR:-0}" != 1 ] || MODELS="$MODELS,opd-merge-nomar=$RUNS/opd-merge-nomar/adapter.safetensors"

# ---- Tables: every model on GenEval (GenEval's score: the mean of its six category means; its 553 distinct prompts,
#      4 images each; strict correctness an extra column), OCR, DeQA (DrawBench's 200) and PickScore test prompts
stage evaluate $OUT/tables launch evaluate.py $W --models $MODELS --tables $TABLES --gain-of $GAIN $EVAL --out $OUT/tables --cache $OUT/eval_cache
[ $DRY = 1 ] || echo "tables: $OUT/tables (main.md, main.json$([ $TABLES = main ] || echo ', quality.md'))"
