#!/usr/bin/env bash
# The whole Flow-OPD pipeline on the tiny world, from a clean clone, on a CPU:
#   Stage 1   four Flow-GRPO experts (deqa: the paper's DeQA teacher), GRPO-Mix grpo_expert.py
#   Cold      merge the experts (task arithmetic) | SFT on their samples        merge.py | sft_init.py
#   Stage 2   multi-teacher OPD from each cold start, with and without MAR      opd.py
#   Tables    the paper's main / OOD / quality tables, and every run's curves       evaluate.py, curves.png
#
#   bash reproduce.sh              # full run (25 minutes on 2 CPU cores)
#   bash reproduce.sh --quick      # the same tables with far fewer steps (minutes; numbers meaningless)
#   bash reproduce.sh --ablations  # after the full run: merge methods, OPD losses, MAR's anchor, one-teacher OPD,
#                                  # other routings (results/tiny/ablations/, ~19 minutes)
#   bash reproduce.sh --smoke      # the pipeline's plumbing in ~2 minutes (what the test suite runs;
#                                  # REPRO_OUT=folder sets where it writes)
#   REPRO_SEED=1 bash reproduce.sh # the whole pipeline again with another training seed (prompt draws and SDE
#                                  # noise of every RL stage and SFT; the evaluation's prompts and noise stay),
#                                  # into results/tiny-seed1/: the run-to-run spread the README's claims need
#
# Every training stage resumes from its checkpoint, and only when the checkpoint records the same settings and
# inputs (sha256): a rerun after an interruption continues, and a rerun with a changed flag into the same folder
# stops with one line instead of continuing the old run. merge.py (seconds) always reruns; evaluate.py reuses a
# score only when the model, prompts and sampling settings it was computed with are the same. Results:
# results/tiny/ (quick: results/tiny-quick/).
set -euo pipefail
cd "$(dirname "$0")"

MODE=${1:-full}
case $MODE in
  full|--quick|--smoke|--ablations) ;;
  *) echo "error: reproduce.sh takes no argument or one of --quick, --smoke, --ablations; got '$MODE'" >&2; exit 2 ;;
esac

# ---- set-up: a local virtual environment with the pinned requirements (once)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
fi
PY=.venv/bin/python
export HF_HUB_OFFLINE=1

# ---- budgets: full (and --ablations), quick, smoke. SMALL shrinks the RL batches in smoke mode only.
OUT=results/tiny; EXPERT_EPOCHS=50; MIX_EPOCHS=50; SFT_STEPS=400; SFT_ITEMS=128; OPD_EPOCHS=20; EVAL_LIMIT=64; SMALL=""; EVAL_SMALL=""
SEED=${REPRO_SEED:-0}
case $SEED in ''|*[!0-9]*) echo "error: REPRO_SEED must be a whole number, got '$SEED'" >&2; exit 2 ;; esac
if [ $SEED != 0 ] && [ $MODE = full -o $MODE = --ablations ]; then OUT=results/tiny-seed$SEED; fi
if [ $MODE = --quick ]; then
  OUT=results/tiny-quick; EXPERT_EPOCHS=2; MIX_EPOCHS=2; SFT_STEPS=10; SFT_ITEMS=8; OPD_EPOCHS=2; EVAL_LIMIT=8
elif [ $MODE = --smoke ]; then
  OUT=${REPRO_OUT:-results/tiny-smoke}; EXPERT_EPOCHS=1; MIX_EPOCHS=1; SFT_STEPS=2; SFT_ITEMS=2; OPD_EPOCHS=1; EVAL_LIMIT=1
  SMALL="--prompts-per-epoch 2 --group-size 4 --grid-every 0"; EVAL_SMALL="--steps 6 --grid-prompts 1"
fi
LR=1e-3  # tiny-world learning rate of experts and OPD (Flow-GRPO's 3e-4 / OPD's 1e-4 are slow for a 50-epoch CPU
         # budget). Measured on the four-run base (commit c9e812d), `grpo_expert.py --task deqa --ema-every 1
         # --epochs 60 --lr X`: the mean training reward of epochs 1-10 -> 51-60 goes 0.72 -> 0.81 at 1e-3
         # and collapses 0.72 -> 0.03 at 3e-3.
# OPD distils the first 6 of the 10 steps (timestep fraction 0.6) to fit the 30-minute budget.
OPD="--lr $LR --timestep-fraction 0.6 --seed $SEED"
# EMA of the trained weights every optimizer step: Flow-GRPO's "0.9 every 8 steps" assumes thousands of
# steps; over the ~100 steps of a tiny run it would leave the saved adapter 28% at its initialisation (0.9^12).
EMA="--ema-every 1"
# The G images of a prompt share their initial noise (Flow-GRPO's same_latent): with the 2-step SDE window
# they then differ only by the window's noise, the actions being trained. Measured on the four-run base
# (commit c9e812d; 50 epochs each, evaluate.py --limit 64): deqa expert 0.872 -> 0.880, pickscore expert
# 0.866 -> 0.899 (base 0.785 / 0.890).
GRPO="--lr $LR --same-latent --seed $SEED"
RUNS=$OUT/runs
TASKS="geneval ocr deqa pickscore"

TEACHERS=""
ADAPTERS=""
GAIN=""  # evaluate.py --gain-of: each task's teacher, for the table of each model's share of its gain
EXPERTS=""  # the experts as evaluate.py --models entries (",grpo-geneval=...,grpo-ocr=...")
for t in $TASKS; do
  TEACHERS="$TEACHERS${TEACHERS:+,}$t=$RUNS/grpo-$t/adapter.safetensors"
  ADAPTERS="$ADAPTERS${ADAPTERS:+,}$RUNS/grpo-$t/adapter.safetensors"
  GAIN="$GAIN${GAIN:+,}$t=grpo-$t"
  EXPERTS="$EXPERTS,grpo-$t=$RUNS/grpo-$t/adapter.safetensors"
done


# Two lanes: the stages that do not need each other run side by side, each on half the cores. A model this
# small keeps one core busy, not two: measured on 2 cores, an expert's epoch takes 4.6 s alone on 2 threads and
# 4.7 s on 1 thread beside another expert, so two lanes halve the wall time. Each lane's output goes to
# $RUNS/<stage>.log; a lane that fails stops the script with its log's last lines.
mkdir -p $RUNS
THREADS="--threads $(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))"
stage() { echo "== $1"; shift; "$@"; }  # in a lane of several stages: a "== name" line in its log, then the stage
last_epochs() {  # last_epochs LOG LANE: "   stage: line" for each stage of a lane's log (after its "== stage" line;
                 # the lane's name before any): its last "epoch N: ..." or "step N ..." line, or its last line if none
  tr '\r' '\n' < $1 | grep -a -v '^\s*$' | awk -v name="$2" '
    /^== / { name = $2; if (!(name in seen)) { seen[name] = 1; order[++n] = name }; next }
    { if (!(name in seen)) { seen[name] = 1; order[++n] = name }; l[name] = $0 }
    /^(epoch|step) [0-9]/ { e[name] = $0 }
    END { for (i = 1; i <= n; i++) { k = order[i]; print "   " k ": " substr(e[k] != "" ? e[k] : l[k], 1, 150) } }'
}
lanes() {  # lanes "name: command ; command" "name: command": run each lane in the background, wait for all
  local pids=() names=() i=0 status=0
  for lane in "$@"; do
    names+=("${lane%%:*}")
    (eval "${lane#*:}") > $RUNS/${lane%%:*}.log 2>&1 & pids+=($!)
  done
  for pid in "${pids[@]}"; do
    if wait $pid; then last_epochs $RUNS/${names[$i]}.log ${names[$i]}
    else status=1; echo "error: ${names[$i]} failed; the end of $RUNS/${names[$i]}.log:" >&2; tail -n 20 $RUNS/${names[$i]}.log >&2; fi
    i=$((i + 1))
  done
  return $status
}
# The deqa expert as the paper trains its DeQA teacher (as reproduce_sd3.sh's $DEQA): DeQA 0.4 + PickScore 0.6 over
# the GenEval, OCR and PickScore training prompts; the deqa test prompts stay its evaluation set. Trained on the
# deqa prompts and reward alone (--task deqa) it learnt to drop named objects: -0.367 +- 0.023 named colours drawn
# on deqa prompts, paired on the base (docs/TINY_WORLD.md).
DEQA="--prompts geneval,ocr,pickscore --reward deqa:0.4,pickscore:0.6"
expert() {  # expert TASK: Flow-GRPO on TASK's prompts and reward (deqa: $DEQA), into $RUNS/grpo-TASK
  local how="--task $1"; [ $1 != deqa ] || how=$DEQA
  $PY grpo_expert.py $how $GRPO $EMA $SMALL $THREADS --epochs $EXPERT_EPOCHS --out $RUNS/grpo-$1
}
opd() { $PY opd.py $EMA $OPD $SMALL $THREADS --epochs $OPD_EPOCHS "$@"; }  # OPD at the run's settings; a flag given again wins

# ---- Ablations (after the full run): the merge methods of merge.py, the three OPD losses of opd.py, MAR toward
#      the deqa expert, OPD with a single teacher, and two other routings; the OPD runs go in two lanes
if [ $MODE = --ablations ]; then
  for f in ${ADAPTERS//,/ } $RUNS/merge/adapter.safetensors $RUNS/opd-merge/adapter.safetensors $RUNS/opd-merge-nomar/adapter.safetensors; do  # what it reuses
    [ -f $f ] || { echo "error: $f is missing: run 'bash reproduce.sh' (the full run) first" >&2; exit 1; }
  done
  # ... and they must be the models $OUT/main.md was computed from (evaluate.py records their sha256)
  $PY - $OUT/eval_config.json <<'EOF'
import json, os, sys, runs
path = sys.argv[1]
if not os.path.exists(path):
    sys.exit(f"error: {path} is missing: run 'bash reproduce.sh' (the full run) first")
config = json.load(open(path))
for label, model in config["models"].items():
    if model and os.path.isfile(model) and runs.content_sha256(model) != config["model_sha256"][label]:
        sys.exit(f"error: {model} is not the {label} that {os.path.dirname(path)}/main.md was computed from "
                 f"({path} records sha256 {config['model_sha256'][label][:12]}...): rerun 'bash reproduce.sh' first")
EOF
  for m in lora-mean ties; do
    echo "== merge ($m)"
    $PY merge.py --adapters $ADAPTERS --method $m --out $RUNS/merge-$m/adapter.safetensors
  done
  MERGED="--student $RUNS/merge/adapter.safetensors"; ONE="--task deqa --teachers deqa=$RUNS/grpo-deqa/adapter.safetensors"
  # Lane 1: the OPD losses (--opd-loss pg, pg-sample), and MAR as the paper sets it: the anchor is its
  #   DeQA-trained expert, not the base (the official code's fallback, which the full run uses).
  # Lane 2: OPD's dense signal with one teacher and no conflicts (the deqa expert distilled into a fresh student
  #   on deqa prompts only; then for a quarter of the epochs, as many deqa prompts as the four-teacher run
  #   distils); four-task OPD with the GenEval and OCR prompts routed to the frozen base (do OPD's GenEval and OCR
  #   gains come from their teachers, or from training at all?), and with the GenEval prompts routed to the deqa
  #   expert (what a wrong teacher for a task costs that task).
  echo "== OPD losses, MAR toward the deqa expert | one-teacher OPD, other routings (two lanes)"
  lanes "opd-losses: stage opd-merge-pg opd --opd-loss pg $MERGED --teachers $TEACHERS --out $RUNS/opd-merge-pg && \
         stage opd-merge-pg-sample opd --opd-loss pg-sample $MERGED --teachers $TEACHERS --out $RUNS/opd-merge-pg-sample && \
         stage opd-merge-mar-deqa opd --mar-teacher deqa $MERGED --teachers $TEACHERS --out $RUNS/opd-merge-mar-deqa" \
        "opd-routings: stage opd-deqa-only opd $ONE --out $RUNS/opd-deqa-only && \
         stage opd-deqa-only-quarter opd $ONE --epochs $((OPD_EPOCHS / 4)) --out $RUNS/opd-deqa-only-quarter && \
         stage opd-merge-go-base opd $MERGED --out $RUNS/opd-merge-go-base \
           --teachers geneval=base,ocr=base,deqa=$RUNS/grpo-deqa/adapter.safetensors,pickscore=$RUNS/grpo-pickscore/adapter.safetensors && \
         stage opd-merge-scenes-deqa opd $MERGED --out $RUNS/opd-merge-scenes-deqa \
           --teachers geneval=$RUNS/grpo-deqa/adapter.safetensors,ocr=$RUNS/grpo-ocr/adapter.safetensors,deqa=$RUNS/grpo-deqa/adapter.safetensors,pickscore=$RUNS/grpo-pickscore/adapter.safetensors"
  MODELS="base$EXPERTS,opd-deqa-only=$RUNS/opd-deqa-only/adapter.safetensors,opd-deqa-only-quarter=$RUNS/opd-deqa-only-quarter/adapter.safetensors"
  MODELS="$MODELS,merge-init=$RUNS/merge/adapter.safetensors,merge-lora-mean=$RUNS/merge-lora-mean/adapter.safetensors"
  MODELS="$MODELS,merge-ties=$RUNS/merge-ties/adapter.safetensors,opd-merge=$RUNS/opd-merge/adapter.safetensors"
  MODELS="$MODELS,opd-merge-pg=$RUNS/opd-merge-pg/adapter.safetensors,opd-merge-pg-sample=$RUNS/opd-merge-pg-sample/adapter.safetensors"
  MODELS="$MODELS,opd-merge-nomar=$RUNS/opd-merge-nomar/adapter.safetensors,opd-merge-mar-deqa=$RUNS/opd-merge-mar-deqa/adapter.safetensors"
  MODELS="$MODELS,opd-merge-go-base=$RUNS/opd-merge-go-base/adapter.safetensors,opd-merge-scenes-deqa=$RUNS/opd-merge-scenes-deqa/adapter.safetensors"
  echo "== evaluate (ablations)"
  $PY evaluate.py --models $MODELS --limit $EVAL_LIMIT --tables main,ood,quality --gain-of $GAIN --out $OUT/ablations --cache $OUT/eval_cache
  exit 0
fi

# ---- Stage 1: one Flow-GRPO expert per task, then GRPO-Mix (GenEval:OCR:PickScore 3:1:1 + DeQA 1:1)
echo "== experts geneval and ocr (side by side)"
lanes "grpo-geneval: expert geneval" "grpo-ocr: expert ocr"
echo "== experts deqa and pickscore (side by side)"
lanes "grpo-deqa: expert deqa" "grpo-pickscore: expert pickscore"

# ---- Cold start: merge (no training) and SFT on the teachers' samples
echo "== merge"
$PY merge.py --adapters $ADAPTERS --method task-arithmetic --rank 32 --alpha 64 --out $RUNS/merge/adapter.safetensors  # the SFT student's size

# ---- GRPO-Mix, then OPD from the merge without MAR | SFT init, OPD from it, OPD from the merge (MAR on)
echo "== GRPO-Mix, OPD (merge init, no MAR) | SFT init, OPD (SFT init), OPD (merge init) (two lanes)"
lanes "grpo-mix: stage grpo-mix $PY grpo_expert.py --task geneval:3,ocr:1,pickscore:1 --reward deqa:1 $GRPO $EMA $SMALL $THREADS \
         --epochs $MIX_EPOCHS --out $RUNS/grpo-mix && \
       stage opd-merge-nomar opd --student $RUNS/merge/adapter.safetensors --teachers $TEACHERS --mar-weight 0 \
         --out $RUNS/opd-merge-nomar" \
      "opd: stage sft-init $PY sft_init.py $EMA $THREADS --seed $SEED --teachers $TEACHERS --steps $SFT_STEPS --prompts-per-task $SFT_ITEMS \
         --out $RUNS/sft-init && \
       stage opd-sft opd --student $RUNS/sft-init/adapter.safetensors --teachers $TEACHERS --out $RUNS/opd-sft && \
       stage opd-merge opd --student $RUNS/merge/adapter.safetensors --teachers $TEACHERS --out $RUNS/opd-merge"

# ---- Tables
MODELS="base$EXPERTS,grpo-mix=$RUNS/grpo-mix/adapter.safetensors,merge-init=$RUNS/merge/adapter.safetensors"
MODELS="$MODELS,sft-init=$RUNS/sft-init/adapter.safetensors,opd-sft=$RUNS/opd-sft/adapter.safetensors"
MODELS="$MODELS,opd-merge=$RUNS/opd-merge/adapter.safetensors,opd-merge-nomar=$RUNS/opd-merge-nomar/adapter.safetensors"
echo "== evaluate"
$PY evaluate.py --models $MODELS --limit $EVAL_LIMIT $EVAL_SMALL --gain-of $GAIN --out $OUT
echo "== curves"  # every run's log.jsonl against its epochs / steps: rewards, KL, losses
$PY -c "import glob, sys, runs; print('curves:', ', '.join(runs.plot_curves(sorted(glob.glob(sys.argv[1] + '/*/')), sys.argv[2])), '->', sys.argv[2])" $RUNS $OUT/curves.png
