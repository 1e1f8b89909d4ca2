"""``python -m megatron_exact.eval <suite> ...`` (see :mod:`megatron_exact.eval.cli`)."""

import sys

from megatron_exact.eval.cli import main

sys.exit(main())
