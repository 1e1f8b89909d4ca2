"""Faults in a live job: a rank killed hard (torchrun --max-restarts resumes from the last checkpoint,
and recomputes the lost iterations exactly as the job first computed them), then SIGTERM (SLURM
preemption: checkpoint at the iteration reached, clean exit). SIGUSR1: test_paper_configuration.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from megatron_exact.checkpoint import checkpoint_dir, read_tracker
from tests.training.conftest import (REPO, last_iteration, read_metrics, run_env, tiny_flags, torchrun_command,
                                     torchrun_workers, wait_for)

pytestmark = pytest.mark.slow  # multi-process runs


def _complete_records(text: str) -> dict:
    records = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short
            continue
        if record.get("split") is None:
            records[record["iteration"]] = record
    return records


def test_hard_kill_resumes_exactly_then_sigterm_saves_and_exits_cleanly(byte_corpus, tmp_path):
    metrics, ckpt, log = tmp_path / "metrics.jsonl", tmp_path / "ckpt", tmp_path / "job.log"
    flags = tiny_flags(byte_corpus, "--train-iters", "2000", "--eval-iters", "0", "--metrics-file", str(metrics),
                       "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "4", "--exit-signal-handler")
    with open(log, "w") as out:
        agent = subprocess.Popen(torchrun_command(flags, 2, ("--max-restarts=1",), rendezvous=True), cwd=REPO,
                                 env=run_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            # 1. Once a checkpoint exists and training is 1-2 iterations past it (so no save is under way:
            #    the next is 4 past it), freeze both ranks, note what the uninterrupted job computed,
            #    and kill one rank hard.
            def between_saves():
                tracker = read_tracker(ckpt)
                return tracker is not None and tracker + 1 <= last_iteration(metrics) <= tracker + 2

            wait_for(between_saves, agent, what="training 1-2 iterations past a checkpoint", poll=0.05)
            first_generation = torchrun_workers(agent)
            assert len(first_generation) == 2
            for process in first_generation:
                process.suspend()
            checkpointed = read_tracker(ckpt)
            uninterrupted = _complete_records(metrics.read_text())
            first_generation[1].send_signal(signal.SIGKILL)
            first_generation[0].resume()

            # 2. torchrun restarts both ranks; they resume from the last complete checkpoint.
            wait_for(lambda: {p.pid for p in torchrun_workers(agent)} - {p.pid for p in first_generation}, agent,
                     what="restarted workers")
            restarted = torchrun_workers(agent)
            wait_for(lambda: last_iteration(metrics) >= checkpointed + 3, agent, what="progress after the restart")

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
    loaded = re.findall(r"loaded \S+iter_(\d+) \(iteration (\d+),", output)
    assert loaded and int(loaded[-1][1]) == checkpointed  # the restarted ranks loaded that checkpoint

    reached = last_iteration(metrics)
    assert read_tracker(ckpt) == reached  # a checkpoint at exactly the iteration reached
    assert (checkpoint_dir(ckpt, reached) / "metadata.json").is_file()
    iterations = [r["iteration"] for r in read_metrics(metrics)]
    assert iterations == list(range(1, reached + 1))  # none missing, none twice

    # The iterations lost with the killed rank were recomputed exactly as the job first computed them.
    final = {r["iteration"]: r for r in read_metrics(metrics)}
    redone = [i for i in sorted(uninterrupted) if i > checkpointed]
    assert redone, (checkpointed, sorted(uninterrupted))
    for iteration in redone:
        for key in ("batch_sha1", "loss", "lm_loss", "lr", "grad_norm"):
            assert final[iteration][key] == uninterrupted[iteration][key], (iteration, key)
    for iteration in range(1, checkpointed + 1):  # kept from the first generation
        assert final[iteration] == uninterrupted[iteration]
