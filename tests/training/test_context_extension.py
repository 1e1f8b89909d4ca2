"""Context extension survives training and export: RoPE flags are part of the model the checkpoint
records, a resume must keep them, ``--finetune`` may change them (and says so).

Two continued-pretraining runs (one rank, in this process) start from a tiny HF Qwen2 whose
``max_position_embeddings`` is 64 and train at ``--seq-length 128``: one at ``--rotary-base`` 4x the
model's, one with ``--rotary-seq-len-interpolation-factor 2``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def exports(extended_runs, tmp_path_factory) -> dict:
    """Each run exported with ``--verify`` at 1e-4 (both references, fp32)."""
    from megatron_exact.convert.exporter import export_hf

    root = tmp_path_factory.mktemp("exports")
    return {name: export_hf(run.save, root / name, verify=True, verify_tolerance=1e-4)
            for name, run in extended_runs.items()}


def _hf_model(directory, **config_changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True, **config_changes)
    return AutoModelForCausalLM.from_pretrained(str(directory), config=config, dtype=torch.float32,
                                                local_files_only=True).eval()


@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_exported_model_computes_what_was_trained_past_the_original_length(name, extended_runs, exports):
    """transformers' logits of the export (its config.json alone) equal the probe logits the trainer saved,
    at positions past the original max_position_embeddings; with the original RoPE they clearly do not."""
    from megatron_exact.checkpoint import find_checkpoint
    from megatron_exact.checkpoint.probe import read_probe
    from megatron_exact.convert.verify import hf_logits

    config = json.loads((exports[name] / "config.json").read_text())
    assert config["max_position_embeddings"] == SEQ
    if name == "rotary_base":
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 4 * BASE_THETA
        assert config["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in config
    else:
        assert config["rope_theta"] == BASE_THETA
        assert config["rope_parameters"] == config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": BASE_THETA}

    probe = read_probe(find_checkpoint(extended_runs[name].save)[0])
    assert [len(doc) for doc in probe.documents] == [SEQ - 16, 16] and probe.computed_in == "float32"
    assert int(probe.positions.max()) > ORIGINAL_MAX_POSITIONS
    far = probe.positions >= ORIGINAL_MAX_POSITIONS
    assert int(far.sum()) >= 10
    exported = hf_logits(_hf_model(exports[name]), probe.documents)[probe.positions]
    assert (exported - probe.logits).abs().max().item() <= 1e-4
    original_rope = {"rope_parameters": {"rope_type": "default", "rope_theta": BASE_THETA}}
    stale = hf_logits(_hf_model(exports[name], **original_rope), probe.documents)[probe.positions]
    assert (stale - probe.logits)[far].abs().max().item() > 100 * 1e-4


def _edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_verify_fails_when_rope_theta_is_edited(exports, extended_runs, tmp_path, capsys):
    from tools.convert_checkpoint import main

    edited = tmp_path / "edited"
    shutil.copytree(exports["rotary_base"], edited)

    def old_theta(config):
        config["rope_theta"] = config["rope_parameters"]["rope_theta"] = BASE_THETA

    _edit_config(edited, old_theta)
    load = str(extended_runs["rotary_base"].save)
    assert main(["verify-hf", "--load", load, "--hf-dir", str(exports["rotary_base"])]) == 0
    assert main(["verify-hf", "--load", load, "--hf-dir", str(edited)]) == 1
    assert "disagree: max abs logit difference" in capsys.readouterr().err


def test_verify_does_not_trust_the_architecture_record(extended_runs, tmp_path, capsys):
    """A checkpoint whose record lost the RoPE change (as before it was recorded) exports the old rope_theta;
    the rebuilt checkpoint agrees with that export, the trained model's probe does not."""
    from megatron_exact.checkpoint import find_checkpoint
    from tests.convert.test_rope_export import rewrite_arch_record
    from tools.convert_checkpoint import main

    stale = tmp_path / "stale"
    shutil.copytree(extended_runs["rotary_base"].save, stale)
    rewrite_arch_record(find_checkpoint(stale)[0], rotary_base=BASE_THETA)
    out = tmp_path / "hf"
    assert main(["export-hf", "--load", str(stale), "--hf-dir-out", str(out), "--verify",
                 "--verify-tolerance", "1e-4"]) == 1
    captured = capsys.readouterr()
    assert "max |logit difference| Megatron vs HF" in captured.out  # the record-based check passed...
    assert "does not compute what the trained model computed" in captured.err  # ...the probe did not
    assert json.loads((out / "config.json").read_text())["rope_theta"] == BASE_THETA
