"""Shared fixtures for trainer tests: a small byte-level corpus and a torchrun launcher."""

from __future__ import annotations

import json
import subprocess
import sys

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


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_lines(path) -> list[dict]:
    return [r for r in read_metrics(path) if r.get("split") is None]


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
    import importlib.util

    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "examples" / "tiny_cpu" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    root = tmp_path_factory.mktemp("byte_corpus")
    jsonl = root / "corpus.jsonl"
    make_corpus.main(["--output", str(jsonl), "--documents", "300"])
    preprocess(PreprocessConfig(input=str(jsonl), output_prefix=str(root / "corpus"), tokenizer_type="ByteTokenizer",
                                append_eod=True, workers=1))
    return str(root / "corpus_text_document")
