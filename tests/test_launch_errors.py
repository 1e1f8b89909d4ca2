"""Network-level failures of a multi-node launch end by themselves, non-zero, with one line naming the
rendezvous endpoint and the timeout that ran out (``python -m megatron_exact.launch``), instead of a
hang or torchrun's bare RendezvousTimeoutError traceback.

All on 127.0.0.1 with timeouts of 5 s (production: torchrun's defaults, see megatron_exact/launch.py
and examples/cpt/slurm_step.sh). The agents of every case start together (each waits out its own
timeout) and run a script that only prints, so no case imports the trainer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from megatron_exact import launch
from megatron_exact.errors import UserError
from megatron_exact.platform.distributed import check_restarts_can_meet
from tests.launch import REPO, agent_command, free_port, run_env

TIMEOUT_S = 5
WAIT_S = 90  # every agent ends well within this, or the test fails (and kills it)
WORKER = 'import os; print("worker", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], flush=True)'


def _cases(script) -> dict[str, list[list[str]]]:
    """Each case: the agents of one job that cannot form (each agent a command)."""
    closed, missing, mismatch, static = (free_port() for _ in range(4))
    c10d = ("--rdzv-backend=c10d",)
    return {
        # A node whose endpoint does not answer (nothing listens there; is_host=false: another node
        # would host it, as on a cluster).
        "unreachable": [agent_command(script, "--nnodes=2", *c10d, f"--rdzv-endpoint=127.0.0.1:{closed}",
                               f"--rdzv-conf=is_host=false,read_timeout={TIMEOUT_S},join_timeout={TIMEOUT_S}")],
        # --nnodes 2 but the other node never starts.
        "missing": [agent_command(script, "--nnodes=2", *c10d, f"--rdzv-endpoint=127.0.0.1:{missing}",
                           f"--rdzv-conf=join_timeout={TIMEOUT_S}")],
        # Two nodes that disagree on --nnodes.
        "mismatch": [agent_command(script, f"--nnodes={n}", *c10d, f"--rdzv-endpoint=127.0.0.1:{mismatch}",
                            f"--rdzv-conf=join_timeout={TIMEOUT_S}") for n in (2, 3)],
        # The static rendezvous (--master-addr): node 0 of 2 alone.
        "static": [agent_command(script, "--nnodes=2", "--node-rank=0", "--master-addr=127.0.0.1",
                          f"--master-port={static}", f"--rdzv-conf=timeout={TIMEOUT_S}")],
    }


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict[str, list[tuple[int, str, float]]]:
    """``(status, output, seconds)`` of every agent of every case, all run at once."""
    root = tmp_path_factory.mktemp("launch_errors")
    script = root / "worker.py"
    script.write_text(WORKER)
    cases = _cases(script)
    started = time.time()
    agents = {name: [(subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True), command)
                     for command in commands] for name, commands in cases.items()}
    results = {}
    try:
        for name, group in agents.items():
            results[name] = []
            for agent, command in group:
                output, _ = agent.communicate(timeout=max(1.0, started + WAIT_S - time.time()))
                results[name].append((agent.returncode, output, time.time() - started))
    finally:
        for group in agents.values():
            for agent, _ in group:
                if agent.poll() is None:
                    os.killpg(agent.pid, signal.SIGKILL)
                    agent.wait()
    return results


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"{launch.PROG}: error: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def _endpoint(command: list[str]) -> str:
    for flag in command:
        if flag.startswith("--rdzv-endpoint="):
            return flag.split("=", 1)[1]
    port = next(flag for flag in command if flag.startswith("--master-port=")).split("=", 1)[1]
    return f"127.0.0.1:{port}"


def _assert_named_failure(status: int, output: str) -> str:
    assert status == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "worker 0 of" not in output  # no worker started
    return _error_line(output)


@pytest.mark.slow  # agents waiting out their timeouts
def test_an_unreachable_endpoint_is_named_with_its_timeout(failures, tmp_path):
    [(status, output, _)] = failures["unreachable"]
    line = _assert_named_failure(status, output)
    assert re.search(r"cannot reach the rendezvous endpoint 127\.0\.0\.1:\d+ \(--rdzv-backend c10d\) within "
                     rf"--rdzv-conf read_timeout={TIMEOUT_S} s", line), line


@pytest.mark.slow  # agents waiting out their timeouts
def test_a_node_that_never_comes_is_named_with_the_join_timeout(failures):
    [(status, output, _)] = failures["missing"]
    line = _assert_named_failure(status, output)
    assert re.search(rf"the rendezvous endpoint 127\.0\.0\.1:\d+ \(--rdzv-backend c10d\): the rendezvous did not "
                     rf"complete within --rdzv-conf join_timeout={TIMEOUT_S} s: not all --nnodes 2 agents joined",
                     line), line


@pytest.mark.slow  # agents waiting out their timeouts
def test_nodes_that_disagree_on_nnodes_both_fail_naming_the_endpoint(failures):
    """Either the rendezvous never completes (join timeout: the first agent to give up closes it for
    the other) or c10d forms a job of 2 nodes, which the agents then refuse, comparing their --nnodes:
    either way both end, before any worker starts."""
    for (status, output, _), nnodes in zip(failures["mismatch"], (2, 3)):
        line = _assert_named_failure(status, output)
        timed_out = f"join_timeout={TIMEOUT_S} s: not all --nnodes {nnodes} agents joined" in line
        refused = re.search(r"joined 2 agents started with different --nnodes \(node 0: --nnodes [23], node 1: "
                            r"--nnodes [23]\): start every node with the same --nnodes", line)
        closed = "another node's agent closed the rendezvous before this node's round completed" in line
        assert timed_out or refused or closed, line
    ports = {re.search(r"127\.0\.0\.1:(\d+)", _error_line(output)).group(1) for _, output, _ in failures["mismatch"]}
    assert len(ports) == 1  # the one endpoint both used


@pytest.mark.slow  # agents waiting out their timeouts
def test_the_static_rendezvous_short_of_nodes_is_named_with_its_timeout(failures):
    [(status, output, _)] = failures["static"]
    line = _assert_named_failure(status, output)
    assert re.search(rf"the static rendezvous at 127\.0\.0\.1:\d+ \(--master-addr:--master-port\): the agents did "
                     rf"not meet within --rdzv-conf timeout={TIMEOUT_S} s", line), line


@pytest.mark.slow  # agents waiting out their timeouts
def test_every_failure_ends_within_a_bounded_time(failures):
    for name, results in failures.items():
        for status, _, seconds in results:
            assert seconds < WAIT_S, (name, seconds)


def test_static_restarts_across_nodes_are_refused_before_anything_starts(capsys):
    command = agent_command("worker.py", "--nnodes=2", "--node-rank=0", "--master-addr=127.0.0.1",
                            f"--master-port={free_port()}", "--max-restarts=1")
    status = launch.main(command[3:])  # in this process: the launcher's flags
    assert status == 1
    err = capsys.readouterr().err
    assert "megatron_exact.launch: error: --max-restarts 1 with --nnodes 2 needs --rdzv-backend c10d" in err


def test_workers_refuse_restarts_across_nodes_on_a_store_kept_across_rounds(monkeypatch):
    """Plain torchrun (one agent store for every round) with --max-restarts on several nodes would hang
    after a restart: the trainer refuses it at start-up, naming the launcher that works."""
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(UserError, match=r"--max-restarts 1 across 2 nodes: .*python -m megatron_exact\.launch"):
        check_restarts_can_meet()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the launcher's c10d: a store per round
    check_restarts_can_meet()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # one node: its restart count names the round
    check_restarts_can_meet()


def test_the_launcher_reads_the_rendezvous_as_torchrun_resolves_it():
    from torch.distributed import run as torchrun

    def of(*flags):
        return launch.Rendezvous.of(torchrun.parse_args([*flags, "worker.py"]))

    assert (of().backend, of().endpoint) == ("c10d", "localhost:0")  # torchrun's own choice for one node
    static = of("--nnodes=2", "--master-addr=10.0.0.1", "--master-port=6000", "--rdzv-conf=timeout=30")
    assert (static.backend, static.endpoint, static.max_nodes, static.describe_wait()) == (
        "static", "10.0.0.1:6000", 2, "--rdzv-conf timeout=30 s")
    c10d = of("--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29500", "--max-restarts=3")
    assert (c10d.endpoint, c10d.max_nodes, c10d.max_restarts, c10d.describe_wait()) == (
        "node001:29500", 4, 3, "--rdzv-conf join_timeout=600 s")


def test_a_connection_the_first_node_closed_is_named_as_closed_not_unreachable():
    """A node that reached the store and then lost it (the first node's agent ended mid-round, as when
    the nodes disagree on --nnodes) is told so; one that never connected is told the endpoint is unreachable."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    rendezvous = launch.Rendezvous("c10d", "127.0.0.1:29400", "2", 0, {})

    def failure(cause: str) -> str:
        try:
            try:
                raise DistNetworkError(cause)
            except DistNetworkError as err:
                raise RendezvousConnectionError("The connection to the C10d store has failed.") from err
        except RendezvousConnectionError as err:
            return str(launch.explain(err, rendezvous))

    closed = failure("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown or crash?")
    assert closed.startswith("the rendezvous endpoint 127.0.0.1:29400 (--rdzv-backend c10d): another node's agent "
                             "closed the rendezvous before this node's round completed"), closed
    assert "--nnodes 2 here" in closed and "Connection was likely closed" in closed
    unreachable = failure("The client socket has timed out after 5000ms while trying to connect to (127.0.0.1, 29400).")
    assert unreachable.startswith("cannot reach the rendezvous endpoint 127.0.0.1:29400 (--rdzv-backend c10d) within "
                                  "--rdzv-conf read_timeout="), unreachable
