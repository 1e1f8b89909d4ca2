"""Soak: a long two-node job (two agents on loopback, one rank each, c10d rendezvous) killed at random,
against the same job uninterrupted.

Both jobs train the tiny qwen2 of the tests (``tests/training/conftest.py:tiny_flags``) for
``--iters`` iterations with a checkpoint every ``--save-interval``, through
``python -m megatron_exact.launch`` with ``--max-restarts`` equal to the number of kills. The
killed job gets ``--kills`` SIGKILLs of one rank's training process (rank and moment drawn with
``--seed``): one iteration drawn in each of ``--kills`` equal windows of the run, alternately
mid-step and while a checkpoint is being written. Checks:

- every iteration in the metrics file exactly once (lost iterations: recomputed, none missing);
- per-iteration losses and the final checkpoint's tensors (model, optimizer, RNG) bit-equal to the
  uninterrupted job's (CPU determinism);
- no temporary checkpoint directory left;
- the uninterrupted job's resident memory per rank at its last iterations at most ``--rss-tolerance``
  (5%) above its value at iteration ``--rss-from`` (50); each process of the killed job is compared
  with its own first ``--rss-from`` iterations where it lived that long (reported, not checked).

RSS is sampled from outside (psutil, every 0.1 s) against the iteration the metrics file shows.

    python bench/soak.py --out runs/soak.json               # 300 iterations, 3 kills (~10 min on 2 cores)
    python bench/soak.py --iters 24 --save-interval 8 --kills 1 --rss-from 8   # the suite's short one

Exit status 0 when every check holds; the summary (JSON) goes to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRETRAIN = REPO / "tools" / "pretrain_exact.py"
POLL_S = 0.1


@dataclass
class Kill:
    iteration: int  # the kill comes once the job reached this iteration
    rank: int
    during_save: bool  # wait for a checkpoint being written (the next save from that iteration on)


def kill_plan(iters: int, save_interval: int, kills: int, seed: int, first: "int | None" = None) -> list[Kill]:
    """One kill per window of ``[first, iters - save_interval)`` (``first``: 25, or half the run if
    shorter), alternately mid-step and during a save."""
    rng = random.Random(seed)
    first = min(25, iters // 2) if first is None else first
    span = max(1, (iters - save_interval - first) // max(kills, 1))
    plan = []
    for k in range(kills):
        start = first + k * span
        plan.append(Kill(rng.randrange(start, start + max(1, span - save_interval)), rng.randrange(2), k % 2 == 1))
    return plan


def tiny_flags(data_prefix: str, iters: int, save_interval: int, metrics: Path, ckpt: Path) -> list[str]:
    return ["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", "128",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--data-path", data_prefix, "--split", "90,10,0", "--log-interval", "1", "--eval-iters", "0",
            "--loss-weighting", "exact", "--train-iters", str(iters), "--metrics-file", str(metrics),
            "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(save_interval)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_commands(flags: list[str], max_restarts: int, nodes: int = 2) -> list[list[str]]:
    port = free_port()
    return [[sys.executable, "-m", "megatron_exact.launch", f"--nnodes={nodes}", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--max-restarts={max_restarts}",
             "--rdzv-conf=join_timeout=120", str(PRETRAIN), *flags] for _ in range(nodes)]


def cpu_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def last_iteration(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    last = 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") is None:
            last = record["iteration"]  # after a resume the file is cut back: the last line, not the maximum
    return last


@dataclass
class Process:
    """One training process's life: its rank and ``(iteration, rss bytes)`` samples."""

    pid: int
    rank: int
    samples: list = field(default_factory=list)


@dataclass
class JobResult:
    statuses: list
    seconds: float
    processes: list  # Process, in order of appearance
    kills: list  # {"iteration", "rank", "during_save", "pid"}
    outputs: list

    def rss_by_rank(self) -> dict:
        peak = {}
        for process in self.processes:
            for _, rss in process.samples:  # the peak: every sample, whatever the iteration
                peak[process.rank] = max(peak.get(process.rank, 0), rss)
        return peak


def _workers(agents) -> dict[int, "psutil.Process"]:
    import psutil

    found = {}
    for agent in agents:
        try:
            children = psutil.Process(agent.pid).children()
        except psutil.Error:
            continue
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE and str(PRETRAIN) in child.cmdline():
                    found[child.pid] = (int(child.environ().get("RANK", -1)), child)
            except psutil.Error:
                pass
    return found


def run_job(root: Path, data_prefix: str, iters: int, save_interval: int, plan: list[Kill], timeout: float,
            commands=None, env=None) -> JobResult:
    """Run one job to its end, killing as ``plan`` says and sampling every rank's RSS."""
    import psutil

    from megatron_exact import atomic_io

    root.mkdir(parents=True, exist_ok=True)
    metrics, ckpt = root / "metrics.jsonl", root / "ckpt"
    flags = tiny_flags(data_prefix, iters, save_interval, metrics, ckpt)
    commands = commands(flags, len(plan)) if commands else node_commands(flags, len(plan))
    logs = [open(root / f"node{i}.log", "w+") for i in range(len(commands))]
    agents = [subprocess.Popen(command, cwd=REPO, env=env or cpu_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True) for command, log in zip(commands, logs)]
    processes: dict[int, Process] = {}
    pending, done, killed_pids = list(plan), [], set()
    start = time.time()
    try:
        while any(agent.poll() is None for agent in agents):
            if time.time() - start > timeout:
                raise TimeoutError(f"{root}: the job did not end within {timeout} s")
            iteration = last_iteration(metrics)
            workers = _workers(agents)
            for pid, (rank, proc) in workers.items():
                record = processes.setdefault(pid, Process(pid, rank))
                try:
                    record.samples.append((iteration, proc.memory_info().rss))
                except psutil.Error:
                    pass
            if pending and len(workers) == 2 and not killed_pids & set(workers) and iteration >= pending[0].iteration:
                kill = pending[0]
                saving = atomic_io.temporaries(ckpt, "iter_*") != []
                if not kill.during_save or saving:
                    victim = next(pid for pid, (rank, _) in workers.items() if rank == kill.rank)
                    os.kill(victim, signal.SIGKILL)
                    killed_pids |= set(workers)  # the next kill waits for the next generation
                    done.append({"iteration": iteration, "rank": kill.rank, "during_save": saving, "pid": victim})
                    pending.pop(0)
            time.sleep(POLL_S if not (pending and pending[0].during_save) else POLL_S / 10)
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return JobResult([agent.returncode for agent in agents], time.time() - start, list(processes.values()), done,
                     outputs)


def checkpoint_tensors(directory: Path) -> dict:
    """Every tensor of a distributed checkpoint, read offline (one process)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "all.pt"
        dcp_to_torch_save(str(directory), str(target))
        state = torch.load(target, weights_only=False)

    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", state)
    return flat


def rss_growth(process: Process, rss_from: int, last: int) -> "float | None":
    """RSS at the process's last sampled iteration before ``last`` over its RSS at its first sample
    ``rss_from`` iterations into its own life; None if it did not live past that."""
    samples = [(it, rss) for it, rss in process.samples if rss > 0]  # 0: read as the process died
    if not samples:
        return None
    # Until a restarted process has loaded its checkpoint, the metrics file still shows where the
    # killed generation got to: its life starts at the lowest iteration it saw.
    first_iteration = min(it for it, _ in samples)
    base = next(((it, rss) for it, rss in samples if it >= first_iteration + rss_from), None)
    if base is None:
        return None
    end = [rss for it, rss in samples if base[0] < it < last]
    return end[-1] / base[1] - 1.0 if end else None


def soak(root: Path, data_prefix: str, iters: int = 300, save_interval: int = 20, kills: int = 3, seed: int = 0,
         rss_from: int = 50, rss_tolerance: float = 0.05, timeout: float = 1800, commands=None, env=None) -> dict:
    """Both jobs and every check; ``summary["ok"]`` says whether all hold, ``summary["failures"]`` which not."""
    from megatron_exact import atomic_io
    from megatron_exact.checkpoint import checkpoint_dir, read_tracker

    plan = kill_plan(iters, save_interval, kills, seed)
    reference = run_job(root / "uninterrupted", data_prefix, iters, save_interval, [], timeout, commands, env)
    killed = run_job(root / "killed", data_prefix, iters, save_interval, plan, timeout, commands, env)
    failures = []
    for name, job in (("uninterrupted", reference), ("killed", killed)):
        if job.statuses != [0] * len(job.statuses):
            failures.append(f"{name}: exit statuses {job.statuses}:\n{job.outputs[0][-2000:]}\n{job.outputs[-1][-2000:]}")
    if len(killed.kills) != kills:
        failures.append(f"{len(killed.kills)} of {kills} kills happened")

    def records(name):
        path = root / name / "metrics.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return [r for r in lines if r.get("split") is None]

    ref_records, got_records = records("uninterrupted"), records("killed")
    got_iterations = [r["iteration"] for r in got_records]
    missing = sorted(set(range(1, iters + 1)) - set(got_iterations))
    repeated = len(got_iterations) - len(set(got_iterations))
    if got_iterations != list(range(1, iters + 1)):
        failures.append(f"metrics iterations: {len(missing)} missing, {repeated} repeated")
    differing = [r["iteration"] for r, ref in zip(got_records, ref_records)
                 if (r["loss"], r["batch_sha1"]) != (ref["loss"], ref["batch_sha1"])]
    if differing:
        failures.append(f"losses differ from the uninterrupted job's at iterations {differing[:10]}")
    leftovers = [str(p) for name in ("uninterrupted", "killed") for p in atomic_io.temporaries(root / name / "ckpt", "iter_*")]
    if leftovers:
        failures.append(f"temporary checkpoint directories left: {leftovers}")
    weights_equal = None
    if read_tracker(root / "killed" / "ckpt") == read_tracker(root / "uninterrupted" / "ckpt") == iters:
        ref_t = checkpoint_tensors(checkpoint_dir(root / "uninterrupted" / "ckpt", iters))
        got_t = checkpoint_tensors(checkpoint_dir(root / "killed" / "ckpt", iters))
        import torch

        weights_equal = ref_t.keys() == got_t.keys() and all(torch.equal(ref_t[k], got_t[k]) for k in ref_t)
        if not weights_equal:
            failures.append("the final checkpoints' tensors differ")
    else:
        failures.append("the final checkpoint is missing")

    growth = {p.rank: rss_growth(p, rss_from, iters) for p in reference.processes}
    for rank, value in growth.items():
        if value is None:
            failures.append(f"rank {rank}: too few RSS samples")
        elif value > rss_tolerance:
            failures.append(f"rank {rank}: RSS grew {100 * value:.1f}% from iteration {rss_from} to the end")
    summary = {
        "iters": iters, "save_interval": save_interval, "seed": seed, "nodes": 2, "ranks_per_node": 1,
        "kills_planned": [vars(k) for k in plan], "kills": killed.kills, "kills_survived": len(killed.kills),
        "iterations_missing": len(missing), "iterations_repeated": repeated, "final_weights_equal": weights_equal,
        "leftover_temporaries": len(leftovers),
        "rss_growth_uninterrupted": {rank: None if v is None else round(v, 4) for rank, v in growth.items()},
        "rss_growth_killed_processes": [
            {"rank": p.rank, "first_iteration_seen": min(it for it, _ in p.samples) if p.samples else None,
             "growth": None if (g := rss_growth(p, rss_from, iters)) is None else round(g, 4)}
            for p in killed.processes],
        "peak_rss_mib_uninterrupted": {r: round(v / 2**20, 1) for r, v in reference.rss_by_rank().items()},
        "peak_rss_mib_killed": {r: round(v / 2**20, 1) for r, v in killed.rss_by_rank().items()},
        "seconds": {"uninterrupted": round(reference.seconds, 1), "killed": round(killed.seconds, 1)},
        "failures": failures, "ok": not failures,
    }
    return summary


def byte_corpus(root: Path) -> str:
    """The tests' synthetic corpus (examples/tiny_cpu/make_corpus.py, ByteTokenizer)."""
    import importlib.util

    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "examples" / "tiny_cpu" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    root.mkdir(parents=True, exist_ok=True)
    make_corpus.main(["--output", str(root / "corpus.jsonl"), "--documents", "300"])
    preprocess(PreprocessConfig(input=str(root / "corpus.jsonl"), output_prefix=str(root / "corpus"),
                                tokenizer_type="ByteTokenizer", append_eod=True, workers=1))
    return str(root / "corpus_text_document")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--save-interval", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-from", type=int, default=50)
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--work-dir", type=Path, help="keep the jobs' files here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the summary (JSON) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work_dir or Path(tmp)
        data = byte_corpus(root / "corpus")
        summary = soak(root, data, args.iters, args.save_interval, args.kills, args.seed, args.rss_from,
                       args.rss_tolerance, args.timeout)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        from megatron_exact.atomic_io import write_text

        write_text(args.out, text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
