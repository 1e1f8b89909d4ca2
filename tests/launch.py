"""Starting real multi-process (gloo) runs from tests: one launcher for every test file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env() -> dict:
    """One thread per rank (2 cores), the repo importable, output unbuffered, no warning noise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_command(script, *args, nproc: int = 2, torchrun_flags: tuple = (), rendezvous: bool = False) -> list[str]:
    """``rendezvous``: the c10d rendezvous (a fresh round per restart, what --max-restarts
    needs) instead of a static master port."""
    where = (["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"] if rendezvous
             else ["--master-addr=127.0.0.1", f"--master-port={free_port()}"])
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *where, *torchrun_flags,
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
