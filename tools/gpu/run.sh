#!/bin/bash
# Device run for issue G, sized for the device time left: build ggml's CUDA backend,
# write a LLaVA-1.5-7B-shaped random model, check the server on the GPU, measure latency
# of full vs elastic (and local if time allows). Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")"
S=$(date +%s)
LIMIT=${LIMIT:-260}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
el() { echo "[$(( $(date +%s) - S ))s] $*" | tee -a "$OUT/progress.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
el "cpus $(nproc)"

( ./bin/mkmodel --out /tmp/m7b --layers 32 --embd 4096 --heads 32 --kv-heads 32 --ff 11008 --vocab 32000 \
    --ctx 4096 --f16 --image-size 336 --patch-size 14 --vision-embd 1024 --vision-layers 24 \
    --vision-heads 16 --vision-ff 4096 > "$OUT/mkmodel.log" 2>&1; echo "mkmodel exit $?" >> "$OUT/mkmodel.log" ) &
MK=$!
./bin/mkmodel --out /tmp/tiny > /dev/null 2>&1

el "cmake"
cmake -S src -B out -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/cmake.log" 2>&1 || { tail -40 "$OUT/cmake.log"; exit 1; }
timeout $(( $(left) - 20 )) cmake --build out --target ggml-cuda -j16 >> "$OUT/cmake.log" 2>&1 || { el "cuda build failed or timed out"; tail -30 "$OUT/cmake.log"; exit 1; }
mkdir -p lib/ollama && cp -a out/lib/ollama/libggml-cuda.so* out/lib/ollama/libggml-base.so* lib/ollama/ 2>/dev/null
el "cuda built"; ls -la lib/ollama

# Server on the GPU with the tiny model: start-up log names the device; one request.
./bin/elasticserve --model /tmp/tiny/model.gguf --mmproj /tmp/tiny/mmproj.gguf --addr 127.0.0.1:18080 \
  --ctx-size 4096 --parallel 2 > "$OUT/server.log" 2>&1 &
SP=$!
for i in $(seq 1 30); do grep -q "listening" "$OUT/server.log" && break; sleep 0.5; done
curl -s 127.0.0.1:18080/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"hello"}],"max_tokens":16,"temperature":0,"elastic_cache":{"policy":"elastic","budget":0.5}}' > "$OUT/curl.json"
kill -TERM $SP; wait $SP
grep -iE "device|cuda|listening|error|offload" "$OUT/server.log" | head -20; cat "$OUT/curl.json"; echo
wait $MK; cat "$OUT/mkmodel.log" | tail -3; ls -la /tmp/m7b
el "model ready"

( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 1; done > "$OUT/gpumem.log" ) &
MON=$!
lat() { # name, extra flags...
  local name=$1; shift
  local t=$(( $(left) - 5 ))
  [ "$t" -lt 25 ] && { el "no time for $name"; return; }
  el "latency $name (timeout ${t}s)"
  timeout "$t" ./bin/elastic-eval latency --model /tmp/m7b/model.gguf --mmproj /tmp/m7b/mmproj.gguf \
    --prompt-tokens 900 --gen-tokens 128 --batch 8 --gpu-layers -1 --threads 8 --out "$OUT/$name" "$@" \
    > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "exit $?" >> "$OUT/$name.txt"
  cat "$OUT/$name.txt"; grep -v "^\s*$" "$OUT/$name.err" | tail -4
}
lat elastic05 --policies elastic --budgets 0.5
lat local05 --policies local --budgets 0.5
kill $MON
sort -n "$OUT/gpumem.log" | tail -1 | sed 's/^/peak MiB used: /' | tee -a "$OUT/progress.log"
el done
