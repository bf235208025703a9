#!/usr/bin/env bash
# bench/gpu.sh: the GPU check of issue #16, prepared to run first time on ONE H100 / H200 in under 8
# minutes (about 3-4 expected; a hard `timeout` stops it at TIMEOUT seconds, default 470, and the JSON is
# written after every stage, so a cut-off run still leaves what it measured).
#
# What it runs: bench/speed.py --world sd3-random-medium --scale full --device cuda, i.e. the same code
# tests/test_bench_speed.py runs on a CPU with --scale tiny. Nothing is downloaded:
#   model      a RANDOM-weight SD3Transformer2DModel with SD3.5-Medium's transformer config
#              (num_layers 24, attention_head_dim 64, num_attention_heads 24 -> width 1536,
#              joint_attention_dim 4096, caption_projection_dim 1536, pooled_projection_dim 2048,
#              in/out_channels 16, patch_size 2, sample_size 128, pos_embed_max_size 384,
#              dual_attention_layers 0..12, qk_norm rms_norm: 2.24 B parameters), bf16, built on the GPU
#   images     512 px: latents 16x64x64 -> 1024 image tokens
#   text       random embeddings of SD3's shapes: (205, 4096) = CLIP's 77 + T5's 128 tokens
#              (Flow-GRPO's max_sequence_length 128), pooled (2048,); fixed per prompt
#   LoRA       r = 32, alpha = 64 on the attention projections (worlds.LORA_TARGETS, Flow-GRPO's): 4 random
#              teachers + a random MAR anchor (frozen, bf16) + the float32 students of the three stages
#   settings   SD3 defaults (worlds.SD3_DEFAULTS): T = 10 SDE steps, SDE on every step, 9 trained /
#              distilled steps, CFG 4.5 in sampling and training, noise 0.7; SFT teacher cache with the
#              40-step ODE; OPD --opd-loss direct, MAR lambda 0.02 with the base as anchor
#   batch      the paper's per-GPU batch, taken from Flow-GRPO's SD3.5-M configs (config/grpo.py:
#              sample.train_batch_size = 9 images per GPU, train.batch_size = 9, 24 images per prompt,
#              48 prompts per epoch on 32 GPUs = 4 sampling batches of 9 per GPU per epoch). One iteration
#              here is ONE such batch: 9 images of one prompt (the repo's runs.shard gives a rank whole
#              prompts), sampled in one forward of 18 rows (CFG), trained in one micro-batch of 9
#              (--updates-per-epoch 1: Flow-GRPO accumulates its micro-batches of 9), so OPD and GRPO
#              are at equal batch; SFT trains 9 items drawn from a cache of 8 (2 per task)
#   not timed  no VAE decode (a stub: the first 3 latent channels) and no reward models (a stub reward):
#              the "rewards" column is ~0 here; on a real run add the VAE decode (~ms per image) and the
#              reward servers' latency
# What it prints: per stage s/image per phase (sampling, rewards, frozen = teachers + anchor / KL
# reference, training), the floor (the same transformer calls timed alone), iteration / floor, forwards
# and backwards per image counted by hooks (and at the paper's settings: OPD 74 + 18), peak memory
# (torch.cuda.max_memory_allocated per stage; adapters vs separate copies, allocated and counted),
# model FLOPs counted with torch.utils.flop_counter.FlopCounterMode on every distinct call, and the MFU
# against a dense bf16 peak of 989 TFLOP/s (H100 SXM / H200; PEAK_TFLOPS=... to change). If a training
# forward of 9 images runs out of memory, speed.py halves the training micro-batch and says so.
#
#   bash bench/gpu.sh                   # writes $OUT/speed_sd3-random-medium.json and $OUT/gpu_log.txt
#   OUT=/tmp/x PYTHON=/opt/venv/bin/python bash bench/gpu.sh --iters 2   # extra args go to speed.py
#   DRY_RUN_CPU=1 OUT=/tmp/x bash bench/gpu.sh   # the same commands on a CPU at tiny width (~20 s): checks this file
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-results/bench}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# a Python with CUDA torch, diffusers and peft (this repository's .venv is CPU-only on the CPU machines).
# DRY_RUN_CPU=1 runs the same script on a CPU at tiny width (a check of this file, not a measurement).
NEED="assert torch.cuda.is_available()"; DEVICE_ARGS=()
if [ -n "${DRY_RUN_CPU:-}" ]; then NEED="pass"; DEVICE_ARGS=(--scale tiny --device cpu --threads 1); fi
PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$cand" ] || continue
  if "$cand" -c "import torch, numpy, diffusers, peft; $NEED" >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  echo "error: no Python here has CUDA torch + diffusers + peft (set PYTHON=...); what each candidate says:"
  for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$cand" ] && { echo "  $cand:"; "$cand" -c "import torch; print('   torch', torch.__version__, 'cuda available', torch.cuda.is_available()); import diffusers, peft" 2>&1 | tail -2; }
  done
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, diffusers, peft; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

PEAK=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK=(--peak-tflops "$PEAK_TFLOPS")
start=$(date +%s)
timeout "${TIMEOUT:-470}" "$PY" bench/speed.py --world sd3-random-medium --scale full --device cuda \
  --prompts-per-epoch 1 --group-size 9 --sample-batch 9 --train-batch 9 --updates-per-epoch 1 \
  --sft-batch 9 --sft-train-batch 9 --iters 1 --warmup 1 --floor-reps 3 "${PEAK[@]}" "${DEVICE_ARGS[@]}" \
  --out "$OUT_DIR/speed_sd3-random-medium.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_log.txt"
rc=${PIPESTATUS[0]}
echo "bench/gpu.sh: exit $rc after $(( $(date +%s) - start )) s (124 = cut off by the timeout; the JSON holds the stages done)"
exit "$rc"
