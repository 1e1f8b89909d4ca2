"""Context extension survives training and export: RoPE flags are part of the model the checkpoint
records, a resume must keep them, ``--finetune`` may change them (and says so).

Two continued-pretraining runs (one rank, in this process) start from a tiny HF Qwen2 whose
``max_position_embeddings`` is 64 and train at ``--seq-length 128``: one at ``--rotary-base`` 4x the
model's, one with ``--rotary-seq-len-interpolation-factor 2``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_exact.training.arguments import ConfigError, parse_args, validate_args
from tests.training.conftest import byte_corpus  # noqa: F401

pytestmark = pytest.mark.slow  # trainings

SEQ = 128
ORIGINAL_MAX_POSITIONS = 64
BASE_THETA = 10000.0
EXTENSIONS = {
    "rotary_base": ["--rotary-base", str(4 * BASE_THETA)],
    "interpolation": ["--rotary-seq-len-interpolation-factor", "2"],
}


@dataclass(frozen=True)
class ShortContextModel:
    directory: Path  # the HF model (--hf-config)
    checkpoint: Path  # its import (--load ... --finetune)


@dataclass(frozen=True)
class ExtendedRun:
    argv: list  # the training command's flags
    save: Path
    log: str  # what the run printed


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory) -> ShortContextModel:
    from transformers import Qwen2Config

    from megatron_exact.convert.importer import import_hf
    from tests.convert.tiny_hf_models import build_hf_model

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=ORIGINAL_MAX_POSITIONS, rope_theta=BASE_THETA,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    root = tmp_path_factory.mktemp("short_context")
    build_hf_model(config, seed=3).save_pretrained(str(root / "hf"))
    return ShortContextModel(root / "hf", import_hf(root / "hf", root / "ckpt").parent)


def cpt_flags(model: ShortContextModel, corpus: str, *extra: str) -> list:
    return ["--hf-config", str(model.directory), "--seq-length", str(SEQ), "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--data-path", corpus,
            "--split", "90,10,0", "--eval-iters", "0", "--log-interval", "1", "--loss-weighting", "exact", *extra]


@pytest.fixture(scope="module")
def extended_runs(byte_corpus, short_context_model, in_process_trainers, tmp_path_factory) -> dict:  # noqa: F811
    runs = {}
    for name, extension in EXTENSIONS.items():
        save = tmp_path_factory.mktemp(name) / "ckpt"
        argv = cpt_flags(short_context_model, byte_corpus, *extension)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            trainer = in_process_trainers(argv + ["--load", str(short_context_model.checkpoint), "--finetune",
                                                  "--save", str(save)])
            trainer.train()
            trainer.close()
        runs[name] = ExtendedRun(argv, save, log.getvalue())
    return runs


def test_finetune_changes_rope_and_says_what_changed(extended_runs):
    from megatron_exact.checkpoint import find_checkpoint, read_model_record

    theta = extended_runs["rotary_base"]
    assert f"--rotary-base: {BASE_THETA} -> {4 * BASE_THETA}" in theta.log
    assert f"--max-position-embeddings/--seq-length: {ORIGINAL_MAX_POSITIONS} -> {SEQ}" in theta.log
    assert "--rotary-seq-len-interpolation-factor: off -> 2.0" in extended_runs["interpolation"].log
    records = {name: read_model_record(find_checkpoint(run.save)[0])["model_arch"] for name, run in extended_runs.items()}
    assert records["rotary_base"]["rotary_base"] == 4 * BASE_THETA
    assert records["rotary_base"]["rotary_seq_len_interpolation_factor"] is None
    assert records["interpolation"]["rotary_base"] == BASE_THETA
    assert records["interpolation"]["rotary_seq_len_interpolation_factor"] == 2.0
    assert {record["max_position_embeddings"] for record in records.values()} == {SEQ}


def test_resume_with_other_rope_flags_is_refused(extended_runs):
    theta, interpolation = extended_runs["rotary_base"], extended_runs["interpolation"]
    resume = ["--load", str(theta.save)]
    validate_args(parse_args(theta.argv + resume), world_size=1)  # the same flags resume
    other_base = [a if a != str(4 * BASE_THETA) else "20000" for a in theta.argv]
    with pytest.raises(ConfigError, match=r"--rotary-base differs from the checkpoint's \(40000.0 in the checkpoint, "
                                          r"20000.0 in this run\).*--finetune"):
        validate_args(parse_args(other_base + resume), world_size=1)
    without_factor = interpolation.argv[: -len(EXTENSIONS["interpolation"])]
    with pytest.raises(ConfigError, match=r"--rotary-seq-len-interpolation-factor differs from the checkpoint's "
                                          r"\(2.0 in the checkpoint, off in this run\)"):
        validate_args(parse_args(without_factor + ["--load", str(interpolation.save)]), world_size=1)
    # Starting a new run from those weights may change them.
    validate_args(parse_args(other_base + resume + ["--finetune"]), world_size=1)
