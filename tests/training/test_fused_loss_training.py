"""The fused output loss through the real Trainer (one rank, in this process): with
``--cross-entropy-loss-fusion`` a run computes what the plain path computes, iteration by
iteration (EXACT objective, cross-entropy and gradient norm within 1e-5) and in validation, with
micro-batches of 2 packed samples and with full recompute; the start-up line names the chosen paths."""

from __future__ import annotations

import pytest

from tests.training.conftest import read_metrics, training_lines

pytestmark = pytest.mark.slow  # trainings

ITERATIONS = 3


def flags(corpus, metrics, *extra):
    return ["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-3", "--data-path", corpus, "--split", "90,10,0",
            "--eval-iters", "1", "--eval-interval", str(ITERATIONS), "--log-interval", "1", "--loss-weighting", "exact", "--exact-tau", "16",
            "--train-iters", str(ITERATIONS), "--metrics-file", str(metrics), *extra]


@pytest.mark.parametrize("recompute", [(), ("--recompute-granularity", "full")], ids=["no-recompute", "full"])
def test_fused_loss_trains_like_the_plain_path(byte_corpus, in_process_trainers, tmp_path, capsys, recompute):
    runs = {}
    for name, switch in (("plain", "--no-cross-entropy-loss-fusion"), ("fused", "--cross-entropy-loss-fusion")):
        metrics = tmp_path / f"{name}.jsonl"
        trainer = in_process_trainers(flags(byte_corpus, metrics, switch, *recompute))
        trainer.train()
        trainer.close()
        validation = [r for r in read_metrics(metrics) if r.get("split") == "valid"]
        runs[name] = (training_lines(metrics), trainer.paths, validation)
    out = capsys.readouterr().out
    assert "loss plain (Megatron-Core vocab-parallel CE over full logits) (--no-cross-entropy-loss-fusion)" in out
    assert "loss fused, chunked vocab-parallel CE" in out and "(--cross-entropy-loss-fusion; not liger: no CUDA" in out
    assert (runs["plain"][1].loss, runs["fused"][1].loss) == ("plain", "chunked")
    plain, fused = runs["plain"][0], runs["fused"][0]
    assert len(plain) == len(fused) == ITERATIONS
    assert max(plain[0]["exact"]["bucket_weights"]) > 1.05  # the weights are not all 1
    for a, b in zip(plain, fused):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert fused[-1]["loss"] != pytest.approx(fused[0]["loss"], rel=1e-4)  # the steps did train
    # Validation (forward only, through the validator's loss) agrees too.
    (plain_valid,), (fused_valid,) = runs["plain"][2], runs["fused"][2]
    assert fused_valid["lm_loss"] == pytest.approx(plain_valid["lm_loss"], rel=1e-5)
    assert fused_valid["tokens"] == plain_valid["tokens"] > 0
