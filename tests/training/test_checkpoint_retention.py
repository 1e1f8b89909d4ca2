"""--most-recent-k's pruning of the --save directory (``remove_old_checkpoints``) on a directory laid
out as the trainer leaves it: complete ``iter_*`` checkpoints, the tracker, an interrupted save's
temporary directory, and checkpoints past the tracker. The trainer's own run with the flag:
tests/training/test_runs.py (test_elastic_resume_from_one_data_parallel_rank_to_two)."""

from __future__ import annotations

from megatron_exact.atomic_io import temporaries, temporary_path
from megatron_exact.checkpoint import checkpoint_dir, write_tracker_atomically
from megatron_exact.training.checkpointing import remove_old_checkpoints


def _checkpoints(save, iterations):
    for iteration in iterations:
        directory = checkpoint_dir(save, iteration)
        directory.mkdir(parents=True)
        (directory / "common.pt").write_bytes(b"x")


def _left(save):
    return sorted(path.name for path in save.iterdir() if path.name.startswith("iter_"))


def test_keeps_the_most_recent_up_to_the_tracker_and_never_touches_temporaries(tmp_path):
    save = tmp_path / "ckpt"
    _checkpoints(save, [10, 20, 30, 40, 50])
    interrupted = temporary_path(checkpoint_dir(save, 60))  # a save of 60 killed mid-way
    interrupted.mkdir()
    write_tracker_atomically(save, 40)  # resumed from 40: 50 belongs to an abandoned trajectory
    removed = remove_old_checkpoints(str(save), 2)
    assert [path.name for path in removed] == ["iter_0000020", "iter_0000010"]
    assert _left(save) == ["iter_0000030", "iter_0000040", "iter_0000050"]
    assert temporaries(save, "iter_*") == [interrupted]  # the next start removes it, not the pruning
    assert remove_old_checkpoints(str(save), 2) == []  # nothing more to do


def test_decides_nothing_without_the_trackers_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    _checkpoints(save, [1, 2, 3])
    assert remove_old_checkpoints(str(save), 1) == []  # no tracker
    write_tracker_atomically(save, 4)  # names a checkpoint that is not here
    assert remove_old_checkpoints(str(save), 1) == []
    assert _left(save) == ["iter_0000001", "iter_0000002", "iter_0000003"]
    write_tracker_atomically(save, 3)
    assert [path.name for path in remove_old_checkpoints(str(save), 1)] == ["iter_0000002", "iter_0000001"]
    assert _left(save) == ["iter_0000003"]
