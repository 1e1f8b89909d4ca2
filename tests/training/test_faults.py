"""Faults in a live job: a rank killed hard (torchrun --max-restarts resumes from the last checkpoint),
then SIGTERM (SLURM preemption: checkpoint at the iteration reached, clean exit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from megatron_exact.checkpoint import checkpoint_dir, read_tracker
from tests.training.conftest import REPO, read_metrics, run_env, tiny_flags, torchrun_command

pytestmark = pytest.mark.slow  # multi-process runs


def _last_iteration(path) -> int:
    if not os.path.exists(path):
        return 0
    iterations = []
    with open(path) as f:
        for line in f:
            try:
                iterations.append(json.loads(line)["iteration"])
            except (json.JSONDecodeError, KeyError):
                pass
    return max(iterations, default=0)


def _workers(agent: subprocess.Popen) -> list[psutil.Process]:
    """The live training processes torchrun started (the agent's direct children)."""
    workers = []
    for process in psutil.Process(agent.pid).children():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and "pretrain_exact.py" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:  # exited meanwhile
            pass
    return workers


def _wait_for(condition, agent, timeout=300, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if agent.poll() is not None:
            raise AssertionError(f"job ended (status {agent.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_hard_kill_resumes_then_sigterm_saves_and_exits_cleanly(byte_corpus, tmp_path):
    metrics, ckpt, log = tmp_path / "metrics.jsonl", tmp_path / "ckpt", tmp_path / "job.log"
    flags = tiny_flags(byte_corpus, "--train-iters", "2000", "--eval-iters", "0", "--metrics-file", str(metrics),
                       "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2", "--exit-signal-handler")
    with open(log, "w") as out:
        agent = subprocess.Popen(torchrun_command(flags, 2, ("--max-restarts=1",), rendezvous=True), cwd=REPO, env=run_env(),
                                 stdout=out, stderr=subprocess.STDOUT)
        try:
            # 1. Kill one rank hard once a checkpoint exists and training has moved past it.
            _wait_for(lambda: read_tracker(ckpt) is not None and _last_iteration(metrics) >= read_tracker(ckpt) + 1,
                      agent, what="a checkpoint and one more iteration")
            first_generation = _workers(agent)
            assert len(first_generation) == 2
            first_generation[1].send_signal(signal.SIGKILL)

            # 2. torchrun restarts both ranks; they resume from the last complete checkpoint.
            _wait_for(lambda: {p.pid for p in _workers(agent)} - {p.pid for p in first_generation}, agent,
                      what="restarted workers")
            restarted = _workers(agent)
            resumed_from = read_tracker(ckpt)
            _wait_for(lambda: _last_iteration(metrics) >= resumed_from + 3, agent, what="progress after the restart")

            # 3. Preemption: SIGTERM to every rank.
            for process in restarted:
                process.send_signal(signal.SIGTERM)
            agent.wait(timeout=180)
        finally:
            if agent.poll() is None:
                agent.kill()
    output = log.read_text()
    assert agent.returncode == 0, output[-5000:]
    assert "exit signal received: saving at iteration" in output
    assert "loaded" in output  # the restarted ranks loaded a checkpoint

    reached = _last_iteration(metrics)
    assert read_tracker(ckpt) == reached  # a checkpoint at exactly the iteration reached
    assert (checkpoint_dir(ckpt, reached) / "metadata.json").is_file()
    iterations = [r["iteration"] for r in read_metrics(metrics)]
    assert iterations == list(range(1, reached + 1))  # none missing, none twice
