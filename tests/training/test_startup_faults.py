"""Trainer start-up: outputs checked writable before any work, errors on whichever rank finds them,
checkpoint and data faults as messages naming the file or flag (in this process, through the
trainer's own entry point, unless several ranks are needed)."""

from __future__ import annotations

import contextlib
import subprocess
import textwrap
import time

import pytest

from megatron_exact.train import main as pretrain_main
from tests.training.conftest import REPO, run_env, tiny_flags
from tests.launch import torchrun_command

PROG = "pretrain_exact.py"


@contextlib.contextmanager
def read_only_mount(path):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _run(argv, capsys):
    status = pretrain_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


@pytest.mark.parametrize("flag, directory", [("--save", True), ("--metrics-file", False), ("--tensorboard-dir", True)])
def test_output_under_a_regular_file_fails_at_start_up(byte_corpus, tmp_path, capsys, flag, directory):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "sub" / ("out" if directory else "metrics.jsonl")
    status, err = _run(tiny_flags(byte_corpus, "--train-iters", "1", flag, str(target)), capsys)
    assert status == 2
    assert f"{PROG}: error: {flag} {target}: cannot create {target}: {blocker} is a file, not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("flag, directory", [("--save", True), ("--metrics-file", False), ("--tensorboard-dir", True)])
def test_output_on_a_read_only_file_system_fails_at_start_up(byte_corpus, tmp_path, capsys, flag, directory):
    with read_only_mount(tmp_path / "ro") as mount:
        target = mount / ("ckpt" if directory else "metrics.jsonl")
        status, err = _run(tiny_flags(byte_corpus, "--train-iters", "1", flag, str(target)), capsys)
        assert status == 2
        assert f"{PROG}: error: {flag} {target}: cannot write in {mount}: Read-only file system" in err
        assert list(mount.iterdir()) == []


def test_save_that_is_a_regular_file_fails_at_start_up(byte_corpus, tmp_path, capsys):
    save = tmp_path / "ckpt"
    save.write_text("oops")
    status, err = _run(tiny_flags(byte_corpus, "--train-iters", "1", "--save", str(save)), capsys)
    assert status == 2 and f"--save {save}: {save} exists and is not a directory" in err
    assert save.read_text() == "oops"


@pytest.mark.slow
def test_config_error_only_rank_1_detects_is_printed(byte_corpus, tmp_path):
    """An error only rank 1 finds (here: its own data check fails) reaches the user: rank 0 is
    waiting for it in the process-group start-up when torchrun stops the job."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from megatron_exact import train
        from megatron_exact.training import arguments

        checked = arguments.validate_args

        def validate_args(args, world_size):
            if os.environ["RANK"] == "1":
                raise arguments.ConfigError("--data-path /node1/data: does not exist on this node")
            return checked(args, world_size)

        arguments.validate_args = validate_args
        sys.exit(train.main())
    """))
    start = time.time()
    result = subprocess.run(torchrun_command(script, *tiny_flags(byte_corpus, "--train-iters", "1"), nproc=2),
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{PROG}: error: [rank 1/2] --data-path /node1/data: does not exist on this node" in output
    assert "megatron_exact/" not in output  # no traceback from our code (torchrun's agent prints its own)
    assert time.time() - start < 200


@contextlib.contextmanager
def small_tmpfs(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow  # a training
def test_disk_full_during_save_says_so_and_keeps_the_previous_checkpoint(byte_corpus, tmp_path, capsys):
    """--save on a 2 MiB file system: the first checkpoint (~1.4 MiB) fits, the second does not."""
    import torch.distributed

    from megatron_exact.checkpoint import checkpoint_dir, find_checkpoint
    from megatron_exact.platform.distributed import destroy_model_parallel

    started_here = not torch.distributed.is_initialized()

    with small_tmpfs(tmp_path / "small", "2m") as mount:
        save = mount / "ckpt"
        try:
            status = pretrain_main(["--model", "tiny-qwen2", "--vocab-size", "512", "--seq-length", "128",
                                    "--train-iters", "2", "--lr", "1e-3", "--data-path", byte_corpus,
                                    "--eval-iters", "0", "--save", str(save), "--save-interval", "1"])
        finally:
            if started_here:
                destroy_model_parallel()
        err = capsys.readouterr().err
        assert status == 1 and "Traceback" not in err
        assert (f"{PROG}: error: no space left on the device (ENOSPC) while saving checkpoint "
                f"{checkpoint_dir(save, 2)} (this rank's part needs about") in err
        assert "the previous checkpoint stays the latest" in err
        assert find_checkpoint(save) == (checkpoint_dir(save, 1), 1)
        assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
