"""``python -m megatron_exact.eval <suite> ...`` (see :mod:`megatron_exact.eval.cli`)."""

from megatron_exact import cli
from megatron_exact.eval.cli import main

cli.exit_process(main())
