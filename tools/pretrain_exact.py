"""Long-context continued pretraining with EXACT (thin entry; see megatron_exact/train.py).

    torchrun --nproc-per-node 2 tools/pretrain_exact.py --model tiny-qwen2 --seq-length 256 \
        --train-iters 20 --lr 1e-3 --data-path data/corpus_text_document --loss-weighting exact
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_exact.train import main  # noqa: E402

if __name__ == "__main__":  # required: dist_checkpointing spawns a helper process that re-imports this file
    sys.exit(main())
