"""Process-group and model-parallel initialisation for torchrun launches (NCCL or gloo)."""

from __future__ import annotations

import datetime
import os

import torch

from megatron_exact.platform import distributed_backend, setup_platform


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
) -> None:
    """Start ``torch.distributed`` from torchrun's environment and build Megatron's groups.

    After torchrun restarted the workers (``--max-restarts``), the process group
    rendezvouses in a key namespace of that restart's own.

    Works without a launcher too (a single process, world size 1): what
    one-process tools such as checkpoint conversion need. Seeds the
    tensor-parallel RNG tracker the way Megatron-LM does.
    """
    setup_platform()
    # Imported after setup_platform so the CPU backend is active before Megatron-Core loads.
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _init_process_group(datetime.timedelta(minutes=timeout_minutes))
    world_size = torch.distributed.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size x --context-parallel-size = {model_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _init_process_group(timeout: datetime.timedelta) -> None:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        # A lone process gets a private rendezvous. Not via os.environ: child processes
        # (a torchrun a test starts) would inherit a port this process still listens on.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        torch.distributed.init_process_group(backend=distributed_backend(), init_method=init_method,
                                             rank=rank, world_size=world_size, timeout=timeout)
        return
    # A launcher (torchrun, SLURM script) set the rendezvous.
    check_restarts_can_meet()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart == 0 or not _store_outlives_restarts():
        # First start, or (c10d through megatron_exact.launch) a store of this round's own, hosted by rank 0.
        torch.distributed.init_process_group(backend=distributed_backend(), init_method="env://",
                                             rank=rank, world_size=world_size, timeout=timeout)
        return
    # torchrun kept its one store across the restart (--max-restarts): without a namespace
    # of its own, the new generation reads the previous one's gloo peer addresses from it and
    # fails to connect. The restart count names the generation consistently on one node only
    # (check_restarts_can_meet refuses the rest).
    store, rank, world_size = next(torch.distributed.rendezvous("env://", rank=rank, world_size=world_size,
                                                                timeout=timeout))
    torch.distributed.init_process_group(
        backend=distributed_backend(), store=torch.distributed.PrefixStore(f"restart_{restart}", store),
        rank=rank, world_size=world_size, timeout=timeout,
    )


def _store_outlives_restarts() -> bool:
    """Whether the workers use torchrun's agent store, which lives as long as the agents (every
    restart round shares it): torchrun's default; ``megatron_exact.launch`` turns it off for c10d."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def check_restarts_can_meet() -> None:
    """Refuse a launch whose restarted workers could not meet again.

    torchrun numbers restarts per node (``TORCHELASTIC_RESTART_COUNT`` counts the failures of
    the node's own workers; a node restarted because another one rejoined keeps its count), so
    with one store kept across rounds the restarted workers of different nodes would look for
    each other under different names and hang until the process-group timeout. A launch
    through ``python -m megatron_exact.launch`` with c10d rendezvous gives every round a fresh
    store instead (see that module).
    """
    from megatron_exact.errors import UserError

    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if nodes > 1 and restarts > 0 and _store_outlives_restarts():
        raise UserError(
            f"--max-restarts {restarts} across {nodes} nodes: torchrun keeps one store for every restart "
            "round and counts restarts per node, so the restarted workers would not find each other (a "
            "hang until the process-group timeout); launch with `python -m megatron_exact.launch` (torchrun's "
            "flags) and --rdzv-backend c10d, which gives every round its own store "
            "(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)")


def exit_with_launcher(poll_seconds: float = 1.0) -> bool:
    """Under torchrun, end this worker when its agent is gone; returns whether it watches.

    torchrun's agent turns SIGTERM/SIGINT into an orderly shutdown of its workers, but a
    signal it does not handle (SIGUSR1, SIGKILL, ...) ends it outright, and its workers would
    live on as orphans holding their devices (and, once the step's other ranks are gone,
    hang in a collective). A daemon thread notices the new parent and kills this process
    and its own children (Megatron-Core's checkpoint writers) at once, with SIGKILL: a
    checkpoint being written stays a temporary directory, the tracker keeps naming the
    previous complete one.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import signal
    import sys
    import threading
    import time

    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll_seconds)
        print(f"[rank {os.environ.get('RANK', '?')}] the torchrun agent (pid {agent}) is gone: exiting",
              file=sys.stderr, flush=True)
        for child in _child_processes(os.getpid()):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:  # exited meanwhile
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
    return True


def _child_processes(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux: from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
