"""Configuration errors are caught before any model is built, with a message naming the flag."""

from __future__ import annotations

import subprocess
import warnings

import pytest

from megatron_exact.training.arguments import ConfigError, ConfigWarning, parse_args, validate_args
from tests.training.conftest import PRETRAIN, PYTHON, REPO, run_env

HF_TOKENIZER = REPO / "tests" / "data" / "fixtures" / "hf_tokenizer"


def flags(data_prefix, *extra):
    return ["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", "128", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", data_prefix, *extra]


def validate(argv, world_size=1):
    return validate_args(parse_args(argv), world_size)


def test_valid_configuration_derives_layout(byte_corpus):
    arch, layout, tokenizer = validate(flags(byte_corpus, "--tensor-model-parallel-size", "2",
                                             "--micro-batch-size", "2", "--global-batch-size", "8"), world_size=4)
    assert (layout.data_parallel_size, layout.num_microbatches) == (2, 2)
    assert tokenizer["tokenizer_type"] == "ByteTokenizer" and tokenizer["vocab_size"] == 258
    assert arch.vocab_size == 512 and arch.num_layers == 2


def test_world_size_not_divisible_by_parallel_sizes(byte_corpus):
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by --tensor-model-parallel-size \(2\)"):
        validate(flags(byte_corpus, "--tensor-model-parallel-size", "2"), world_size=3)


def test_global_batch_not_divisible(byte_corpus):
    with pytest.raises(ConfigError, match=r"--global-batch-size 6 is not divisible by --micro-batch-size \(4\)"):
        validate(flags(byte_corpus, "--micro-batch-size", "4", "--global-batch-size", "6"), world_size=1)


def test_attention_heads_not_divisible_by_tp(byte_corpus):
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size 4 does not divide the model's 6 attention heads"):
        validate(flags(byte_corpus, "--tensor-model-parallel-size", "4", "--num-attention-heads", "6",
                       "--num-query-groups", "2"), world_size=4)


def test_kv_groups_not_divisible_by_tp(byte_corpus):
    # tiny-qwen2: 4 heads, 2 key/value groups.
    with pytest.raises(ConfigError, match=r"does not divide the model's 2 key/value groups \(--num-query-groups, "
                                          r"HF num_key_value_heads\)"):
        validate(flags(byte_corpus, "--tensor-model-parallel-size", "4"), world_size=4)


def test_ffn_width_not_divisible_by_tp(byte_corpus):
    # Megatron-Core's column-parallel FFN splits its width evenly (the converter's rule too).
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size 2 does not divide the model's 97 FFN width"):
        validate(flags(byte_corpus, "--tensor-model-parallel-size", "2", "--ffn-hidden-size", "97"), world_size=2)


def test_layers_not_divisible_by_pp(byte_corpus):
    with pytest.raises(ConfigError, match=r"--pipeline-model-parallel-size 4 does not divide the model's 2 layers"):
        validate(flags(byte_corpus, "--pipeline-model-parallel-size", "4"), world_size=4)


def test_seq_length_beyond_model_limit_warns_unless_context_is_extended(byte_corpus):
    long = [a if a != "128" else "8192" for a in flags(byte_corpus)]
    with pytest.warns(ConfigWarning, match=r"--seq-length 8192 exceeds the model's max_position_embeddings 4096"):
        validate(long)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        validate(long + ["--rope-scaling-factor", "4"])
        validate(long + ["--rotary-seq-len-interpolation-factor", "2"])


def test_data_vocabulary_larger_than_model_vocabulary(byte_corpus):
    # ByteTokenizer ids reach 257; tiny-qwen2's own vocabulary has 256 entries.
    argv = [a for a in flags(byte_corpus) if a not in ("--vocab-size", "512")]
    with pytest.raises(ConfigError, match=r"--data-path: the data's tokenizer has 258 tokens but the model .* only 256"):
        validate(argv)


def test_missing_data_files(tmp_path):
    missing = str(tmp_path / "nothing_text_document")
    with pytest.raises(ConfigError, match=rf"--data-path: {missing}.bin does not exist"):
        validate(flags(missing))


def test_tokenizer_flag_disagreeing_with_data_sidecar(byte_corpus):
    with pytest.raises(ConfigError, match=r"--tokenizer-type HuggingFaceTokenizer .* does not match the tokenizer that made"):
        validate(flags(byte_corpus, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(HF_TOKENIZER)))


def test_dropout_outside_its_range(byte_corpus):
    with pytest.raises(ConfigError, match=r"--attention-dropout must be in \[0, 1\), got 1.0"):
        validate(flags(byte_corpus, "--attention-dropout", "1"))
    args = parse_args(flags(byte_corpus))
    assert (args.hidden_dropout, args.attention_dropout) == (0.0, 0.0)  # off unless asked for


def test_save_interval_without_save(byte_corpus):
    with pytest.raises(ConfigError, match=r"--save-interval needs --save"):
        validate(flags(byte_corpus, "--save-interval", "2"))


def test_command_line_reports_error_and_exits_before_building(byte_corpus):
    """Without torchrun (world size 1): the process stops at validation with status 2."""
    result = subprocess.run([PYTHON, PRETRAIN, *flags(byte_corpus, "--context-parallel-size", "2")], cwd=REPO,
                            env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: world size 1 is not divisible by" in result.stderr
    assert "--context-parallel-size (2)" in result.stderr


def _mistral_config_dir(tmp_path, **changes):
    """A tiny Mistral config.json written by transformers itself (vocabulary 512 fits the byte corpus)."""
    from transformers import AutoConfig

    from megatron_exact.model.families import MISTRAL

    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    AutoConfig.for_model(MISTRAL.model_type, **{**fields, **changes}).save_pretrained(str(tmp_path))
    return str(tmp_path)


def test_sliding_window_shorter_than_the_sequence_is_refused(byte_corpus, tmp_path):
    argv = [a for a in flags(byte_corpus) if a not in ("--model", "tiny-qwen2")]
    hf_dir = _mistral_config_dir(tmp_path, sliding_window=64)
    with pytest.raises(ConfigError, match=r"--hf-config .*: sliding-window attention \(sliding_window: a 64-token "
                                          r"window\) is not supported: .* --seq-length is 128"):
        validate(["--hf-config", hf_dir, *argv])


def test_sliding_window_covering_the_sequence_trains_as_full_attention_with_a_note(byte_corpus, tmp_path):
    argv = [a for a in flags(byte_corpus) if a not in ("--model", "tiny-qwen2")]
    with pytest.warns(ConfigWarning, match=r"128-token sliding window \(sliding_window\) covers --seq-length 128: "
                                           r"training with full attention"):
        arch, _, _ = validate(["--hf-config", _mistral_config_dir(tmp_path / "w128", sliding_window=128), *argv])
    assert arch.sliding_window == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # v0.3-style: no window, no note
        arch, _, _ = validate(["--hf-config", _mistral_config_dir(tmp_path / "none", sliding_window=None), *argv])
    assert arch.sliding_window is None


def test_overlap_param_gather_needs_the_distributed_optimizer_and_overlap_grad_reduce(byte_corpus):
    # Megatron-LM's refusals, by flag.
    with pytest.raises(ConfigError, match=r"--overlap-param-gather only supported with distributed optimizer"):
        validate(flags(byte_corpus, "--overlap-grad-reduce", "--overlap-param-gather"))
    with pytest.raises(ConfigError, match=r"Must use --overlap-param-gather with --overlap-grad-reduce"):
        validate(flags(byte_corpus, "--use-distributed-optimizer", "--overlap-param-gather"))
    validate(flags(byte_corpus, "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"))
    with pytest.warns(ConfigWarning, match=r"--ddp-bucket-size has no effect without --overlap-grad-reduce"):
        validate(flags(byte_corpus, "--ddp-bucket-size", "1000"))


def test_most_recent_k_and_async_save_refusals(byte_corpus, tmp_path):
    save = ("--save", str(tmp_path / "ckpt"))
    for bad in ("0", "-2"):
        with pytest.raises(ConfigError, match=rf"--most-recent-k must be a positive number.*got {bad}"):
            validate(flags(byte_corpus, *save, "--most-recent-k", bad))
    with pytest.raises(ConfigError, match=r"--most-recent-k has no effect without --save"):
        validate(flags(byte_corpus, "--most-recent-k", "2"))
    validate(flags(byte_corpus, *save, "--most-recent-k", "2"))
    # Megatron-Core's async writer needs CUDA (it synchronises and all-reduces there): refused, not ignored.
    with pytest.raises(ConfigError, match=r"--async-save is not supported by this trainer.*CUDA.*Drop --async-save"):
        validate(flags(byte_corpus, *save, "--async-save"))
