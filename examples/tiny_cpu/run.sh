#!/usr/bin/env bash
# The whole pipeline on a laptop CPU in about two minutes: synthetic corpus -> Megatron
# indexed data (ByteTokenizer, no downloads) -> 2-rank torchrun (gloo) of a tiny Qwen2-style
# model with the EXACT loss. Prints one line per iteration; the loss goes down.
#
#   bash examples/tiny_cpu/run.sh            (OUT=runs/tiny_cpu by default)
#   DRY_RUN=1 bash examples/tiny_cpu/run.sh  prints the trainer flags and exits
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT=${OUT:-runs/tiny_cpu}
PYTHON=${PYTHON:-python}

TRAIN_ARGS=(
    --model tiny-qwen2
    --vocab-size 512
    --seq-length 256
    --micro-batch-size 2
    --global-batch-size 8
    --train-iters 40
    --lr 3e-3
    --min-lr 3e-4
    --lr-warmup-iters 4
    --lr-decay-style cosine
    --data-path "$OUT/data/corpus_text_document"
    --split 95,5,0
    --loss-weighting exact
    --save "$OUT/checkpoints"
    --save-interval 20
    --eval-interval 20
    --eval-iters 2
    --log-interval 5
    --metrics-file "$OUT/metrics.jsonl"
    --tensorboard-dir "$OUT/tensorboard"
)
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s\n' "${TRAIN_ARGS[@]}"; exit 0; fi

rm -rf "$OUT" && mkdir -p "$OUT/data"
"$PYTHON" "$HERE/make_corpus.py" --output "$OUT/data/corpus.jsonl" --documents 600
"$PYTHON" "$REPO/tools/preprocess_data.py" --input "$OUT/data/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
    --tokenizer-type ByteTokenizer --append-eod --workers 1
# Where the supervision of this data falls by effective context (table + histogram PNG).
PYTHONWARNINGS=ignore "$PYTHON" "$REPO/tools/effective_context_stats.py" --data-path "$OUT/data/corpus_text_document" \
    --seq-length 256 --json "$OUT/effective_context.json" --plot "$OUT/effective_context.png"
OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore "$PYTHON" -m torch.distributed.run --nproc-per-node 2 --standalone \
    "$REPO/tools/pretrain_exact.py" "${TRAIN_ARGS[@]}"
echo "metrics: $OUT/metrics.jsonl   effective-context histogram: $OUT/effective_context.png"
echo "tensorboard: tensorboard --logdir $OUT/tensorboard"
