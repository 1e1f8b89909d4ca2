"""SLURM preemption end to end, with torchrun's own signal handling.

(a) The example's step wrapper (``examples/cpt/slurm_step.sh``, sourced by ``slurm_pair.sbatch``),
trap included, with ``srun`` replaced by a stand-in that execs its arguments (so the trap's SIGTERM
reaches the torchrun agent as srun's forwarding does) and ``scontrol`` by one that records the
requeue: SLURM's SIGUSR1 to the batch shell leaves a complete checkpoint at the iteration reached,
no worker, a requeue of the job and exit status 0 (the README's).
(b) A signal the torchrun agent does not handle (SIGUSR1) ends it outright: its workers follow it
at once, and the latest checkpoint is a complete one, never one being written."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest

from megatron_exact.checkpoint import TRACKER_FILENAME, checkpoint_dir, read_tracker
from tests.launch import free_port, is_agent
from tests.training.conftest import (REPO, SLURM_STEP, last_iteration, run_env, slurm_env, tiny_flags,
                                     torchrun_command, torchrun_workers, wait_for)

pytestmark = pytest.mark.slow  # multi-process runs

def _trainers(process: psutil.Process) -> list:
    """The training processes below ``process`` (not the torchrun agent, whose command names the script too)."""
    return [p for p in process.children(recursive=True)
            if "pretrain_exact.py" in " ".join(p.cmdline()) and not is_agent(p.cmdline())]


def _gone(processes, timeout: float = 30) -> list:
    """The processes still running (not zombies) after up to ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def _kill_all(processes) -> None:
    """Clean-up after a failure: what the test started must not outlive it."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def test_slurm_signal_to_the_batch_shell_saves_requeues_and_leaves_no_worker(byte_corpus, tmp_path):
    metrics, ckpt, log = tmp_path / "metrics.jsonl", tmp_path / "ckpt", tmp_path / "job.log"
    flags = tiny_flags(byte_corpus, "--train-iters", "2000", "--eval-iters", "0", "--metrics-file", str(metrics),
                       "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "1000", "--exit-signal-handler")
    env = slurm_env(tmp_path, SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node001", GPUS="2",
                    RDZV_PORT=str(free_port()), SAVE_GRACE_S="120")
    with open(log, "w") as out:
        shell = subprocess.Popen(["bash", "-c", SLURM_STEP, "slurm_pair.sbatch", *flags], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
        descendants = []
        try:
            wait_for(lambda: last_iteration(metrics) >= 3, shell, what="3 iterations")
            workers = _trainers(psutil.Process(shell.pid))
            descendants = psutil.Process(shell.pid).children(recursive=True)
            assert len(workers) == 2
            shell.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@... sends
            shell.wait(timeout=240)
        finally:
            if shell.poll() is None:
                _kill_all(descendants or psutil.Process(shell.pid).children(recursive=True))
                shell.kill()
    output = log.read_text()
    assert shell.returncode == 0, output[-5000:]
    assert "train_step: SIGUSR1 received: asking the trainer to save" in output
    reached = last_iteration(metrics)
    assert f"exit signal received: saving at iteration {reached}" in output
    assert read_tracker(ckpt) == reached and 3 <= reached < 1000  # the signal's save, not a periodic one
    assert (checkpoint_dir(ckpt, reached) / "metadata.json").is_file()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert _gone(descendants, timeout=5) == []  # the agent and its workers


def test_signal_to_the_torchrun_agent_leaves_the_last_complete_checkpoint_and_no_worker(byte_corpus, tmp_path):
    from megatron.core import dist_checkpointing

    metrics, ckpt, log = tmp_path / "metrics.jsonl", tmp_path / "ckpt", tmp_path / "job.log"
    flags = tiny_flags(byte_corpus, "--train-iters", "2000", "--eval-iters", "0", "--metrics-file", str(metrics),
                       "--save", str(ckpt), "--save-interval", "1", "--exit-signal-handler")
    with open(log, "w") as out:
        agent = subprocess.Popen(torchrun_command(flags, 2), cwd=REPO, env=run_env(), stdout=out,
                                 stderr=subprocess.STDOUT)
        descendants = []
        try:
            wait_for(lambda: (read_tracker(ckpt) or 0) >= 3, agent, what="3 checkpoints")
            workers = torchrun_workers(agent)
            descendants = psutil.Process(agent.pid).children(recursive=True)  # workers and their helpers
            assert len(workers) == 2
            agent.send_signal(signal.SIGUSR1)  # not among the signals torchrun handles: it dies outright
            agent.wait(timeout=60)
            alive = _gone(descendants, timeout=30)
        finally:
            if agent.poll() is None:
                agent.kill()
            _kill_all(descendants)
    assert agent.returncode == -signal.SIGUSR1
    assert alive == [], [p.cmdline() for p in alive if p.is_running()]
    assert "the torchrun agent (pid" in log.read_text()
    # The tracker names a complete checkpoint; anything being written then stayed a temporary.
    latest = read_tracker(ckpt)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(ckpt, latest)))
    assert common["iteration"] == latest >= 3
    for entry in ckpt.iterdir():
        if entry.name.startswith("iter_"):
            assert (entry / "metadata.json").is_file(), entry
        else:
            assert entry.name == TRACKER_FILENAME or entry.name.startswith("."), entry
