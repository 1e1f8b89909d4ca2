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
