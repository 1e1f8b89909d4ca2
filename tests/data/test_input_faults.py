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


# ---------------------------------------------------------------- the stats tool, through its entry point


def _stats_tool(prefix, capsys, *extra):
    from tools import effective_context_stats

    status = effective_context_stats.main(["--data-path", prefix, "--tokenizer-type", "ByteTokenizer", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


@pytest.mark.parametrize("seq_length, message", [
    ("0", "--seq-length must be positive, got 0"),
    ("-5", "--seq-length must be positive, got -5"),
    ("1000", "with --seq-length 1000 leaves no training samples in"),  # 90 tokens of data
])
def test_stats_seq_length_out_of_range(tmp_path, capsys, seq_length, message):
    prefix = _valid(tmp_path)
    status, err = _stats_tool(prefix, capsys, "--seq-length", seq_length)
    assert status == 1 and "effective_context_stats.py: error: " in err and message in err


@pytest.mark.parametrize("split", ["90;10", "abc", "-1,2,3", "0,0,0", "1,2,3,4", "nan,1"])
def test_unparsable_split_is_refused(tmp_path, capsys, split):
    status, err = _stats_tool(_valid(tmp_path), capsys, "--seq-length", "8", f"--split={split}")
    assert status == 1 and f"--split {split!r}: expected up to three non-negative" in err


@pytest.mark.parametrize("flag", ["--plot", "--json"])
def test_output_into_missing_directory_checked_before_counting(tmp_path, capsys, monkeypatch, flag):
    from megatron_exact.data import stats

    counted = []
    monkeypatch.setattr(stats, "effective_context_stats", lambda *a, **k: counted.append(1))
    target = tmp_path / "missing" / "out.png"
    status, err = _stats_tool(_valid(tmp_path), capsys, "--seq-length", "8", flag, str(target))
    assert status == 1 and f"{flag} {target}: directory {tmp_path / 'missing'} does not exist" in err
    assert counted == [] and not (tmp_path / "missing").exists()


def test_stats_on_damaged_data_names_the_file(tmp_path, capsys):
    prefix = _valid(tmp_path)
    os.truncate(prefix + ".bin", 100)
    status, err = _stats_tool(prefix, capsys, "--seq-length", "8", "--json", str(tmp_path / "s.json"))
    assert status == 1 and f"{prefix}.bin: truncated (100 bytes, but {prefix}.idx describes 360)" in err
    assert not (tmp_path / "s.json").exists()
