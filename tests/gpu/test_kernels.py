"""The fused kernels against the unfused modules on a GPU (tests/gpu/kernel_check.py).

The suite hides GPUs from itself (tests/launch.py), so the check runs in a child
process that sees them: with ``MEGATRON_EXACT_TEST_DEVICE=cuda`` on a machine
with a GPU; skipped otherwise. ``bench/gpu_check.sh`` runs the same script directly.
"""

import json
import sys
from pathlib import Path

import pytest

from tests.launch import run, test_device, visible_gpu_count

CHECK = Path(__file__).with_name("kernel_check.py")


def test_fused_kernels_match_the_unfused_modules(tmp_path):
    if test_device() != "cuda" or visible_gpu_count() == 0:
        pytest.skip("needs a GPU and MEGATRON_EXACT_TEST_DEVICE=cuda (bench/gpu_check.sh runs it on one)")
    out = tmp_path / "kernels.json"
    result = run([sys.executable, str(CHECK), "--out", str(out)], timeout=600)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    record = json.loads(out.read_text())
    assert record["checks"] and all(check["ok"] for check in record["checks"].values())
    if not record["liger"]:
        pytest.skip(f"only the chunked loss was checked: {record['liger_missing']}")
