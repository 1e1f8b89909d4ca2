"""Starting real multi-process runs from tests: one launcher, and the one decision of the test device.

The suite is written for the CPU backend (gloo, fp32, exact comparisons) and
forces it rather than assuming it: ``tests/conftest.py`` calls
:func:`hide_cuda_from_tests` before any test imports torch, so on a machine with
GPUs the test process and every process it starts see none and run on the CPU.
``MEGATRON_EXACT_TEST_DEVICE=cuda`` lets the processes started through this
module (torchrun jobs) use the GPUs instead, one per rank; a job that needs more
ranks than there are GPUs is skipped with a reason. In-process tests stay on the
CPU either way.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_VARIABLE = "MEGATRON_EXACT_TEST_DEVICE"
DEVICES = ("cpu", "cuda")
# What CUDA_VISIBLE_DEVICES was before the suite hid the GPUs (None: unset).
_VISIBLE_DEVICES_AT_START = os.environ.get("CUDA_VISIBLE_DEVICES")


def test_device() -> str:
    """The device multi-process test jobs run on: ``cpu`` (default) or ``cuda``."""
    device = os.environ.get(DEVICE_VARIABLE, "cpu")
    if device not in DEVICES:
        raise ValueError(f"{DEVICE_VARIABLE}={device!r}: expected one of {DEVICES}")
    return device


test_device.__test__ = False  # a helper, not a test


def hide_cuda_from_tests() -> None:
    """Hide every GPU from this process and its children (before torch initialises CUDA)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@functools.lru_cache(maxsize=None)
def visible_gpu_count() -> int:
    """GPUs a child process would see with the devices visible at start (asked in a child:
    this process has hidden them)."""
    env = dict(os.environ)
    _restore_visible_devices(env)
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def require_devices(nproc: int) -> None:
    """Skip the calling test when a job of ``nproc`` ranks cannot get one device per rank."""
    if test_device() != "cuda":
        return
    gpus = visible_gpu_count()
    if gpus < nproc:
        import pytest

        pytest.skip(f"needs {nproc} GPUs ({DEVICE_VARIABLE}=cuda), {gpus} visible; "
                    f"{DEVICE_VARIABLE}=cpu runs it on the CPU")


def _restore_visible_devices(env: dict) -> None:
    if _VISIBLE_DEVICES_AT_START is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = _VISIBLE_DEVICES_AT_START


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env() -> dict:
    """One thread per rank (2 cores), the repo importable, output unbuffered, no warning noise,
    and the test device: no GPU visible unless it is ``cuda``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if test_device() == "cuda":
        _restore_visible_devices(env)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# torchrun with its flags unchanged, through the project's launcher (what the examples run): network
# errors named, a store of its own per restart round under c10d rendezvous (megatron_exact/launch.py).
LAUNCHER = ("-m", "megatron_exact.launch")


def is_agent(cmdline: list[str]) -> bool:
    """Whether a process's command line is a torchrun agent's (ours or torchrun's own)."""
    return bool({"torchrun", LAUNCHER[1], "torch.distributed.run"} & {os.path.basename(part) for part in cmdline})


def agent_command(script, *flags: str, nproc: int = 1) -> list[str]:
    """One torchrun agent of ``script`` with exactly ``flags`` (no rendezvous chosen for it): for jobs
    that are meant not to form. No device check: such jobs start no worker."""
    return [sys.executable, *LAUNCHER, f"--nproc-per-node={nproc}", *flags, str(script)]


def torchrun_command(script, *args, nproc: int = 2, torchrun_flags: tuple = (), rendezvous: bool = False) -> list[str]:
    """``rendezvous``: the c10d rendezvous (a fresh round per restart, what --max-restarts
    needs) instead of a static master port. Skips the calling test when the test device
    cannot give every rank its own device."""
    require_devices(nproc)
    where = (["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"] if rendezvous
             else ["--master-addr=127.0.0.1", f"--master-port={free_port()}"])
    return [sys.executable, *LAUNCHER, f"--nproc-per-node={nproc}", *where, *torchrun_flags,
            str(script), *map(str, args)]


def run(command: list, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def run_checked(command: list, timeout: float) -> subprocess.CompletedProcess:
    """Run and fail loudly, with the command's output tails, unless it exits 0."""
    result = run(command, timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    return result


def node_commands(script, *args, nodes: int = 2, nproc: int = 1, rendezvous: bool = False,
                  torchrun_flags: tuple = ()) -> list[list[str]]:
    """One torchrun agent per "node" of a multi-node job on this machine (loopback): each with
    ``--nnodes`` and its own ``--node-rank`` behind a static master on 127.0.0.1, or, with
    ``rendezvous``, all alike behind a c10d endpoint on 127.0.0.1 (which then assigns the node
    ranks). Skips the calling test when the test device cannot give every rank its own device."""
    require_devices(nodes * nproc)
    port = free_port()
    commands = []
    for node_rank in range(nodes):
        where = (["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"] if rendezvous
                 else [f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"])
        commands.append([sys.executable, *LAUNCHER, f"--nnodes={nodes}",
                         f"--nproc-per-node={nproc}", *where, *torchrun_flags, str(script), *map(str, args)])
    return commands


def start_nodes(commands: list, logs: list, env: dict | None = None) -> list[subprocess.Popen]:
    """Start the agents of one job, each as its own process tree (a session of its own, as on
    separate machines), writing to the open files ``logs``; :func:`kill_nodes` ends them."""
    env = run_env() if env is None else env
    return [subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for command, log in zip(commands, logs)]


def kill_nodes(agents: list[subprocess.Popen]) -> list[subprocess.Popen]:
    """SIGKILL every agent's whole tree (its session) that still runs; returns those."""
    import signal

    hung = [agent for agent in agents if agent.poll() is None]
    for agent in hung:
        os.killpg(agent.pid, signal.SIGKILL)
    for agent in agents:
        agent.wait()
    return hung


def run_nodes(commands: list, timeout: float, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run the agents of one job together (:func:`start_nodes`) and wait for all of them; on
    ``timeout`` every tree is killed and the test fails with each agent's output tail."""
    import tempfile
    import time

    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    agents = start_nodes(commands, logs, env)
    deadline = time.time() + timeout
    try:
        while any(agent.poll() is None for agent in agents) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        hung = kill_nodes(agents)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if hung:
        tails = "\n".join(f"--- node {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
        raise AssertionError(f"the job's agents did not end within {timeout} s:\n{tails}")
    return [subprocess.CompletedProcess(command, agent.returncode, out, "")
            for command, agent, out in zip(commands, agents, outputs)]
