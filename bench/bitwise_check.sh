#!/usr/bin/env bash
# bench/bitwise_check.sh: every stage on the tiny world at tiny budgets (grpo_expert.py on one task and the mix,
# merge.py's three methods, sft_init.py, opd.py's direct loss with MAR, pg, pg-sample with the official code's two
# departures, evaluate.py), serially, ~2 minutes on 2 cores; then one hash a file: every safetensors file's tensors
# (names and bytes: an adapter's metadata order varies), every log.jsonl without its sec_* timers, merge.py's card
# without its paths and timing, every other results JSON and Markdown table. A refactor that changes no behaviour
# leaves the list equal: run it before and after (each in its own checkout) and diff the two files.
#   bash bench/bitwise_check.sh /tmp/bitwise/before /tmp/bitwise_before.txt
set -euo pipefail
D=$1; H=$2
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
PY=.venv/bin/python
rm -rf $D; mkdir -p $D
SMALL="--prompts-per-epoch 2 --group-size 4 --grid-every 0 --threads 1"
GRPO="--lr 1e-3 --same-latent --ema-every 1 $SMALL --epochs 2"
A=assets/tiny_experts
T="geneval=$A/geneval.safetensors,ocr=$A/ocr.safetensors,deqa=$A/deqa.safetensors,pickscore=$A/pickscore.safetensors"
ADP="$A/geneval.safetensors,$A/ocr.safetensors,$A/deqa.safetensors,$A/pickscore.safetensors"
$PY grpo_expert.py --task ocr $GRPO --out $D/grpo-ocr > $D/grpo-ocr.txt 2>&1
$PY grpo_expert.py --task geneval:3,ocr:1,pickscore:1 --reward deqa:1 $GRPO --out $D/grpo-mix > $D/grpo-mix.txt 2>&1
$PY merge.py --adapters $ADP --method task-arithmetic --rank 32 --alpha 64 --out $D/merge/adapter.safetensors > $D/merge.txt 2>&1
for m in lora-mean ties; do $PY merge.py --adapters $ADP --method $m --out $D/merge-$m/adapter.safetensors >> $D/merge.txt 2>&1; done
$PY sft_init.py --ema-every 1 --threads 1 --teachers $T --steps 3 --prompts-per-task 2 --log-every 1 --probe-every 2 --out $D/sft-init > $D/sft.txt 2>&1
OPD="--lr 1e-3 --timestep-fraction 0.6 --ema-every 1 $SMALL --epochs 2 --teachers $T"
$PY opd.py $OPD --student $D/merge/adapter.safetensors --out $D/opd-merge > $D/opd.txt 2>&1
$PY opd.py $OPD --student $D/merge/adapter.safetensors --opd-loss pg --mar-weight 0 --out $D/opd-pg >> $D/opd.txt 2>&1
$PY opd.py $OPD --student $D/merge/adapter.safetensors --opd-loss pg-sample --kl-dt-factor --skip-zero-advantage --mar-teacher deqa --out $D/opd-pgs >> $D/opd.txt 2>&1
$PY evaluate.py --models base,merge=$D/merge/adapter.safetensors,opd=$D/opd-merge/adapter.safetensors --limit 1 --steps 6 --grid-prompts 1 --threads 1 --gain-of deqa=opd --out $D/eval > $D/eval.txt 2>&1
$PY - $D > $H <<'PYEOF'
import glob, hashlib, json, os, sys
from safetensors.torch import load_file
D = sys.argv[1]
for p in sorted(glob.glob(D + "/**/*", recursive=True)):
    rel = os.path.relpath(p, D)
    if p.endswith(".safetensors"):
        t = load_file(p); h = hashlib.sha256()
        for k in sorted(t): h.update(k.encode()); h.update(str(t[k].dtype).encode()); h.update(t[k].contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
        print(rel, h.hexdigest()[:16])
    elif p.endswith("log.jsonl"):
        recs = [{k: v for k, v in json.loads(l).items() if not k.startswith("sec_")} for l in open(p)]
        print(rel, hashlib.sha256(json.dumps(recs, sort_keys=True).encode()).hexdigest()[:16])
    elif p.endswith("adapter.json"):  # merge.py's card: its paths and timing aside
        card = json.load(open(p)); card.pop("seconds"); card.pop("out"); card["settings"].pop("out")
        for i in card["inputs"]: i.pop("path")
        print(rel, hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:16])
    elif p.endswith(".json") and "config" not in os.path.basename(p):
        print(rel, hashlib.sha256(open(p, "rb").read()).hexdigest()[:16])
    elif p.endswith(".pt"):
        import torch
        s = torch.load(p, map_location="cpu", weights_only=False)
        def flat(o, pre=""):
            if isinstance(o, dict):
                for k in sorted(o, key=str): yield from flat(o[k], pre + "/" + str(k))
            elif isinstance(o, (list, tuple)):
                for i, x in enumerate(o): yield from flat(x, pre + f"[{i}]")
            elif torch.is_tensor(o): yield pre, o.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            else: yield pre, repr(o).encode()
        h = hashlib.sha256()
        for k, b in flat(s):
            if "identity" in k or "sha" in k: continue
            h.update(k.encode()); h.update(b)
        print(rel, h.hexdigest()[:16])
    elif p.endswith(".md"):
        print(rel, hashlib.sha256(open(p, "rb").read()).hexdigest()[:16])
PYEOF
echo done
