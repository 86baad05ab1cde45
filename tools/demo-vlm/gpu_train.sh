#!/bin/bash
# The training run of the shipped demo model, as run on a lent NVIDIA H100
# (device tool; $OUT is the folder whose files come back). From the repo root:
#   tools/demo-vlm/gpu_train.sh
# The data (tools/demo-vlm/data, see README.md) must be there.
set -o pipefail
OUT=${OUT:-/tmp/demo-vlm-out}
mkdir -p "$OUT"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())'
  python3 train.py --train data/train.jsonl.gz --heldout data/heldout.jsonl \
    --out /tmp/demo-vlm-run --npz "$OUT/w" --device cuda --bf16 --workers 8 \
    --config "$(cat config.json)" --seed "${SEED:-1}" \
    --batch 256 --lr "${LR:-2e-3}" --warmup "${WARMUP:-300}" --steps 1000000 \
    --max-minutes "${MINUTES:-7}" --time-schedule \
    --log-every 50 --eval-every 1000000 --eval-minutes "${EVAL_MINUTES:-2}" --eval-images 40 \
    --ckpt-every 1000000 --ckpt-minutes 1 ${EXTRA}
} 2>&1 | tee "$OUT/train.out"
cp /tmp/demo-vlm-run/log.jsonl /tmp/demo-vlm-run/config.json "$OUT/" 2>/dev/null
true
