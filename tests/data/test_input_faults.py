"""Bad and changed data files: never a silently wrong result, never a traceback in place of a message."""

import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_exact.data.dataset import build_train_valid_test_datasets
from megatron_exact.data.indexed_files import check_indexed_files
from megatron_exact.data.tokenizers import build_tokenizer
from megatron_exact.errors import BadInputError

SEQ = 16


def _write(prefix, lengths):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for length in lengths:
        builder.add_document(np.arange(length) % 250, [int(length)])
    builder.finalize(prefix + ".idx")


def _train(prefix, cache_path):
    train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, 1234, (None, 0, 0),
                                                  cache_path=cache_path, tokenizer=build_tokenizer("ByteTokenizer"))
    return train


@pytest.mark.parametrize("explicit_cache", [False, True], ids=["default-cache", "data-cache-path"])
def test_index_cache_of_other_data_is_never_used(tmp_path, explicit_cache):
    """Re-preprocessing into the same prefix: the sample indices are rebuilt for the new data,
    in the default cache location (next to the data) and under --data-cache-path."""
    prefix = str(tmp_path / "corpus_text_document")
    cache = str(tmp_path / "cache") if explicit_cache else None
    _write(prefix, [100] * 40)  # 4000 tokens: (4000 - 1) // 16 = 249 samples
    assert len(_train(prefix, cache)) == 249
    cache_dir = cache or os.path.join(prefix, "cache")
    assert any(name.endswith("shuffle_index.npy") for _, _, names in os.walk(cache_dir) for name in names)

    _write(prefix, [30] * 10)  # smaller new data: 300 tokens, 18 samples
    smaller = _train(prefix, cache)
    assert len(smaller) == (300 - 1) // SEQ
    for idx in range(len(smaller)):  # every sample reads inside the new data (stale indices crash here)
        assert smaller[idx]["tokens"].shape == (SEQ,)
    _write(prefix, [100] * 400)  # larger new data
    assert len(_train(prefix, cache)) == (40000 - 1) // SEQ
    # ...and the original data, written again, finds its own cache entry still valid.
    _write(prefix, [100] * 40)
    assert len(_train(prefix, cache)) == 249


def _valid(tmp_path, lengths=(20, 30, 40)):
    prefix = str(tmp_path / "d_text_document")
    _write(prefix, list(lengths))
    return prefix


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p + ".idx", "wb").close(), r"\.idx: empty \(0 bytes"),
    (lambda p: os.truncate(p + ".idx", 20), r"\.idx: truncated \(20 bytes"),
    (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), r"\.idx: truncated .*3 sequences and 3 documents"),
    (lambda p: open(p + ".idx", "wb").write(b"{not an index at all, just text}"), r"\.idx: not a Megatron index"),
    (lambda p: os.truncate(p + ".bin", 4 * 50), r"\.bin: truncated \(200 bytes, but .*\.idx describes 360\)"),
    (lambda p: open(p + ".bin", "wb").close(), r"\.bin: truncated \(0 bytes"),
], ids=["empty-idx", "idx-header-cut", "idx-body-cut", "foreign-idx", "bin-shorter-than-idx", "empty-bin"])
def test_damaged_index_or_data_file_is_named(tmp_path, damage, message):
    prefix = _valid(tmp_path)
    assert check_indexed_files(prefix) == (3, 3)
    damage(prefix)
    with pytest.raises(BadInputError, match=message + r".*re-run tools/preprocess_data.py"):
        check_indexed_files(prefix)
    with pytest.raises(BadInputError, match=message):  # the dataset builder checks before Megatron-Core reads
        _train(prefix, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
