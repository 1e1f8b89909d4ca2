"""Shared fixtures for trainer tests: byte-level corpora (one, and a weighted blend of two), a tiny
HF model imported as a checkpoint, the torchrun launcher, and the trainer built in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch import REPO, run, run_env  # noqa: F401  (run_env: re-exported for the trainer tests)
from tests.launch import torchrun_command as _torchrun_command

PYTHON = sys.executable
PRETRAIN = REPO / "tools" / "pretrain_exact.py"


def torchrun_command(flags: list[str], nproc: int = 2, torchrun_flags: tuple = (), rendezvous: bool = False) -> list[str]:
    """torchrun of the trainer with ``flags``."""
    return _torchrun_command(PRETRAIN, *flags, nproc=nproc, torchrun_flags=torchrun_flags, rendezvous=rendezvous)


def launch(flags: list[str], nproc: int = 2, timeout: float = 240, torchrun_flags: tuple = ()) -> subprocess.CompletedProcess:
    return run(torchrun_command(flags, nproc, torchrun_flags), timeout)


STANDIN_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own options, exec the command (one task on this node).
while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""
STANDIN_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: this host for `show hostnames`, a record of anything else.
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; exit 0; fi
echo "$@" >> "$SCONTROL_LOG"
"""


def slurm_standins(root) -> str:
    """A folder of stand-ins for ``srun`` and ``scontrol`` (put it first on PATH) under ``root``."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STANDIN_SRUN), ("scontrol", STANDIN_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def slurm_env(root, **variables: str) -> dict:
    """The environment of a SLURM job step on this machine: the stand-ins and this Python's
    torchrun first on PATH, the repository as REPO, and ``variables`` (SLURM_JOB_ID, ...)."""
    path = slurm_standins(root) + os.pathsep + os.path.dirname(PYTHON) + os.pathsep + os.environ["PATH"]
    return dict(run_env(), PATH=path, SCONTROL_LOG=str(root / "scontrol.log"), REPO=str(REPO), **variables)


# The SLURM example's job step (examples/cpt/slurm_step.sh) as the batch script runs it.
SLURM_STEP = 'set -euo pipefail; source "$REPO/examples/cpt/slurm_step.sh"; train_step "$@"'


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_lines(path) -> list[dict]:
    return [r for r in read_metrics(path) if r.get("split") is None]


def last_iteration(path) -> int:
    """The last iteration a (possibly half-written) metrics file records; 0 when there is none."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return 0
    iterations = []
    for line in lines:
        try:
            iterations.append(json.loads(line)["iteration"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(iterations, default=0)


def torchrun_workers(agent: subprocess.Popen) -> list:
    """The live training processes (psutil) torchrun started (the agent's direct children), by rank."""
    import psutil

    workers = []
    for process in psutil.Process(agent.pid).children():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and "pretrain_exact.py" in " ".join(process.cmdline()):
                workers.append((int(process.environ().get("RANK", -1)), process))
        except psutil.Error:  # exited meanwhile
            pass
    return [process for _, process in sorted(workers, key=lambda item: item[0])]


def wait_for(condition, agent: subprocess.Popen, timeout: float = 300, what: str = "", poll: float = 0.2) -> None:
    """Wait until ``condition()`` holds; fail if the job ends first or ``timeout`` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if agent.poll() is not None:
            raise AssertionError(f"job ended (status {agent.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def tiny_flags(data_prefix: str, *extra: str) -> list[str]:
    """A tiny qwen2 model on the byte corpus: 8 sequences of 128 tokens per step."""
    return [
        "--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", "128",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1",
        "--data-path", data_prefix, "--split", "90,10,0", "--log-interval", "1", "--eval-iters", "1",
        "--loss-weighting", "exact", *extra,
    ]


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory) -> str:
    """A synthetic corpus (Pareto document lengths) preprocessed with ByteTokenizer; returns the prefix."""
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    make_corpus = _make_corpus_module()
    root = tmp_path_factory.mktemp("byte_corpus")
    jsonl = root / "corpus.jsonl"
    make_corpus.main(["--output", str(jsonl), "--documents", "300"])
    preprocess(PreprocessConfig(input=str(jsonl), output_prefix=str(root / "corpus"), tokenizer_type="ByteTokenizer",
                                append_eod=True, workers=1))
    return str(root / "corpus_text_document")


def _make_corpus_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "examples" / "tiny_cpu" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    return make_corpus


@dataclass(frozen=True)
class Blend:
    """Two corpora whose tokens tell them apart: ``large`` (the byte corpus: lower-case text) and
    ``small`` (upper-case text, about a seventh of the tokens), blended ``0.3 large 0.7 small``."""

    large: str
    small: str
    weights: tuple = (0.3, 0.7)

    @property
    def data_path(self) -> list[str]:
        return [str(self.weights[0]), self.large, str(self.weights[1]), self.small]


@pytest.fixture(scope="session")
def blend(byte_corpus, tmp_path_factory) -> Blend:
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("upper_corpus")
    lower, upper = root / "lower.jsonl", root / "upper.jsonl"
    _make_corpus_module().main(["--output", str(lower), "--documents", "60", "--seed", "1"])
    with open(lower) as source, open(upper, "w") as out:
        for line in source:
            out.write(json.dumps({"text": json.loads(line)["text"].upper()}) + "\n")
    preprocess(PreprocessConfig(input=str(upper), output_prefix=str(root / "upper"), tokenizer_type="ByteTokenizer",
                                append_eod=True, workers=1))
    return Blend(large=byte_corpus, small=str(root / "upper_text_document"))


@dataclass(frozen=True)
class TinyHF:
    directory: Path  # the saved HF model (--hf-config)
    checkpoint: Path  # its import (--load ... --finetune)
    model: object  # the transformers model itself (fp32, eval mode)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> TinyHF:
    """A random tiny Qwen2 (GQA, QKV bias, tied embeddings) whose 512-token vocabulary needs no
    padding at TP=1 or 2, so Megatron's softmax sees transformers' logits; imported at TP=1."""
    from transformers import Qwen2Config

    from megatron_exact.convert.importer import import_hf
    from tests.convert.tiny_hf_models import build_hf_model

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = build_hf_model(config, seed=5)
    root = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(str(root / "hf"))
    return TinyHF(root / "hf", import_hf(root / "hf", root / "ckpt").parent, model)


def transformers_batch(model, samples) -> list[tuple[list[int], list[float], list[float]]]:
    """``(positions, supervised, token_losses)`` of every sample, the losses from the transformers model
    itself (one forward per document, so nothing crosses a document boundary) and the positions inside
    the documents from the sample's document starts (``tests/exact_reference.py``)."""
    import torch
    import torch.nn.functional as F

    from tests.exact_reference import document_positions

    batch = []
    with torch.no_grad():
        for sample in samples:
            tokens, labels = torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"])
            bounds = torch.as_tensor(sample["cu_seqlens"]).tolist()
            losses = torch.zeros(len(tokens), dtype=torch.float64)
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end > start:
                    logits = model(tokens[start:end].unsqueeze(0)).logits[0].double()
                    losses[start:end] = F.cross_entropy(logits, labels[start:end], reduction="none")
            batch.append((document_positions(bounds, len(tokens)), torch.as_tensor(sample["loss_mask"]).tolist(),
                          losses.tolist()))
    return batch


def build_trainer(argv: list[str]):
    """The trainer of ``argv`` built in this process (one rank), as ``tools/pretrain_exact.py`` builds it."""
    from megatron_exact.training.arguments import parse_args, validate_args
    from megatron_exact.training.trainer import Trainer

    args = parse_args(argv)
    arch, layout, tokenizer = validate_args(args, world_size=1)
    return Trainer(args, arch, layout, tokenizer)


@pytest.fixture(scope="module")
def in_process_trainers():
    """Trainers built by the test run in this process; the process group is gone afterwards."""
    yield build_trainer
    from megatron_exact.platform.distributed import destroy_model_parallel

    destroy_model_parallel()
