#!/usr/bin/env bash
# One run of a paired CPT experiment on a single node (8 GPUs by default).
#
#   bash examples/cpt/prepare.sh qwen2.5-0.5b             # data + HF import, once
#   bash examples/cpt/pretrain_pair.sh qwen2.5-0.5b-16k uniform
#   bash examples/cpt/pretrain_pair.sh qwen2.5-0.5b-16k exact
#
# Environment: GPUS (per node, default 8), DATA, HF_CKPT, RUNS (see pair_args.sh).
# DRY_RUN=1 prints the trainer flags, one per line, and exits.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
source "$HERE/pair_args.sh"
pair_args "${1:?pair}" "${2:?uniform|exact}"

if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s\n' "${TRAIN_ARGS[@]}"; exit 0; fi
# python -m megatron_exact.launch: torchrun, flags unchanged (see megatron_exact/launch.py).
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m megatron_exact.launch --nproc-per-node "${GPUS:-8}" \
    --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint localhost:0 \
    "$REPO/tools/pretrain_exact.py" "${TRAIN_ARGS[@]}"
