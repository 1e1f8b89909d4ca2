"""Megatron-LM's communication overlap through the trainer: --overlap-grad-reduce (bucketed gradient
reduce-scatter started during the backward pass) and --overlap-param-gather (the updated parameters
all-gathered in the next forward pass) on two ranks, with small buckets so that several are in flight,
train the same 3 steps as the non-overlapped run (fp32, CPU), keep the replicas identical, and validate
and save the updated weights (gathered first)."""

from __future__ import annotations

import pytest

from megatron_exact.checkpoint import read_tracker
from tests.training.conftest import launch, read_metrics, tiny_flags

pytestmark = pytest.mark.slow  # multi-process runs

ITERS = 3


def _run(byte_corpus, root, name, *extra) -> tuple[list[dict], str]:
    metrics = root / f"{name}.jsonl"
    flags = tiny_flags(byte_corpus, "--train-iters", str(ITERS), "--eval-interval", str(ITERS), "--metrics-file",
                       str(metrics), "--save", str(root / f"{name}_ckpt"), "--use-distributed-optimizer",
                       "--check-weight-hash-across-dp-replicas-interval", "1", *extra)
    result = launch(flags, nproc=2, timeout=240)
    assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return read_metrics(metrics), result.stdout


def test_overlapped_communication_trains_as_the_non_overlapped_run(byte_corpus, tmp_path):
    reference, _ = _run(byte_corpus, tmp_path, "plain")
    overlapped, stdout = _run(byte_corpus, tmp_path, "overlapped", "--overlap-grad-reduce", "--overlap-param-gather",
                              "--ddp-bucket-size", "20000")
    assert [r["iteration"] for r in overlapped] == [r["iteration"] for r in reference] == [1, 2, 3, 3]
    for line, ref_line in zip(overlapped, reference):
        assert line.get("split") == ref_line.get("split")
        assert line["tokens"] == ref_line["tokens"]
        for key in ("loss", "lm_loss", "grad_norm"):
            if key in ref_line:
                assert line[key] == pytest.approx(ref_line[key], rel=1e-6), (line["iteration"], key)
    train = [r for r in reference if r.get("split") is None]
    assert train[-1]["loss"] < train[0]["loss"]  # the updates changed the weights the next step saw
    assert stdout.count("weights identical across 2 data-parallel replica(s)") == ITERS
    assert read_tracker(tmp_path / "overlapped_ckpt") == ITERS
