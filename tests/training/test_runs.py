"""Real multi-process (gloo) runs of the trainer on a tiny model: learning, DP consistency, exact resume
(plain and distributed optimizer), resume across the two optimizers and across data-parallel sizes,
reload under other TP/PP/CP layouts, interrupted checkpoints, NaN stop policy (on every rank; the skip policy's effect on the state: test_trainer_flags.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest

from megatron_exact.atomic_io import temporary_path
from megatron_exact.checkpoint import TRACKER_FILENAME, read_tracker, write_tracker_atomically
from tests.training.conftest import launch, read_metrics, tiny_flags, training_lines

pytestmark = pytest.mark.slow  # multi-process runs

ITERS = 6
RESUME_AT = 3


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _flags(byte_corpus, *extra):
    """6 iterations, stopped by --exit-interval before --train-iters 7 (so the exit path runs too)."""
    return tiny_flags(byte_corpus, "--train-iters", str(ITERS + 1), "--exit-interval", str(ITERS),
                      "--eval-interval", "3", *extra)


@dataclasses.dataclass
class Runs:
    straight_stdout: str
    straight: list[dict]  # metrics records of the uninterrupted run
    resumed_stdout: str
    resumed: list[dict]  # metrics records after resuming from the iteration-3 checkpoint
    checkpoints: Path


def _straight_then_resumed(byte_corpus, root: Path, *extra) -> Runs:
    """DP=2: 6 iterations in one go, checkpoints at 3 and 6, replica weights compared after every step
    (the reference); then the same command resumed from the iteration-3 checkpoint, as after a crash
    there (tracker at 3; the metrics lines past 3 are dropped on resume)."""
    ckpt, straight_metrics, resumed_metrics = root / "ckpt", root / "straight.jsonl", root / "resumed.jsonl"
    flags = _flags(byte_corpus, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(RESUME_AT),
                   "--check-weight-hash-across-dp-replicas-interval", "1", *extra)
    straight = _check(launch(flags + ["--metrics-file", str(straight_metrics)]))
    assert read_tracker(ckpt) == ITERS
    write_tracker_atomically(ckpt, RESUME_AT)
    shutil.copy(straight_metrics, resumed_metrics)
    resumed = _check(launch(flags + ["--metrics-file", str(resumed_metrics)]))
    return Runs(straight.stdout, read_metrics(straight_metrics), resumed.stdout, read_metrics(resumed_metrics), ckpt)


@pytest.fixture(scope="module")
def plain_optimizer_runs(byte_corpus, tmp_path_factory) -> Runs:
    return _straight_then_resumed(byte_corpus, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def distributed_optimizer_runs(byte_corpus, tmp_path_factory) -> Runs:
    return _straight_then_resumed(byte_corpus, tmp_path_factory.mktemp("distopt"), "--use-distributed-optimizer")


OPTIMIZERS = ["plain_optimizer_runs", "distributed_optimizer_runs"]


@pytest.mark.parametrize("runs_fixture", OPTIMIZERS)
def test_loss_decreases_and_dp_replicas_stay_identical(runs_fixture, request):
    runs = request.getfixturevalue(runs_fixture)
    records, stdout = runs.straight, runs.straight_stdout
    train = [r for r in records if r.get("split") is None]
    assert [r["iteration"] for r in train] == list(range(1, ITERS + 1))
    assert f"--exit-interval {ITERS}: exiting at iteration {ITERS}" in stdout
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5, [r["lm_loss"] for r in train]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["iteration"] for r in valid] == [3, 6] and valid[1]["lm_loss"] < valid[0]["lm_loss"]
    for line in range(1, ITERS + 1):
        assert f"iteration {line}: weights identical across 2 data-parallel replica(s)" in stdout
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
    assert "tail share" in stdout and "tokens/s" in stdout


@pytest.mark.parametrize("runs_fixture", OPTIMIZERS)
def test_resume_is_exact(runs_fixture, request):
    """3 + save + load + 3 iterations give bit-identical losses, learning rates and gradient norms
    (Adam's moments and step count, the LR schedule, RNG and data position all restored)."""
    runs = request.getfixturevalue(runs_fixture)
    assert f"loaded {runs.checkpoints / 'iter_0000003'}" in runs.resumed_stdout
    # The resumed run computed iterations 4..6 and nothing else; its metrics file keeps the lines
    # 1..3 from before the "crash" (lines past 3 were dropped on resume) and appends its own.
    assert re.findall(r"^iteration +(\d+)/", runs.resumed_stdout, re.M) == [str(i) for i in range(RESUME_AT + 1, ITERS + 1)]
    got_train = [r for r in runs.resumed if r.get("split") is None]
    assert [r["iteration"] for r in got_train] == list(range(1, ITERS + 1))
    ref_train = {r["iteration"]: r for r in runs.straight if r.get("split") is None}
    computed = [r for r in got_train if r["iteration"] > RESUME_AT]
    for r in computed:
        expected = ref_train[r["iteration"]]
        assert r["batch_sha1"] == expected["batch_sha1"]
        assert r["loss"] == expected["loss"] and r["lm_loss"] == expected["lm_loss"], r["iteration"]
        assert r["lr"] == expected["lr"] and r["grad_norm"] == expected["grad_norm"], r["iteration"]
    ref_valid = [r["lm_loss"] for r in runs.straight if r.get("split") == "valid" and r["iteration"] > RESUME_AT]
    got_valid = [r["lm_loss"] for r in runs.resumed if r.get("split") == "valid" and r["iteration"] > RESUME_AT]
    assert got_valid == ref_valid and len(got_valid) == 1


def _reload_from_iteration_3(runs: Runs, work: Path) -> tuple[Path, Path]:
    """A copy of the runs' checkpoints with the tracker at 3, and of the reference metrics up to 6."""
    shutil.copytree(runs.checkpoints, work / "ckpt")
    write_tracker_atomically(work / "ckpt", RESUME_AT)
    metrics = work / "metrics.jsonl"
    shutil.copy(runs.checkpoints.parent / "straight.jsonl", metrics)
    return work / "ckpt", metrics


def _assert_matches_reference(metrics: Path, runs: Runs) -> None:
    ref = {r["iteration"]: r for r in runs.straight if r.get("split") is None}
    got = training_lines(metrics)
    assert [r["iteration"] for r in got] == list(range(1, ITERS + 1))
    for r in got[RESUME_AT:]:
        assert r["batch_sha1"] == ref[r["iteration"]]["batch_sha1"]
        assert r["loss"] == pytest.approx(ref[r["iteration"]]["loss"], rel=1e-5)
        assert r["lm_loss"] == pytest.approx(ref[r["iteration"]]["lm_loss"], rel=1e-5)
    ref_valid = [r["lm_loss"] for r in runs.straight if r.get("split") == "valid"]
    got_valid = [r["lm_loss"] for r in read_metrics(metrics) if r.get("split") == "valid"]
    assert got_valid == pytest.approx(ref_valid, rel=1e-5)


def test_interrupted_save_is_ignored_and_reload_under_tp2(distributed_optimizer_runs, byte_corpus, tmp_path):
    """A save of iteration 6 cut short (temporary directory with shards missing, tracker still at 3)
    is ignored; the run resumes from iteration 3 with TP=2 instead of DP=2 (the distributed
    optimizer's state resharded) and matches the reference."""
    runs = distributed_optimizer_runs
    ckpt, metrics = _reload_from_iteration_3(runs, tmp_path)
    interrupted = temporary_path(ckpt / "iter_0000006")  # as a save killed mid-way leaves it
    os.replace(ckpt / "iter_0000006", interrupted)
    for shard in sorted(interrupted.glob("*.distcp"))[:1]:
        shard.unlink()
    (interrupted / "metadata.json").unlink(missing_ok=True)

    result = _check(launch(_flags(byte_corpus, "--metrics-file", str(metrics), "--save", str(ckpt),
                                  "--load", str(ckpt), "--use-distributed-optimizer",
                                  "--tensor-model-parallel-size", "2")))
    assert "iter_0000003" in result.stdout and "DP=1 TP=2" in result.stdout
    assert not interrupted.exists()  # cleaned up
    assert read_tracker(ckpt) == ITERS
    _assert_matches_reference(metrics, runs)


def test_reload_under_pipeline_and_context_parallel(plain_optimizer_runs, byte_corpus, tmp_path):
    """The DP=2 run's iteration-3 checkpoint resumed with PP=2 x CP=2 (4 ranks): the pipeline
    schedule over 4 micro-batches, with documents split across the CP ranks, continues the
    training and validation losses of the DP=2 run."""
    runs = plain_optimizer_runs
    ckpt, metrics = _reload_from_iteration_3(runs, tmp_path)
    result = _check(launch(_flags(byte_corpus, "--metrics-file", str(metrics), "--load", str(ckpt),
                                  "--pipeline-model-parallel-size", "2", "--context-parallel-size", "2"), nproc=4))
    assert "iter_0000003" in result.stdout and "DP=1 TP=1 PP=2 CP=2" in result.stdout
    _assert_matches_reference(metrics, runs)


def _resumed_lines_match(metrics: Path, runs: Runs) -> None:
    """The 3 iterations after the resume: the uninterrupted run's batches and losses (rel 1e-5)."""
    ref = {r["iteration"]: r for r in runs.straight if r.get("split") is None}
    got = training_lines(metrics)
    assert [r["iteration"] for r in got] == list(range(1, ITERS + 1))
    for r in got[RESUME_AT:]:
        expected = ref[r["iteration"]]
        assert r["batch_sha1"] == expected["batch_sha1"]
        for key in ("loss", "lm_loss", "grad_norm"):
            assert r[key] == pytest.approx(expected[key], rel=1e-5), (key, r["iteration"])


@pytest.mark.parametrize("source, resumed_flags, written, resumed", [
    ("distributed_optimizer_runs", (), "with", "without"),
    ("plain_optimizer_runs", ("--use-distributed-optimizer",), "without", "with"),
])
def test_resume_across_the_distributed_optimizer(source, resumed_flags, written, resumed, request, byte_corpus,
                                                tmp_path):
    """A checkpoint written with --use-distributed-optimizer resumes without it, and the reverse
    (DP=2 both): Adam's moments and step carry over, so the uninterrupted run's trajectory goes on."""
    runs = request.getfixturevalue(source)
    ckpt, metrics = _reload_from_iteration_3(runs, tmp_path)
    result = _check(launch(_flags(byte_corpus, "--metrics-file", str(metrics), "--load", str(ckpt), *resumed_flags)))
    assert (f"optimizer state written {written} --use-distributed-optimizer" in result.stdout
            and f"resumed {resumed} --use-distributed-optimizer" in result.stdout), result.stdout[-3000:]
    _resumed_lines_match(metrics, runs)


def test_elastic_resume_from_two_data_parallel_ranks_to_one(distributed_optimizer_runs, byte_corpus, tmp_path):
    """Saved at DP=2, resumed at DP=1 with the same global batch (4 micro-batches instead of 2):
    the same samples form each batch and the losses continue (the distributed optimizer's
    state regathered for one rank)."""
    runs = distributed_optimizer_runs
    ckpt, metrics = _reload_from_iteration_3(runs, tmp_path)
    result = _check(launch(_flags(byte_corpus, "--metrics-file", str(metrics), "--load", str(ckpt),
                                  "--use-distributed-optimizer"), nproc=1))
    assert "iter_0000003" in result.stdout and "4 micro-batch(es) of 2 per DP rank, DP=1" in result.stdout
    _resumed_lines_match(metrics, runs)


def test_elastic_resume_from_one_data_parallel_rank_to_two(plain_optimizer_runs, byte_corpus, tmp_path):
    """Saved at DP=1 after 3 iterations, resumed at DP=2 with the same global batch: the 3
    iterations after the resume are the uninterrupted DP=2 run's (and so are the 3 before).
    Both runs save every iteration and keep the 2 most recent checkpoints (--most-recent-k)."""
    runs = plain_optimizer_runs
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    flags = _flags(byte_corpus, "--metrics-file", str(metrics), "--save", str(ckpt), "--load", str(ckpt),
                   "--save-interval", "1", "--most-recent-k", "2")
    exit_at = flags.index("--exit-interval") + 1
    first = _check(launch(flags[:exit_at] + [str(RESUME_AT)] + flags[exit_at + 1:], nproc=1))
    assert "DP=1" in first.stdout and read_tracker(ckpt) == RESUME_AT
    assert sorted(path.name for path in ckpt.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert f"--most-recent-k 2: removed checkpoint {ckpt / 'iter_0000001'}" in first.stdout
    result = _check(launch(flags))
    assert f"loaded {ckpt / 'iter_0000003'}" in result.stdout and "DP=2" in result.stdout
    assert sorted(path.name for path in ckpt.iterdir()) == ["iter_0000005", "iter_0000006", TRACKER_FILENAME]
    _resumed_lines_match(metrics, runs)
    ref = {r["iteration"]: r for r in runs.straight if r.get("split") is None}
    for r in training_lines(metrics)[:RESUME_AT]:
        assert r["batch_sha1"] == ref[r["iteration"]]["batch_sha1"]
        assert r["loss"] == pytest.approx(ref[r["iteration"]]["loss"], rel=1e-5)


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
