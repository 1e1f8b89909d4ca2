"""Logging costs the logging rank nothing extra: over a few iterations of a DP=2 run, every rank
fetches from the training dataset exactly the samples of its own micro-batches, once each (the
logging rank used to read the whole global batch again for ``batch_sha1`` and the FLOP count), and
the logged ``batch_sha1`` is still that of the global batch in sample order."""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO, run_checked, torchrun_command
from tests.training.conftest import tiny_flags, training_lines

pytestmark = pytest.mark.slow  # a multi-process run

MBS, GBS, DP, ITERS = 1, 4, 2, 3


def test_each_rank_fetches_exactly_its_own_samples(byte_corpus, tmp_path, monkeypatch):
    from megatron_exact.data.dataset import build_train_valid_test_datasets
    from megatron_exact.training.trainer import batch_sha1

    metrics = tmp_path / "metrics.jsonl"
    flags = tiny_flags(byte_corpus, "--train-iters", str(ITERS), "--eval-iters", "0", "--metrics-file", str(metrics))
    flags[flags.index("--micro-batch-size") + 1] = str(MBS)
    flags[flags.index("--global-batch-size") + 1] = str(GBS)
    monkeypatch.setenv("FETCH_LOG_DIR", str(tmp_path))
    run_checked(torchrun_command(REPO / "tests" / "training" / "fetch_count_run.py", *flags, nproc=2), timeout=240)

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert sorted(r["dp_rank"] for r in ranks) == [0, 1] and [r["logging"] for r in ranks] == [True, False]
    for rank in ranks:
        # Micro-batch j of step t on DP rank r: samples t*GBS + j*MBS*DP + r*MBS + [0, MBS), in that order.
        expected = [t * GBS + j * MBS * DP + rank["dp_rank"] * MBS + i
                    for t in range(ITERS) for j in range(GBS // (MBS * DP)) for i in range(MBS)]
        assert rank["fetched"] == expected

    train, _, _ = build_train_valid_test_datasets([byte_corpus], "90,10,0", 128, 1234, (ITERS * GBS, 0, 0))
    lines = training_lines(metrics)
    assert [r["iteration"] for r in lines] == list(range(1, ITERS + 1))
    for step, line in enumerate(lines):
        assert line["batch_sha1"] == batch_sha1([train[step * GBS + i] for i in range(GBS)])
