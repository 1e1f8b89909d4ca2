"""Real multi-process (gloo) runs of the trainer on a tiny model: learning, DP consistency, exact resume,
resharded reload, interrupted checkpoints, NaN policy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from megatron_exact.training.checkpoint_io import read_tracker, write_tracker_atomically
from tests.training.conftest import launch, read_metrics, tiny_flags, training_lines

ITERS = 6


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def straight(byte_corpus, tmp_path_factory):
    """6 iterations in one go, DP=2, weights compared across replicas after every step."""
    root = tmp_path_factory.mktemp("straight")
    metrics = root / "metrics.jsonl"
    result = _check(launch(tiny_flags(byte_corpus, "--train-iters", str(ITERS), "--eval-interval", "3",
                                      "--metrics-file", str(metrics),
                                      "--check-weight-hash-across-dp-replicas-interval", "1")))
    return result, read_metrics(metrics)


@pytest.fixture(scope="module")
def resumed(byte_corpus, tmp_path_factory):
    """The same run stopped after 3 iterations (checkpoint), then resumed to 6."""
    root = tmp_path_factory.mktemp("resumed")
    metrics, ckpt = root / "metrics.jsonl", root / "ckpt"
    flags = tiny_flags(byte_corpus, "--train-iters", str(ITERS), "--eval-interval", "3", "--metrics-file",
                       str(metrics), "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "3")
    first = _check(launch(flags + ["--exit-interval", "3"]))
    assert read_tracker(ckpt) == 3 and max(r["iteration"] for r in read_metrics(metrics)) == 3
    second = _check(launch(flags))
    return first, second, read_metrics(metrics), ckpt


def test_loss_decreases_and_dp_replicas_stay_identical(straight):
    result, records = straight
    train = [r for r in records if r.get("split") is None]
    assert [r["iteration"] for r in train] == list(range(1, ITERS + 1))
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5, [r["lm_loss"] for r in train]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["iteration"] for r in valid] == [3, 6] and valid[1]["lm_loss"] < valid[0]["lm_loss"]
    for line in range(1, ITERS + 1):
        assert f"iteration {line}: weights identical across 2 data-parallel replica(s)" in result.stdout
    # The schema other tools rely on.
    first = train[0]
    assert {"iteration", "loss", "lm_loss", "lr", "grad_norm", "tokens", "batch_sha1", "exact"} <= set(first)
    exact = first["exact"]
    assert sum(exact["bucket_tokens"]) == first["tokens"] > 0
    assert len(exact["bucket_ce_mean"]) == len(exact["bucket_weights"]) == len(exact["bucket_tokens"])
    # Per-bucket CE recombines into the unweighted loss.
    ce_total = sum(c * m for c, m in zip(exact["bucket_tokens"], exact["bucket_ce_mean"]) if c)
    assert ce_total / first["tokens"] == pytest.approx(first["lm_loss"], rel=1e-9)
    assert max(exact["bucket_weights"]) > 1.0  # EXACT up-weighted the tail
    assert "tail share" in result.stdout and "tokens/s" in result.stdout


def test_resume_is_exact(straight, resumed):
    _, reference = straight
    first, second, records, _ = resumed
    assert "loaded" in second.stdout and "iter_0000003" in second.stdout
    ref_train = {r["iteration"]: r for r in reference if r.get("split") is None}
    got_train = [r for r in records if r.get("split") is None]
    assert [r["iteration"] for r in got_train] == list(range(1, ITERS + 1))
    for r in got_train:
        expected = ref_train[r["iteration"]]
        assert r["batch_sha1"] == expected["batch_sha1"]
        assert r["loss"] == expected["loss"] and r["lm_loss"] == expected["lm_loss"], r["iteration"]
        assert r["lr"] == expected["lr"] and r["grad_norm"] == expected["grad_norm"]
    ref_valid = [r["lm_loss"] for r in reference if r.get("split") == "valid"]
    assert [r["lm_loss"] for r in records if r.get("split") == "valid"] == ref_valid


def test_interrupted_save_is_ignored_and_reload_under_tp2(straight, resumed, byte_corpus, tmp_path):
    """A save of iteration 6 cut short (temporary directory with shards missing, tracker still at 3)
    is ignored; the run resumes from iteration 3 with TP=2 instead of DP=2 and matches the reference."""
    _, reference = straight
    _, _, _, ckpt = resumed
    work = tmp_path / "ckpt"
    shutil.copytree(ckpt, work)
    interrupted = work / ".iter_0000006.crashed.tmp"
    os.replace(work / "iter_0000006", interrupted)
    for shard in sorted(interrupted.glob("*.distcp"))[:1]:
        shard.unlink()
    (interrupted / "metadata.json").unlink(missing_ok=True)
    write_tracker_atomically(work, 3)
    metrics = tmp_path / "metrics.jsonl"
    shutil.copy(ckpt.parent / "metrics.jsonl", metrics)

    result = _check(launch(tiny_flags(byte_corpus, "--train-iters", str(ITERS), "--eval-interval", "3",
                                      "--metrics-file", str(metrics), "--save", str(work), "--load", str(work),
                                      "--tensor-model-parallel-size", "2")))
    assert "iter_0000003" in result.stdout and "DP=1 TP=2" in result.stdout
    assert not interrupted.exists()  # cleaned up
    assert read_tracker(work) == ITERS
    ref = {r["iteration"]: r for r in reference if r.get("split") is None}
    got = training_lines(metrics)
    assert [r["iteration"] for r in got] == list(range(1, ITERS + 1))
    for r in got[3:]:
        assert r["batch_sha1"] == ref[r["iteration"]]["batch_sha1"]
        assert r["loss"] == pytest.approx(ref[r["iteration"]]["loss"], rel=1e-5)
        assert r["lm_loss"] == pytest.approx(ref[r["iteration"]]["lm_loss"], rel=1e-5)


def test_nan_loss_stops_the_run_with_a_message(byte_corpus, tmp_path):
    # An absurd learning rate overflows the weights after one step: the next loss is NaN.
    metrics = tmp_path / "metrics.jsonl"
    flags = tiny_flags(byte_corpus, "--train-iters", "4", "--eval-iters", "0", "--metrics-file", str(metrics),
                       "--lr-warmup-iters", "0")
    flags[flags.index("--lr") + 1] = "1e30"
    result = launch(flags)
    assert result.returncode != 0
    assert "iteration 2: the loss is NaN/Inf (--nan-loss-policy stop)" in result.stderr
    assert [r["iteration"] for r in training_lines(metrics)] == [1]


def test_nan_loss_skip_policy_skips_the_update(byte_corpus, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    flags = tiny_flags(byte_corpus, "--train-iters", "3", "--eval-iters", "0", "--metrics-file", str(metrics),
                       "--nan-loss-policy", "skip", "--lr-warmup-iters", "0")
    flags[flags.index("--lr") + 1] = "1e30"
    result = _check(launch(flags))
    lines = training_lines(metrics)
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    assert "skipped" not in lines[0] and lines[1]["skipped"] and lines[2]["skipped"]
    assert "optimizer step skipped" in result.stdout
