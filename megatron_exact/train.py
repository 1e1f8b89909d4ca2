"""``python -m megatron_exact.train`` / ``tools/pretrain_exact.py``: launch with torchrun.

    torchrun --nproc-per-node 8 -m megatron_exact.train --model qwen2.5-0.5b --seq-length 16384 ...

Flags: ``--help`` (Megatron-LM names). The configuration is validated before
any model is built; errors name the flag and exit with status 2. Errors reach
the user through the shared handler (:func:`megatron_exact.cli.run`) on every
rank that detects them, tagged with the rank in a multi-rank launch: torchrun
stops the other ranks as soon as one exits, so an error printed only by rank 0
could be lost when another rank found it.
"""

from __future__ import annotations

import os
import sys
import warnings

PROG = "pretrain_exact.py"


def _main(argv=None) -> int:
    # The CPU backend must be in place before Megatron-Core is imported (no-op on GPU).
    from megatron_exact.platform import setup_platform
    from megatron_exact.platform.distributed import exit_with_launcher

    exit_with_launcher()
    setup_platform()
    from megatron_exact.training.arguments import ConfigWarning, parse_args, validate_args

    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        arch, layout, tokenizer = validate_args(args, world_size)  # ConfigError: exit status 2
    if rank == 0:
        for warning in caught:
            if issubclass(warning.category, ConfigWarning):
                print(f"warning: {warning.message}", file=sys.stderr, flush=True)
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)

    from megatron_exact import cli
    from megatron_exact.platform.distributed import destroy_model_parallel
    from megatron_exact.training.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(args, arch, layout, tokenizer)
    try:
        trainer.train()
    except NonFiniteLossError as err:  # every rank agrees on it: one message
        if rank == 0:
            print(cli.error_line(PROG, err), file=sys.stderr, flush=True)
        return 3
    finally:
        trainer.close()
    destroy_model_parallel()
    return 0


def main(argv=None) -> int:
    from megatron_exact import cli

    return cli.run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
