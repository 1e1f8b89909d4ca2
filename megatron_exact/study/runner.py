"""Plan and run a study: the data, one short-context stage per seed, one CPT run per arm and seed.

Layout of a study directory (``output`` in the study file)::

    data/                      synthetic corpus (or nothing: data.data_path) and length-bucketed copies
    runs/seed{s}/short/        short-context stage of seed s (absent with start_checkpoint)
    runs/seed{s}/{arm}/        CPT run of an arm: checkpoints/, metrics.jsonl, train.log, run.json, hf/, eval.json
    launch/                    emitted command lines / SLURM array scripts (launch.mode commands|slurm)
    report/                    report.md, report.json, plots

``run.json`` records a run's trainer flags and their digest before it starts.
A run is *done* when its digest matches and its checkpoint reached
``--train-iters``; a run with an older checkpoint of the same digest resumes
from it (the trainer's exact resume); a run recorded with other flags is
refused, naming what changed. So rerunning the study after an interruption
runs only what is missing, and no result is silently mixed with results of
other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_exact import atomic_io
from megatron_exact.checkpoint import find_checkpoint
from megatron_exact.errors import UserError
from megatron_exact.study.config import StudyConfig

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "tools" / "pretrain_exact.py"


class StudyRunError(UserError):
    """A run of the study failed or conflicts with what is on disk."""


def flag_list(flags: Dict[str, object]) -> List[str]:
    """``{"seq-length": 512, "bf16": True, "data-path": [..]}`` -> ``["--seq-length", "512", "--bf16", ...]``."""
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is True:
            continue
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        else:
            argv.append(str(value))
    return argv


@dataclass
class Run:
    name: str  # "seed1/short", "seed1/exact"
    seed: int
    arm: Optional[str]  # None for the short-context stage
    directory: str
    flags: List[str]  # trainer flags without --load/--finetune
    train_iters: int
    source: Optional[str] = None  # checkpoint directory the run continues from (--load --finetune)
    depends_on: Optional[str] = None  # the run that writes ``source``
    data_arm: bool = False
    source_digest: Optional[str] = None  # digest of that run: a changed short stage changes its dependents
    data_identity: Optional[str] = None  # what the data was built from: a rebuilt corpus changes every run

    @property
    def save(self) -> str:
        return os.path.join(self.directory, "checkpoints")

    @property
    def metrics(self) -> str:
        return os.path.join(self.directory, "metrics.jsonl")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, "train.log")

    @property
    def record(self) -> str:
        return os.path.join(self.directory, "run.json")

    def digest(self) -> str:
        identity = json.dumps({"flags": self.flags, "source": self.source, "source_digest": self.source_digest,
                               "data": self.data_identity}, sort_keys=True).encode()
        return hashlib.sha1(identity).hexdigest()

    def trained_iterations(self) -> Optional[int]:
        found = find_checkpoint(self.save)
        return None if found is None or not isinstance(found[1], int) else found[1]

    def launch_flags(self) -> List[str]:
        """The full trainer flags: resume from the run's own checkpoint if it has one, else start
        from ``source`` (weights only) or from scratch."""
        if self.trained_iterations() is not None:
            return [*self.flags, "--load", self.save]
        if self.source is not None:
            return [*self.flags, "--load", self.source, "--finetune"]
        return list(self.flags)


@dataclass
class StudyData:
    data_path: List[str]  # the corpus prefix
    blends: Dict[str, List[str]] = field(default_factory=dict)  # data arm -> --data-path blend
    vocab_size: Optional[int] = None
    tokenizer_dir: Optional[str] = None
    probe_spec: Optional[str] = None
    identity: Optional[str] = None  # the synthetic settings, or the corpus file's size and time


def prepare_data(config: StudyConfig, log: Callable[[str], None] = print) -> StudyData:
    """Build (or reuse) the synthetic corpus and the length-bucketed blends of the data arms."""
    from megatron_exact.data.length_buckets import blend_data_path, blend_weights, split_by_length

    data_dir = os.path.join(config.output, "data")
    if config.synthetic is not None:
        from megatron_exact.synthetic import build_corpus

        corpus = build_corpus(os.path.join(data_dir, "synthetic"), config.synthetic, config.synthetic_documents, log=log)
        data = StudyData([corpus.data_prefix], vocab_size=corpus.vocab_size, tokenizer_dir=corpus.tokenizer_dir,
                         probe_spec=corpus.probe_spec,
                         identity=f"synthetic:{config.synthetic.fingerprint()}:{config.synthetic_documents}")
    else:
        data = StudyData(list(config.data_path), identity=json.dumps(_file_stamp(config.data_path[0]), sort_keys=True))
    for arm in config.data_arms:
        prefix = os.path.join(data_dir, "length_buckets", arm.name, "corpus")
        manifest = prefix + "_length_buckets.json"
        source_stamp = _file_stamp(data.data_path[0])
        buckets = None
        if os.path.exists(manifest):
            with open(manifest) as f:
                recorded = json.load(f)
            if recorded.get("edges") == arm.length_edges and recorded.get("source_stamp") == source_stamp:
                from megatron_exact.data.length_buckets import LengthBucket

                buckets = [LengthBucket(**b) for b in recorded["buckets"]]
                log(f"data arm {arm.name}: reusing the length buckets in {os.path.dirname(prefix)}")
        if buckets is None:
            log(f"data arm {arm.name}: splitting {data.data_path[0]} by document length at {arm.length_edges[1:]}")
            os.makedirs(os.path.dirname(prefix), exist_ok=True)
            buckets = split_by_length(data.data_path[0], prefix, arm.length_edges, log=log)
            with open(manifest) as f:
                recorded = json.load(f)
            recorded["source_stamp"] = source_stamp
            atomic_io.write_json(manifest, recorded)
        ranges = [(low, arm.length_edges[i + 1] if i + 1 < len(arm.length_edges) else None)
                  for i, low in enumerate(arm.length_edges)]
        factors = dict(zip(ranges, arm.upsample))  # empty ranges have no dataset: their factor drops out
        weights = blend_weights(buckets, [factors[(b.low, b.high)] for b in buckets])
        data.blends[arm.name] = blend_data_path(buckets, weights)
        log(f"data arm {arm.name}: --data-path {' '.join(data.blends[arm.name])}")
    return data


def _file_stamp(prefix: str) -> dict:
    stat = os.stat(prefix + ".bin")
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def plan(config: StudyConfig, data: StudyData) -> List[Run]:
    """Every run of the study in an order that respects dependencies (a seed's short stage first)."""
    model = dict(config.model)
    if data.vocab_size is not None and "vocab-size" not in model:
        model["vocab-size"] = data.vocab_size
    runs = []
    for seed in config.seeds:
        seed_dir = os.path.join(config.output, "runs", f"seed{seed}")
        source, depends, source_digest = config.start_checkpoint, None, None
        if config.short_stage is not None:
            short_dir = os.path.join(seed_dir, "short")
            flags = {**model, **config.short_stage, "seed": seed, "data-path": data.data_path,
                     "save": os.path.join(short_dir, "checkpoints"), "metrics-file": os.path.join(short_dir, "metrics.jsonl")}
            short = Run(f"seed{seed}/short", seed, None, short_dir, flag_list(flags), int(config.short_stage["train-iters"]),
                        data_identity=data.identity)
            runs.append(short)
            source, depends, source_digest = short.save, short.name, short.digest()
        arms = [(name, loss, data.data_path, False) for name, loss in config.arms.items()]
        arms += [(arm.name, arm.loss, data.blends[arm.name], True) for arm in config.data_arms]
        for name, loss, data_path, is_data_arm in arms:
            run_dir = os.path.join(seed_dir, name)
            flags = {**model, **config.cpt, **loss, "seed": seed, "data-path": data_path,
                     "save": os.path.join(run_dir, "checkpoints"), "metrics-file": os.path.join(run_dir, "metrics.jsonl")}
            runs.append(Run(f"seed{seed}/{name}", seed, name, run_dir, flag_list(flags), int(config.cpt["train-iters"]),
                            source=source, depends_on=depends, data_arm=is_data_arm, source_digest=source_digest,
                            data_identity=data.identity))
    return runs


def changed_settings(run: Run) -> Optional[str]:
    """What differs between ``run`` and the run recorded in its directory (None: nothing, or no record)."""
    if not os.path.exists(run.record):
        return None
    with open(run.record) as f:
        recorded = json.load(f)
    if recorded.get("digest") == run.digest():
        return None
    changed = sorted({flag for flag, _ in set(_pairs(recorded.get("flags", []))) ^ set(_pairs(run.flags))})
    if recorded.get("data_identity") != run.data_identity:
        changed.append("the data")
    if recorded.get("source_digest") != run.source_digest or recorded.get("source") != run.source:
        changed.append(f"its starting checkpoint ({run.depends_on or run.source})")
    return ", ".join(changed) or "its record"


def run_state(run: Run, on_change: str = "refuse", log: Callable[[str], None] = print) -> str:
    """``done``, ``partial`` (a checkpoint of the same settings short of the end) or ``missing``.

    A run directory holding a run of other settings is refused (``on_change`` "refuse"), or
    removed so that the run is redone (``on_change`` "rebuild"), saying what changed.
    """
    changed = changed_settings(run)
    if changed is not None:
        if on_change != "rebuild":
            raise StudyRunError(
                f"{run.directory} holds run {run.name} made with other settings (differs in: {changed}); "
                "remove that directory to redo it, or give the study another output directory")
        log(f"{run.name}: settings changed ({changed}): redoing it")
        shutil.rmtree(run.directory)
    iterations = run.trained_iterations()
    if iterations is None:
        return "missing"
    if not os.path.exists(run.record):
        raise StudyRunError(f"{run.save} holds a checkpoint that this study did not record (no {run.record}); "
                            "remove it or give the study another output directory")
    return "done" if iterations >= run.train_iters else "partial"


def _pairs(flags: List[str]) -> List[tuple]:
    pairs, current = [], None
    for item in flags:
        if item.startswith("--"):
            current = item
            pairs.append((item, ""))
        elif current is not None:
            pairs[-1] = (current, pairs[-1][1] + " " + item)
    return pairs


def record_run(run: Run) -> None:
    os.makedirs(run.directory, exist_ok=True)
    atomic_io.write_json(run.record, {"name": run.name, "seed": run.seed, "arm": run.arm, "digest": run.digest(),
                                      "flags": run.flags, "source": run.source, "source_digest": run.source_digest,
                                      "data_identity": run.data_identity, "train_iters": run.train_iters,
                                      "data_arm": run.data_arm})


def torchrun_command(run: Run, config: StudyConfig, *, local: bool) -> List[str]:
    launch = config.launch
    if local:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch.nproc_per_node}"]
    else:
        head = ["torchrun", f"--nproc-per-node={launch.nproc_per_node}"]
    # Emitted scripts cd into the repository first, so they name the trainer relative to it.
    trainer = str(PRETRAIN) if local else str(PRETRAIN.relative_to(REPO))
    return [*head, *launch.torchrun_args, trainer, *run.launch_flags()]


def _launch_env(config: StudyConfig) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(config.launch.env)
    return env


def launch_local(run: Run, config: StudyConfig, log: Callable[[str], None] = print) -> float:
    """Train ``run`` with torchrun on this machine; its output goes to ``train.log``, its iteration and
    validation lines also to ``log``. Returns the wall time; raises StudyRunError on failure."""
    command = torchrun_command(run, config, local=True)
    start = time.time()
    tail: List[str] = []
    with open(run.log, "a", buffering=1) as log_file:  # line-buffered: `tail -f` shows progress
        log_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=_launch_env(config), cwd=str(REPO))
        try:
            for line in process.stdout:
                log_file.write(line)
                tail = (tail + [line.rstrip()])[-200:]
                if line.startswith(("iteration", "validation", "error", "warning", "loaded")):
                    log(f"  [{run.name}] {line.rstrip()}")
            status = process.wait()
        except BaseException:
            process.terminate()
            process.wait(timeout=60)
            raise
    if status != 0:
        # The trainer's own message (a refused flag, a bad input) says more than torchrun's traceback.
        reasons = [line for line in tail if "error:" in line and "ChildFailedError" not in line]
        raise StudyRunError(f"run {run.name} failed (exit status {status}): "
                            f"{reasons[0].strip() if reasons else 'see the log'}; full output in {run.log}")
    return time.time() - start


def write_launch_scripts(runs: List[Run], config: StudyConfig) -> Dict[str, str]:
    """``launch/commands.sh`` (every run in order) and, for SLURM, two array jobs (short stages, then the
    CPT runs depending on them) with ``launch/submit.sh`` to submit both."""
    directory = os.path.join(config.output, "launch")
    os.makedirs(directory, exist_ok=True)
    lines = ["#!/usr/bin/env bash", f"# study {config.name}: {len(runs)} run(s); each line is one torchrun job.",
             "set -euo pipefail", f"cd {shlex.quote(str(REPO))}"]
    for run in runs:
        after = f" (after {run.depends_on})" if run.depends_on else ""
        lines += [f"# {run.name}{after}", f"mkdir -p {shlex.quote(run.directory)}",
                  shlex.join(torchrun_command(run, config, local=False)) + f" 2>&1 | tee -a {shlex.quote(run.log)}"]
    paths = {"commands": os.path.join(directory, "commands.sh")}
    atomic_io.write_text(paths["commands"], "\n".join(lines) + "\n")
    os.chmod(paths["commands"], 0o755)
    if config.launch.mode == "slurm":
        options = {"nodes": 1, "ntasks-per-node": 1, "gpus-per-node": config.launch.nproc_per_node,
                   "time": "04:00:00", **config.launch.slurm}
        header = [f"#SBATCH --{k}={v}" for k, v in options.items()]
        for stage, members in (("short", [r for r in runs if r.arm is None]), ("cpt", [r for r in runs if r.arm])):
            if not members:
                continue
            body = ["#!/usr/bin/env bash", f"#SBATCH --job-name={config.name}-{stage}",
                    f"#SBATCH --array=0-{len(members) - 1}", f"#SBATCH --output={directory}/{stage}-%a.out", *header,
                    "set -euo pipefail", f"cd {shlex.quote(str(REPO))}", 'case "$SLURM_ARRAY_TASK_ID" in']
            for index, run in enumerate(members):
                body.append(f"  {index}) mkdir -p {shlex.quote(run.directory)}; "
                            f"{shlex.join(torchrun_command(run, config, local=False))} ;;  # {run.name}")
            body.append("esac")
            paths[stage] = os.path.join(directory, f"{stage}.sbatch")
            atomic_io.write_text(paths[stage], "\n".join(body) + "\n")
        submit = ["#!/usr/bin/env bash", "set -euo pipefail"]
        if "short" in paths:
            submit += [f"short=$(sbatch --parsable {shlex.quote(paths['short'])})",
                       f"sbatch --dependency=afterok:$short {shlex.quote(paths['cpt'])}"]
        else:
            submit.append(f"sbatch {shlex.quote(paths['cpt'])}")
        paths["submit"] = os.path.join(directory, "submit.sh")
        atomic_io.write_text(paths["submit"], "\n".join(submit) + "\n")
        os.chmod(paths["submit"], 0o755)
    return paths


def run_study(config: StudyConfig, *, mode: Optional[str] = None, data: Optional[StudyData] = None,
              log: Callable[[str], None] = print) -> List[Run]:
    """Prepare the data (unless given) and train every missing run (``mode`` local), or write the launch
    scripts (``commands``/``slurm``). Returns the plan."""
    mode = mode or config.launch.mode
    data = data or prepare_data(config, log=log)
    runs = plan(config, data)
    states = {run.name: run_state(run, config.on_change, log) for run in runs}
    todo = [r for r in runs if states[r.name] != "done"]
    log(f"study {config.name}: {len(runs)} run(s), {len(runs) - len(todo)} done, {len(todo)} to run "
        f"({', '.join(f'{r.name} ({states[r.name]})' for r in todo) or 'none'})")
    for run in todo:
        record_run(run)
    if mode != "local":
        paths = write_launch_scripts(todo, config)
        log(f"launch scripts: {', '.join(paths.values())}; rerun this command after the jobs finish to "
            "evaluate and report")
        return runs
    for number, run in enumerate(todo, 1):
        action = "resuming" if states[run.name] == "partial" else "training"
        log(f"[{number}/{len(todo)}] {run.name}: {action} ({run.train_iters} iterations; log {run.log})")
        seconds = launch_local(run, config, log=log)
        if run.trained_iterations() != run.train_iters:
            raise StudyRunError(f"run {run.name} exited without reaching iteration {run.train_iters} "
                                f"(checkpoint at {run.trained_iterations()}); see {run.log}")
        log(f"[{number}/{len(todo)}] {run.name}: done in {seconds:.0f} s")
    return runs
