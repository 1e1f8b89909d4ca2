"""Effective-context statistics: hand-computed counts, and equality with per-sample counting."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_exact import exact
from megatron_exact.data.dataset import build_train_valid_test_datasets
from megatron_exact.data.stats import effective_context_stats
from megatron_exact.data.tokenizers import build_tokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _write(prefix, lengths):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d, length in enumerate(lengths):
        builder.add_document(1000 * (d + 1) + np.arange(length), [int(length)])
    builder.finalize(prefix + ".idx")


def _stats(prefix, seq_length, masking=True, tmp=None):
    train, _, _ = build_train_valid_test_datasets(
        [prefix], "100,0,0", seq_length, 1234, (None, 0, 0), document_masking=masking,
        tokenizer=build_tokenizer("ByteTokenizer"),
    )
    return effective_context_stats(train), train


def test_hand_computed_counts_four_documents_of_ten(tmp_path):
    # Equal lengths make the cut points independent of Megatron's document shuffle.
    # Stream of 40 tokens, S = 16: (40 - 1) // 16 = 2 samples, windows [0, 17) and [16, 33).
    # Sample 0: pieces of 10 and 7 tokens -> contexts 0..8 and 0..5.
    # Sample 1: pieces of 4, 10, 3 -> contexts 0..2, 0..8, 0..1.
    # Buckets for S = 16: [0, 8) and [8, 16).
    _write(str(tmp_path / "d"), [10, 10, 10, 10])
    stats, _ = _stats(str(tmp_path / "d"), 16)
    assert stats.num_samples == 2
    assert stats.counts == [8 + 6 + 3 + 8 + 2, 1 + 1]
    assert stats.supervised_tokens == 29  # 32 targets minus 3 cross-document ones
    assert stats.below_quarter == 4 + 4 + 3 + 4 + 2  # contexts < 16 / 4
    # One non-empty tail bucket: q = 1, so w = 1 + alpha.
    assert stats.exact_weights == pytest.approx([1.0, 1.15])

    off, _ = _stats(str(tmp_path / "d"), 16, masking=False)
    assert off.counts == [16, 16] and off.below_quarter == 8


def test_hand_computed_counts_three_buckets(tmp_path):
    # Stream of 60 tokens, S = 32: one sample [0, 33) = pieces of 20 and 13 tokens,
    # contexts 0..18 and 0..11. Buckets [0, 8), [8, 16), [16, 32).
    _write(str(tmp_path / "d"), [20, 20, 20])
    stats, _ = _stats(str(tmp_path / "d"), 32)
    assert stats.counts == [8 + 8, 8 + 4, 3]
    # Tail (lower edge >= 8): q = (12/15, 3/15), r = q^-1/2, w = 1 + 0.15 r / sum(q r).
    q = np.array([12, 3]) / 15
    r = (q + 1e-6) ** -0.5
    assert stats.exact_weights == pytest.approx([1.0, *(1 + 0.15 * r / (q * r).sum())], rel=1e-6)
    assert stats.share_below_quarter == pytest.approx((8 + 8) / 31)


@pytest.mark.parametrize("masking", [True, False])
def test_equals_counting_every_sample(tmp_path, masking):
    rng = np.random.default_rng(3)
    _write(str(tmp_path / "a"), rng.integers(1, 300, size=120))
    _write(str(tmp_path / "b"), rng.integers(1, 30, size=200))
    tokenizer = build_tokenizer("ByteTokenizer")
    train, _, _ = build_train_valid_test_datasets(
        ["0.6", str(tmp_path / "a"), "0.4", str(tmp_path / "b")], "100,0,0", 64, 7, (300, 0, 0),
        document_masking=masking, tokenizer=tokenizer,
    )
    stats = effective_context_stats(train)
    n = exact.num_buckets(64)
    expected = torch.zeros(n, dtype=torch.long)
    for i in range(len(train)):
        sample = train[i]
        expected += exact.bucket_counts(sample["position_ids"], sample["loss_mask"], n)
    assert stats.counts == expected.tolist()


def test_cli_writes_table_json_and_png(tmp_path):
    _write(str(tmp_path / "d"), [20, 20, 20])
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "effective_context_stats.py"), "--data-path", str(tmp_path / "d"),
         "--seq-length", "32", "--tokenizer-type", "ByteTokenizer", "--json", str(tmp_path / "s.json"),
         "--plot", str(tmp_path / "s.png")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[16, 32)*" in proc.stdout
    record = json.loads((tmp_path / "s.json").read_text())
    assert [b["count"] for b in record["buckets"]] == [16, 12, 3]
    assert record["buckets"][-1]["cumulative_share"] == pytest.approx(1.0)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def _stats_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("effective_context_stats", os.path.join(REPO, "tools",
                                                                                          "effective_context_stats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stats_tool_takes_the_trainers_data_and_exact_flags_and_defaults(tmp_path, capsys):
    """The tool parses a training command's data and EXACT flags with the trainer's defaults, and
    reports what that run sees: the train part of the trainer's default --split under its default
    --seed, with the weights of its --exact-* flags (checked against the reference formula)."""
    from megatron_exact.training.arguments import parse_args
    from tests import exact_reference as ref

    tool = _stats_tool()
    lengths = [5 + (7 * d) % 45 for d in range(120)]
    _write(str(tmp_path / "d"), lengths)
    data = ["--data-path", str(tmp_path / "d"), "--seq-length", "64", "--tokenizer-type", "ByteTokenizer"]
    exact_flags = ["--loss-weighting", "exact", "--exact-alpha", "0.4", "--exact-gamma", "1.0", "--exact-tau", "8"]
    trainer_args = parse_args(["--model", "tiny-qwen2", "--train-iters", "1", "--lr", "1e-3", *data, *exact_flags])
    tool_args = tool.get_args(data + exact_flags)
    for name in ("split", "seed", "document_masking", "exact_alpha", "exact_gamma", "exact_eps", "exact_tau",
                 "loss_weighting"):
        assert getattr(tool_args, name) == getattr(trainer_args, name), name
    assert (tool_args.split, tool_args.seed) == ("969,30,1", 1234)

    assert tool.main(data + exact_flags + ["--num-samples", "20", "--json", str(tmp_path / "s.json")]) == 0
    record = json.loads((tmp_path / "s.json").read_text())
    # Independently: the trainer's train part (same split, seed and sample count), counted per sample.
    train, _, _ = build_train_valid_test_datasets([str(tmp_path / "d")], trainer_args.split, 64, trainer_args.seed,
                                                  (20, 0, 0), tokenizer=build_tokenizer("ByteTokenizer"))
    n = ref.n_buckets_for(64)
    counts = [0] * n
    for i in range(20):
        sample = train[i]
        per_sample = ref.bucket_counts(ref.document_positions(sample["cu_seqlens"].tolist(), 64),
                                       sample["loss_mask"].tolist(), n)
        counts = [a + b for a, b in zip(counts, per_sample)]
    assert [b["count"] for b in record["buckets"]] == counts
    expected = ref.bucket_weights(counts, tau=8, alpha=0.4, gamma=1.0)
    assert [b["exact_weight"] for b in record["buckets"]] == pytest.approx(expected, rel=1e-6)
    assert record["tau"] == 8 and record["alpha"] == 0.4 and record["gamma"] == 1.0
    assert "lower edge >= tau = 8), weights with alpha=0.4, gamma=1.0" in capsys.readouterr().out
    # The defaults matter here: another split or seed gives other samples.
    for other in (["--split", "100,0,0"], ["--seed", "7"]):
        assert tool.main(data + exact_flags + other + ["--num-samples", "20", "--json", str(tmp_path / "o.json")]) == 0
        assert [b["count"] for b in json.loads((tmp_path / "o.json").read_text())["buckets"]] != counts, other


def test_stats_tool_refuses_bad_exact_values_naming_the_flag(tmp_path, capsys):
    _write(str(tmp_path / "d"), [20, 20, 20])
    argv = ["--data-path", str(tmp_path / "d"), "--seq-length", "32", "--tokenizer-type", "ByteTokenizer",
            "--exact-gamma", "-1"]
    assert _stats_tool().main(argv) == 1
    assert "effective_context_stats.py: error: --exact-gamma must be a finite number >= 0, got -1.0" in capsys.readouterr().err
