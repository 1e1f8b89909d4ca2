#!/usr/bin/env python
"""Evaluate HF checkpoint directories (same as ``python -m megatron_exact.eval``).

  python tools/evaluate.py ruler  --model DIR [--model-b DIR] --lengths 4096 8192 --output OUT
  python tools/evaluate.py probe  --model DIR [--spec SPEC.json] --length 8192 --distances 64 512 4096 --output OUT
  python tools/evaluate.py nolima --model DIR [--nolima-dir NOLIMA] --lengths 4096 --output OUT
  python tools/evaluate.py lm-eval --model DIR --tasks arc_challenge hellaswag --output OUT

Offline: HF checkpoint directories on disk, transformers (or --backend vllm when installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_exact import cli  # noqa: E402
from megatron_exact.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    cli.exit_process(main(prog="evaluate.py"))
