"""The suite's CPU-only assumptions are explicit: one decision of the device (tests/launch.py), made
before torch sees a GPU, that every process a test starts inherits, and multi-rank jobs that skip
with a reason where the GPUs are too few."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import launch

TESTS = Path(__file__).resolve().parent


def test_the_test_process_sees_no_gpu():
    import torch

    assert launch.test_device() in launch.DEVICES
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


def test_started_processes_get_the_test_device(monkeypatch):
    monkeypatch.delenv(launch.DEVICE_VARIABLE, raising=False)
    assert launch.test_device() == "cpu"
    assert launch.run_env()["CUDA_VISIBLE_DEVICES"] == ""
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=launch.run_env(), capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "False"

    monkeypatch.setenv(launch.DEVICE_VARIABLE, "cuda")
    monkeypatch.setattr(launch, "_VISIBLE_DEVICES_AT_START", "0,1")
    assert launch.run_env()["CUDA_VISIBLE_DEVICES"] == "0,1"  # what the machine had before the suite hid it
    monkeypatch.setattr(launch, "_VISIBLE_DEVICES_AT_START", None)
    assert "CUDA_VISIBLE_DEVICES" not in launch.run_env()

    monkeypatch.setenv(launch.DEVICE_VARIABLE, "gpu")
    with pytest.raises(ValueError, match="MEGATRON_EXACT_TEST_DEVICE='gpu': expected one of"):
        launch.test_device()


def test_multi_rank_jobs_skip_when_the_gpus_are_too_few(monkeypatch):
    monkeypatch.setattr(launch, "visible_gpu_count", lambda: 1)
    monkeypatch.setenv(launch.DEVICE_VARIABLE, "cuda")
    with pytest.raises(pytest.skip.Exception, match=r"needs 2 GPUs \(MEGATRON_EXACT_TEST_DEVICE=cuda\), 1 visible"):
        launch.torchrun_command("script.py", nproc=2)
    assert "--nproc-per-node=1" in launch.torchrun_command("script.py", nproc=1)
    monkeypatch.setenv(launch.DEVICE_VARIABLE, "cpu")
    assert "--nproc-per-node=4" in launch.torchrun_command("script.py", nproc=4)  # gloo ranks need no GPU


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_every_job_and_device_choice_goes_through_the_launcher():
    """No test file builds its own torchrun command line or picks GPUs itself; the one exception
    hides them from its child to test the CPU backend."""
    own_launchers, own_devices = [], []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("launch.py", Path(__file__).name):
            continue
        constants = _string_constants(path)
        if {"torch.distributed.run", "megatron_exact.launch"} & constants or any(c.startswith("--nproc-per-node") for c in constants):
            own_launchers.append(path.relative_to(TESTS))
        if "CUDA_VISIBLE_DEVICES" in constants and path.name != "test_cpu_backend.py":
            own_devices.append(path.relative_to(TESTS))
    assert own_launchers == [] and own_devices == []
