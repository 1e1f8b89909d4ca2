"""``python -m megatron_exact.launch``: torchrun (``torch.distributed.run``) with its flags unchanged,
and two things torchrun does not do for a job on several nodes.

    python -m megatron_exact.launch --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node001:29500 --rdzv-id "$SLURM_JOB_ID" --max-restarts 3 \\
        tools/pretrain_exact.py ...

1. Network-level failures end with one line naming the endpoint and the timeout that ran out,
   instead of torchrun's bare ``RendezvousTimeoutError`` / "The connection to the C10d store has
   failed" tracebacks: a node that cannot reach the rendezvous endpoint, or a rendezvous that never
   completes because fewer agents joined than ``--nnodes`` asks for (a node not started, or started
   with another ``--nnodes`` or endpoint). Agents that did meet but were started with different
   ``--nnodes`` (c10d may then form a job of the smaller size) compare their flags in the round's
   store and all stop before any worker starts. Exit status 1.
2. Restarts across nodes (``--max-restarts``) resume instead of hanging. torchrun keeps one store
   for the workers across restart rounds and numbers the rounds per node
   (``TORCHELASTIC_RESTART_COUNT`` only counts the failures of the node's own workers: the node
   whose worker died restarts as attempt 1, the others, restarted because a node rejoined, as
   attempt 0), so the restarted workers of different nodes cannot agree on where to meet in that
   store and hang until the process-group timeout. With c10d rendezvous this launcher gives every
   round a store of its own (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: rank 0 of each round hosts
   it on a port its agent picks), which the trainer's process group uses as is
   (``megatron_exact/platform/distributed.py``). The static rendezvous (``--master-addr``) keeps one
   store for the whole job, so restarts across nodes are refused there: use c10d.

Timeouts (torchrun's, through ``--rdzv-conf``): ``join_timeout`` (c10d: how long an agent waits for
the rendezvous to complete, default 600 s), ``read_timeout`` (c10d: how long a store operation, and
the first connection to the endpoint, may take, default 60 s), ``timeout`` (static rendezvous,
default 600 s). Keep the defaults in production (nodes of a large allocation start minutes apart);
the tests use about 5 s.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_exact.errors import UserError

PROG = "megatron_exact.launch"
SHARE_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
# torchrun's defaults (torch/distributed/elastic/rendezvous/{dynamic_rendezvous,c10d_rendezvous_backend,
# static_tcp_rendezvous}.py).
DEFAULT_JOIN_TIMEOUT_S = 600
DEFAULT_READ_TIMEOUT_S = 60
DEFAULT_STATIC_TIMEOUT_S = 600


class RendezvousFailed(UserError):
    """The agents of the job did not meet; the message names the endpoint and the timeout."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and how long the agents of one job meet, as torchrun's flags say."""

    backend: str  # "c10d", "static", ...
    endpoint: str  # host:port
    nnodes: str  # as given: "2" or "1:4"
    max_restarts: int
    conf: dict

    @classmethod
    def of(cls, args) -> "Rendezvous":
        conf = {}
        for item in filter(None, (args.rdzv_conf or "").split(",")):
            key, _, value = item.partition("=")
            conf[key.strip()] = value.strip()
        if args.standalone or (args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None
                               and str(args.nnodes).split(":")[-1] == "1"):
            # What torchrun's run() turns these into: one node behind a private c10d endpoint.
            return cls("c10d", "localhost:0", args.nnodes, args.max_restarts, conf)
        if args.rdzv_backend == "static":
            endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or 29500}"
        else:
            endpoint = args.rdzv_endpoint
        return cls(args.rdzv_backend, endpoint, args.nnodes, args.max_restarts, conf)

    @property
    def max_nodes(self) -> int:
        return int(str(self.nnodes).split(":")[-1])

    def seconds(self, key: str, default: int) -> int:
        return int(self.conf.get(key, default))

    def describe_wait(self) -> str:
        if self.backend == "static":
            return f"--rdzv-conf timeout={self.seconds('timeout', DEFAULT_STATIC_TIMEOUT_S)} s"
        return f"--rdzv-conf join_timeout={self.seconds('join_timeout', DEFAULT_JOIN_TIMEOUT_S)} s"


def check_restarts_across_nodes(rendezvous: Rendezvous) -> None:
    """Refuse what would hang: restarts across nodes that share one store for the whole job."""
    if rendezvous.max_restarts > 0 and rendezvous.max_nodes > 1 and rendezvous.backend == "static":
        raise UserError(
            f"--max-restarts {rendezvous.max_restarts} with --nnodes {rendezvous.nnodes} needs --rdzv-backend c10d "
            f"(--rdzv-endpoint HOST:PORT): the static rendezvous keeps one store for the whole job and torchrun "
            "numbers restarts per node, so restarted workers on different nodes would not find each other")


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception's message (``error``'s own when it has no cause)."""
    cause = error
    while (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip().splitlines()
    return text[0] if text else ""


def explain(error: BaseException, rendezvous: Rendezvous) -> Optional[RendezvousFailed]:
    """The message for a network-level failure of torchrun's rendezvous; None for anything else."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError, RendezvousConnectionError,
                                                          RendezvousTimeoutError)

    if rendezvous.backend == "static":
        where = f"the static rendezvous at {rendezvous.endpoint} (--master-addr:--master-port)"
        same = "--master-addr or --master-port"
    else:
        where = f"the rendezvous endpoint {rendezvous.endpoint} (--rdzv-backend {rendezvous.backend})"
        same = "--rdzv-endpoint or --rdzv-id"
    expected = (f"not all --nnodes {rendezvous.nnodes} agents joined it with the same settings (a node not started, "
                f"or started with another --nnodes, {same})")
    cause = _root_cause(error)
    detail = f" ({cause.rstrip('.')})" if cause else ""
    if isinstance(error, RendezvousTimeoutError):
        return RendezvousFailed(f"{where}: the rendezvous did not complete within {rendezvous.describe_wait()}: "
                                f"{expected}")
    closed = (f"{where}: another node's agent closed the rendezvous before this node's round completed (it "
              f"ended or gave up: see its output); --nnodes {rendezvous.nnodes} here")
    if isinstance(error, RendezvousConnectionError) and "connection was likely closed" in cause.lower():
        # Connected, then the store's host (the first node's agent) went away mid-round.
        return RendezvousFailed(f"{closed}{detail}")
    if isinstance(error, RendezvousConnectionError):
        read = rendezvous.seconds("read_timeout", DEFAULT_READ_TIMEOUT_S)
        return RendezvousFailed(
            f"cannot reach {where} within --rdzv-conf read_timeout={read} s{detail}: is the first node's agent "
            f"running, and is {rendezvous.endpoint} reachable from this node (host name, port, firewall)?")
    if isinstance(error, RendezvousClosedError):
        return RendezvousFailed(closed)
    if isinstance(error, DistError) and rendezvous.backend == "static":
        # The static rendezvous: the master's store waits for every node (DistStoreError), the other
        # nodes connect to it (DistNetworkError).
        return RendezvousFailed(f"{where}: the agents did not meet within {rendezvous.describe_wait()}{detail}: "
                                f"{expected}")
    return None


class _CheckedRendezvous:
    """torchrun's rendezvous handler, with every agent of a round checking that all were started with
    the same ``--nnodes`` (in the round's own store) before it starts its workers."""

    KEY = "megatron_exact/nnodes/{}"

    def __init__(self, handler, rendezvous: Rendezvous):
        self._handler = handler
        self._rendezvous = rendezvous

    def __getattr__(self, name):
        return getattr(self._handler, name)

    def next_rendezvous(self):
        info = self._handler.next_rendezvous()
        mine = str(self._rendezvous.nnodes)
        info.store.set(self.KEY.format(info.rank), mine)
        theirs = {node: info.store.get(self.KEY.format(node)).decode() for node in range(info.world_size)}
        if set(theirs.values()) != {mine}:
            flags = ", ".join(f"node {node}: --nnodes {nnodes}" for node, nnodes in theirs.items())
            raise RendezvousFailed(
                f"the rendezvous endpoint {self._rendezvous.endpoint} (--rdzv-backend {self._rendezvous.backend}) "
                f"joined {info.world_size} agents started with different --nnodes ({flags}): start every node with "
                "the same --nnodes")
        return info


def _check_nnodes_at_rendezvous(rendezvous: Rendezvous) -> None:
    import torch.distributed.elastic.rendezvous.registry as registry

    get_handler = registry.get_rendezvous_handler
    if getattr(get_handler, "megatron_exact_checked", False):
        get_handler = get_handler.__wrapped__

    def checked(params):
        return _CheckedRendezvous(get_handler(params), rendezvous)

    checked.megatron_exact_checked = True
    checked.__wrapped__ = get_handler
    registry.get_rendezvous_handler = checked  # what torch.distributed.launcher.api calls


def _child_failure_message(error) -> str:
    try:
        return error.format_msg()
    except Exception:  # noqa: BLE001  (the summary is a courtesy; the status says it failed)
        return str(error)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    rendezvous = Rendezvous.of(args)
    check_restarts_across_nodes(rendezvous)
    if rendezvous.backend == "c10d":
        os.environ.setdefault(SHARE_STORE_VARIABLE, "1")
    _check_nnodes_at_rendezvous(rendezvous)
    try:
        torchrun.run(args)
    except ChildFailedError as err:  # a worker failed: torchrun's own summary (ranks, exit codes, error files)
        print(_child_failure_message(err), file=sys.stderr, flush=True)
        return 1
    except RendezvousFailed:
        raise
    except Exception as err:  # noqa: BLE001  (anything not network-level keeps its traceback)
        failure = explain(err, rendezvous)
        if failure is None:
            raise
        raise failure from err
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_exact import cli

    return cli.run(PROG, _main, argv)


if __name__ == "__main__":
    from megatron_exact import cli

    cli.exit_process(main())
