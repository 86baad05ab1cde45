#!/bin/bash
# Checks the committed demo model (models/demo) end to end, from the repo root:
#   tools/demo-vlm/check.sh
# 1. llama.cpp and PyTorch compute the same function (prompt tokens, image
#    embeddings, next-token logits) on the bundled picture, both prompt orders;
# 2. PyTorch's greedy answers on the held-out set, recomputed from the GGUF
#    files, equal the committed models/demo/heldout.json (and its accuracy);
# 3. the engine (greedy, policy full) gives the same answers: go test.
# Needs: Go + the cgo build (make deps), python3 with torch and numpy (Debian:
# python3-torch python3-numpy python3-pil). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
eval "$(make -s env)"
go build -o "$tmp/mkdemo" ./cmd/mkdemo

echo "== 1. llama.cpp vs PyTorch on models/demo/example.png"
for order in "" "--text-first"; do
  "$tmp/mkdemo" probe --dir models/demo --image models/demo/example.png \
    --question "What color is the circle?" $order --out "$tmp/probe.json" 2>/dev/null
  (cd tools/demo-vlm && "$PY" probe_check.py --ckpt ../../models/demo --probe "$tmp/probe.json" \
    --image ../../models/demo/example.png --question "What color is the circle?" $order 2>/dev/null)
done

echo "== 2. PyTorch answers on the held-out set (from the GGUF weights)"
"$tmp/mkdemo" data --seed 2 --n 100 --out "$tmp/heldout.jsonl"
(cd tools/demo-vlm && "$PY" evaluate.py --weights ../../models/demo --samples "$tmp/heldout.jsonl" \
  --out "$tmp/heldout.json" 2>/dev/null | tail -3)
"$PY" - "$tmp/heldout.json" models/demo/heldout.json <<'EOF'
import json, sys
a, b = (json.load(open(p))["questions"] for p in sys.argv[1:])
same = sum(x["torch"] == y["torch"] and x["id"] == y["id"] for x, y in zip(a, b))
print(f"recomputed PyTorch answers equal to the committed ones: {same}/{len(b)}")
sys.exit(0 if same == len(b) == len(a) else 1)
EOF

echo "== 3. engine vs PyTorch (go test)"
go test -count=1 -v -run 'TestDemoModelMatchesPyTorch' ./cmd/mkdemo 2>&1 | grep -E '^(=== RUN|--- |ok|FAIL|PASS)|agreement|accuracy'
