#!/usr/bin/env bash
# The whole GPU check in one command (one GPU, about 3-4 minutes on an H200):
#   1. installs the wheels of .whl/ (bench/fetch_gpu_wheels.sh: megatron-core, liger-kernel) into a
#      private directory, nothing else (no network needed);
#   2. kernel equality: tests/gpu/kernel_check.py (liger RMSNorm/SwiGLU/fused linear CE and the chunked
#      CE against the unfused modules, and a whole tiny model fused vs unfused);
#   3. warm-ups and measurements: bench/train_throughput.py with its defaults (llama3.2-1b and
#      qwen2.5-0.5b at 4K and 16K, uniform and exact interleaved), then peak memory of the plain vs the
#      fused output loss for qwen2.5-0.5b at 16K in one process;
#   4. prints the BENCHMARKS.md table rows.
# Results (JSON lines, logs) go to $OUT (default runs/gpu_check/). Exit status 1 if a kernel check failed.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/megatron_exact_gpu_site}
mkdir -p "$OUT"
start=$(date +%s)
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu_check.sh: skipped, needs a CUDA GPU (and a python3 with torch)"
    exit 0
fi
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in $WHEELS (bench/fetch_gpu_wheels.sh prepares them): using the installed packages"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
date -u +"%Y-%m-%d %H:%M UTC" | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

echo "== kernel equality ($(( $(date +%s) - start )) s)"
python3 tests/gpu/kernel_check.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
kernels=${PIPESTATUS[0]}

echo "== throughput ($(( $(date +%s) - start )) s)"
rm -f "$OUT/train_throughput.jsonl"
python3 bench/train_throughput.py --out "$OUT/train_throughput.jsonl" 2>&1 | tee "$OUT/throughput.log"
throughput=${PIPESTATUS[0]}

echo "== peak memory, plain vs fused output loss ($(( $(date +%s) - start )) s)"
python3 bench/train_throughput.py --presets qwen2.5-0.5b --seq-lengths 16384 --loss-paths plain fused \
    --steps 2 --warmup 1 --out "$OUT/train_throughput.jsonl" 2>&1 | tee "$OUT/memory.log"
memory=${PIPESTATUS[0]}

echo "== table ($(( $(date +%s) - start )) s)"
python3 bench/train_throughput.py --summarize "$OUT/train_throughput.jsonl" | tee "$OUT/table.md"
echo "kernel check exit $kernels, throughput exit $throughput, memory exit $memory; $(( $(date +%s) - start )) s in all"
[ "$kernels" = 0 ] && [ "$throughput" = 0 ] && [ "$memory" = 0 ]
