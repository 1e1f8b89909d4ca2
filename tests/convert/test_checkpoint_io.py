"""Megatron-LM checkpoint layout: directory names, tracker file, atomic writes."""

import pytest

from megatron_exact.checkpoint import (
    RELEASE,
    checkpoint_dir,
    read_tracker,
    resolve_checkpoint,
    write_tracker_atomically,
)


def test_directory_names_follow_megatron_lm(tmp_path):
    assert checkpoint_dir(tmp_path, 100) == tmp_path / "iter_0000100"
    assert checkpoint_dir(tmp_path, RELEASE) == tmp_path / "release"
    with pytest.raises(ValueError, match="non-negative int"):
        checkpoint_dir(tmp_path, -1)


def test_tracker_round_trip_and_bad_content(tmp_path):
    assert read_tracker(tmp_path) is None
    write_tracker_atomically(tmp_path, 42)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "42\n"
    assert read_tracker(tmp_path) == 42
    write_tracker_atomically(tmp_path, RELEASE)
    assert read_tracker(tmp_path) == RELEASE
    assert [p.name for p in tmp_path.iterdir()] == ["latest_checkpointed_iteration.txt"]  # no temp left
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("oops\n")
    with pytest.raises(ValueError, match="latest_checkpointed_iteration.txt.*'oops'"):
        read_tracker(tmp_path)


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latest_checkpointed_iteration.txt"):
        resolve_checkpoint(tmp_path)
    write_tracker_atomically(tmp_path, 7)
    with pytest.raises(FileNotFoundError, match="iter_0000007 does not exist"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "iter_0000007").mkdir()
    assert resolve_checkpoint(tmp_path) == (tmp_path / "iter_0000007", 7)
