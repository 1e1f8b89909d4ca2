#!/usr/bin/env bash
# Before a pair: tokenize the corpus with the model's tokenizer and import the HF weights.
#
#   HF_DIR=/models/Qwen2.5-0.5B CORPUS=/data/long_docs.jsonl bash examples/cpt/prepare.sh qwen2.5-0.5b
#
# Writes ${DATA_DIR:-data}/<model>_text_document.{bin,idx} (+ tokenizer sidecar), the
# effective-context statistics of the data (table + PNG), and checkpoints/<model>/release.
set -euo pipefail
MODEL=${1:?model preset, e.g. qwen2.5-0.5b or llama3.2-3b}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${HF_DIR:?HF_DIR: the local HF model directory}" "${CORPUS:?CORPUS: JSONL file(s) with a text field}"
DATA_DIR=${DATA_DIR:-data}
mkdir -p "$DATA_DIR"
python "$REPO/tools/preprocess_data.py" --input "$CORPUS" --output-prefix "$DATA_DIR/$MODEL" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_DIR" --append-eod --workers "${WORKERS:-16}"
# Where supervision falls per effective-context bucket at the longest training length.
python "$REPO/tools/effective_context_stats.py" --data-path "$DATA_DIR/${MODEL}_text_document" --seq-length 16384 \
    --num-samples 2000 --json "$DATA_DIR/${MODEL}_effective_context.json" --plot "$DATA_DIR/${MODEL}_effective_context.png"
python "$REPO/tools/convert_checkpoint.py" import-hf --hf-dir "$HF_DIR" --save "checkpoints/$MODEL" --verify
echo "now: DATA=$DATA_DIR/${MODEL}_text_document HF_CKPT=checkpoints/$MODEL bash examples/cpt/pretrain_pair.sh <pair> uniform|exact"
echo "after training: python tools/convert_checkpoint.py export-hf --load runs/<pair>/<weighting>/checkpoints --hf-dir-out <dir>"
