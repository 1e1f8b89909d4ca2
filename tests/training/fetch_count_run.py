"""torchrun driver for test_logging_cost.py: the trainer of the given flags, built as
``tools/pretrain_exact.py`` builds it, with its training dataset wrapped to record every sample
index this rank fetches; writes them to ``$FETCH_LOG_DIR/rank{RANK}.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class CountingDataset:
    """The dataset, with a record of the indices asked of it."""

    def __init__(self, dataset):
        self.dataset, self.fetched = dataset, []

    def __getitem__(self, idx):
        self.fetched.append(int(idx))
        return self.dataset[idx]

    def __len__(self):
        return len(self.dataset)


def main() -> None:
    from megatron_exact.platform import setup_platform

    setup_platform()
    from megatron_exact.platform.distributed import destroy_model_parallel
    from megatron_exact.training.arguments import parse_args, validate_args
    from megatron_exact.training.trainer import Trainer

    args = parse_args(sys.argv[1:])
    arch, layout, tokenizer = validate_args(args, int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(args, arch, layout, tokenizer)
    counting = trainer.train_dataset = CountingDataset(trainer.train_dataset)
    trainer.train()
    trainer.close()
    out = Path(os.environ["FETCH_LOG_DIR"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"dp_rank": trainer.dp_rank, "logging": trainer.is_logging_rank,
                               "fetched": counting.fetched}))
    destroy_model_parallel()


if __name__ == "__main__":
    main()
