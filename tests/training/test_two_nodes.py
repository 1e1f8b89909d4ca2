"""Two nodes on one machine: two torchrun agents as separate process trees (loopback), one rank each,
train as one job, with the same per-iteration losses as one agent running both ranks in the same layout.

DP=2 and TP=2 across the "nodes" behind a static master (``--nnodes 2 --node-rank 0/1``), and DP=2
through the SLURM example's own job step (``examples/cpt/slurm_step.sh``, c10d rendezvous): its
``train_step`` runs once per node with ``SLURM_NNODES=2`` and one GPU per node, ``srun`` and
``scontrol`` replaced by the stand-ins of the preemption test, so the torchrun command line that
runs is the script's."""

from __future__ import annotations

import pytest

from tests.launch import free_port, node_commands, run_nodes
from tests.training.conftest import PRETRAIN, SLURM_STEP, launch, slurm_env, tiny_flags, training_lines

pytestmark = pytest.mark.slow  # multi-process runs

ITERS = 3
TIMEOUT = 240
LAYOUTS = {"dp2": (), "tp2": ("--tensor-model-parallel-size", "2")}
# What the job's rank 0 prints of its layout: one job of two ranks, not two jobs of one.
LAYOUT_LINES = {"dp2": "DP=2 TP=1", "tp2": "DP=1 TP=2"}


def _flags(byte_corpus, metrics, layout) -> list[str]:
    return tiny_flags(byte_corpus, "--train-iters", str(ITERS), "--eval-iters", "0", "--metrics-file", str(metrics),
                      *LAYOUTS[layout])


@pytest.fixture(scope="module")
def one_agent(byte_corpus, tmp_path_factory) -> dict:
    """Each layout's lines from one agent running both ranks."""
    root = tmp_path_factory.mktemp("one_agent")
    lines = {}
    for layout in LAYOUTS:
        metrics = root / f"{layout}.jsonl"
        result = launch(_flags(byte_corpus, metrics, layout), nproc=2, timeout=TIMEOUT)
        assert result.returncode == 0, f"{layout}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        lines[layout] = training_lines(metrics)
    return lines


def _assert_same_run(got, reference) -> None:
    assert [line["iteration"] for line in got] == [line["iteration"] for line in reference] == list(range(1, ITERS + 1))
    for line, ref_line in zip(got, reference):
        assert line["batch_sha1"] == ref_line["batch_sha1"]
        assert line["tokens"] == ref_line["tokens"]
        assert line["loss"] == pytest.approx(ref_line["loss"], rel=1e-6), line["iteration"]
        assert line["grad_norm"] == pytest.approx(ref_line["grad_norm"], rel=1e-6), line["iteration"]
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trained


def _assert_one_job(results, layout) -> None:
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node} exited {result.returncode}:\n{result.stdout[-5000:]}"
    assert sum(LAYOUT_LINES[layout] in result.stdout for result in results) == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_agents_with_a_static_master_train_as_one_agent(one_agent, byte_corpus, tmp_path, layout):
    metrics = tmp_path / "metrics.jsonl"
    commands = node_commands(PRETRAIN, *_flags(byte_corpus, metrics, layout), nodes=2, nproc=1)
    results = run_nodes(commands, timeout=TIMEOUT)
    _assert_one_job(results, layout)
    assert LAYOUT_LINES[layout] in results[0].stdout  # --node-rank 0 holds global rank 0
    _assert_same_run(training_lines(metrics), one_agent[layout])


def test_the_slurm_job_step_on_two_nodes_trains_as_one_agent(one_agent, byte_corpus, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    env = slurm_env(tmp_path, SLURM_JOB_ID="4343", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[001-002]", GPUS="1",
                    RDZV_PORT=str(free_port()))
    step = ["bash", "-c", SLURM_STEP, "slurm_pair.sbatch", *_flags(byte_corpus, metrics, "dp2")]
    results = run_nodes([step, step], timeout=TIMEOUT, env=env)
    _assert_one_job(results, "dp2")
    _assert_same_run(training_lines(metrics), one_agent["dp2"])
    assert not (tmp_path / "scontrol.log").exists()  # no requeue: the step ended by itself
