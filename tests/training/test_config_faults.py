"""Trainer settings that would silently turn EXACT off, or train on data made by another tokenizer,
are refused at start-up by flag (before any model is built)."""

from __future__ import annotations

import os
import re

import pytest

from megatron_exact.data.preprocess import PreprocessConfig, preprocess
from megatron_exact.loss import ExactConfig, ExactLoss
from megatron_exact.training.arguments import ConfigError, parse_args, validate_args
from tests.data.test_tokenizer_identity import _word_level_tokenizer


def _flags(data_prefix, *extra):
    return ["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", "128", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", data_prefix, *extra]


def _validate(argv):
    return validate_args(parse_args(argv), 1)


@pytest.mark.parametrize("tau", ["64", "65", "127", "128", "4096"])
def test_exact_tau_without_a_tail_bucket_is_refused(byte_corpus, tau):
    # --seq-length 128: buckets [0,8) [8,16) [16,32) [32,64) [64,128); a tail exists for tau <= 64.
    extra = ("--loss-weighting", "exact", "--exact-tau", tau)
    if int(tau) <= 64:
        _validate(_flags(byte_corpus, *extra))
        return
    with pytest.raises(ConfigError, match=rf"--exact-tau {tau} leaves EXACT no tail at --seq-length 128: the last "
                                          r"effective-context bucket starts at 64.*choose --exact-tau <= 64"):
        _validate(_flags(byte_corpus, *extra))


def test_exact_tau_check_holds_for_the_library_too():
    """Everything that weights by EXACT goes through the same check (not only the trainer's flags)."""
    ExactLoss(ExactConfig(weighting="exact", tau=2048), 4096)
    with pytest.raises(ValueError, match="--exact-tau 2049 leaves EXACT no tail at --seq-length 4096"):
        ExactLoss(ExactConfig(weighting="exact", tau=2049), 4096)
    ExactLoss(ExactConfig(weighting="uniform", tau=2049), 4096)  # uniform weighting does not use tau


@pytest.mark.parametrize("flag", ["--exact-alpha", "--exact-gamma", "--exact-eps"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_exact_setting_is_refused_by_its_flag(byte_corpus, flag, value):
    with pytest.raises(ConfigError, match=rf"{flag} must be a finite number"):
        _validate(_flags(byte_corpus, "--loss-weighting", "exact", f"{flag}={value}"))


def test_data_of_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    words = ["the", "quick", "brown", "fox"]
    made_with = _word_level_tokenizer(tmp_path / "a", words)
    other = _word_level_tokenizer(tmp_path / "b", ["quick", "the", *words[2:]])  # same size, same EOD
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the quick brown fox"}\n' * 50)
    preprocess(PreprocessConfig(input=str(corpus), output_prefix=str(tmp_path / "d"),
                                tokenizer_type="HuggingFaceTokenizer", tokenizer_model=made_with), log=lambda m: None)
    prefix = str(tmp_path / "d_text_document")
    _validate(_flags(prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", made_with))
    with pytest.raises(ConfigError) as err:
        _validate(_flags(prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", other))
    message = str(err.value)
    assert f"--tokenizer-model {other} does not match the tokenizer that made {prefix}" in message
    assert made_with in message and "different tokenizer" in message


def _copy_data(prefix, tmp_path):
    import shutil

    for suffix in (".bin", ".idx", ".tokenizer_info.json"):
        shutil.copy(prefix + suffix, str(tmp_path / "d_text_document") + suffix)
    return str(tmp_path / "d_text_document")


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.truncate(p + ".bin", 1000), r"\.bin: truncated \(1000 bytes, but .*\.idx describes"),
    (lambda p: os.truncate(p + ".idx", 0), r"\.idx: empty \(0 bytes"),
], ids=["bin-shorter-than-idx", "empty-idx"])
def test_damaged_data_path_is_named_at_start_up(byte_corpus, tmp_path, capsys, damage, message):
    from megatron_exact.train import main as pretrain_main

    prefix = _copy_data(byte_corpus, tmp_path)
    damage(prefix)
    assert pretrain_main(_flags(prefix)) == 2
    err = capsys.readouterr().err
    assert re.search(r"pretrain_exact.py: error: --data-path: " + re.escape(prefix) + message, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("split", ["90,x", "-1,2,3", "0,0"])
def test_unparsable_split_is_refused_by_the_trainer(byte_corpus, split):
    with pytest.raises(ConfigError, match=rf"--split {re.escape(repr(split))}: expected up to three non-negative"):
        _validate(_flags(byte_corpus, f"--split={split}"))
