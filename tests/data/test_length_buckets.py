"""Length-bucketed prefixes hold exactly the original documents; blend weights follow the factors."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from megatron_exact.data.length_buckets import blend_data_path, blend_weights, split_by_length
from megatron_exact.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A synthetic corpus (Pareto lengths: documents in every bucket below)."""
    from megatron_exact.synthetic import LanguageConfig, build_corpus

    return build_corpus(str(tmp_path_factory.mktemp("lb") / "c"), LanguageConfig(), 300, log=lambda m: None).data_prefix


def _documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    docs = data.document_indices
    return [tuple(np.concatenate([data[s] for s in range(docs[i], docs[i + 1])]).tolist()) if docs[i + 1] > docs[i]
            else () for i in range(len(docs) - 1)]


def test_prefixes_together_hold_exactly_the_original_documents(corpus, tmp_path):
    original = _documents(corpus)
    buckets = split_by_length(corpus, str(tmp_path / "parts"), [64, 256, 1024], log=lambda m: None)
    assert [(b.low, b.high) for b in buckets] == [(0, 64), (64, 256), (256, 1024), (1024, None)]
    together = collections.Counter()
    for bucket in buckets:
        docs = _documents(bucket.prefix)
        assert len(docs) == bucket.documents and sum(map(len, docs)) == bucket.tokens
        assert all(bucket.low <= len(d) < (bucket.high or 10**12) for d in docs)
        # Input order is kept inside a bucket.
        assert docs == [d for d in original if bucket.low <= len(d) < (bucket.high or 10**12)]
        together.update(docs)
    assert together == collections.Counter(original)
    # Each prefix is trainable data: its sidecar names the same tokenizer.
    from megatron_exact.data.tokenizers import read_tokenizer_sidecar

    assert read_tokenizer_sidecar(buckets[0].prefix)["fingerprint"] == read_tokenizer_sidecar(corpus)["fingerprint"]


def test_blend_weights_and_data_path(corpus, tmp_path):
    buckets = split_by_length(corpus, str(tmp_path / "parts"), [256], log=lambda m: None)
    weights = blend_weights(buckets, [1.0, 3.0])
    short, long = buckets[0].tokens, buckets[1].tokens
    assert weights == pytest.approx([short / (short + 3 * long), 3 * long / (short + 3 * long)])
    assert blend_data_path(buckets, [0.0, 1.0]) == ["1", buckets[1].prefix]
    with pytest.raises(UserError, match="2 length bucket"):
        blend_weights(buckets, [1.0])
    with pytest.raises(UserError, match="increase strictly"):
        split_by_length(corpus, str(tmp_path / "bad"), [256, 64])
