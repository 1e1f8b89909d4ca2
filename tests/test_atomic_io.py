"""The one atomic-write helper: outputs appear whole or not at all, temporaries are unique and
traceable to their writer, a second writer is refused by the lock."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from megatron_exact.atomic_io import (
    OutputLockedError,
    atomic_directory,
    atomic_open,
    atomic_path,
    exclusive_lock,
    owner_of,
    remove_stale_temporaries,
    stale_temporaries,
    temporaries,
    temporary_path,
    write_json,
)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "done.bin").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (final / "done.bin").read_bytes() == b"y"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(final):
            pass
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.bin").write_bytes(b"z")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_open_replaces_only_on_success(tmp_path):
    path = tmp_path / "table.json"
    write_json(path, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as handle:
            handle.write('{"a": 2, "half')
            raise KeyboardInterrupt
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]
    with atomic_open(path) as handle:
        handle.write("new")
        assert not path.read_text() == "new"  # invisible until the block ends
    assert path.read_text() == "new"
    with pytest.raises(FileExistsError):
        with atomic_open(path, overwrite=False):
            pass


def test_atomic_path_keeps_suffix_and_refuses_a_writer_that_wrote_nothing(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.name.endswith(".png") and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
    with pytest.raises(FileNotFoundError, match="produced no file"):
        with atomic_path(tmp_path / "nothing.bin"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_temporary_names_are_unique_and_name_their_writer(tmp_path):
    names = {temporary_path(tmp_path / "x.bin") for _ in range(100)}
    assert len(names) == 100
    host, pid = owner_of(next(iter(names)))
    assert pid == os.getpid() and host
    assert owner_of(tmp_path / "x.bin") is None


def _leave_a_temporary(directory):
    temporary_path(os.path.join(directory, "data.bin")).write_bytes(b"left behind")


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=_leave_a_temporary, args=(str(tmp_path),))
    process.start()
    process.join()
    (dead,) = temporaries(tmp_path)
    live = temporary_path(tmp_path / "data.bin")
    live.write_bytes(b"being written")
    other = temporary_path(tmp_path / "other.idx")
    other.write_bytes(b"")
    assert stale_temporaries(tmp_path) == [dead]
    assert stale_temporaries(tmp_path, "*.idx") == []
    assert sorted(temporaries(tmp_path, "data.*")) == sorted([dead, live])
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    lock = tmp_path / "out.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from megatron_exact.atomic_io import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'out'):\n    print('held', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=rf"out is being written by another run \(pid {holder.pid} "):
            with exclusive_lock(lock, "out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "out"):  # released when its holder died
        assert f"pid {os.getpid()}" in lock.read_text()


def test_module_is_cheap_to_import():
    """Every tool imports it before anything heavy: it must not pull in torch or Megatron."""
    code = "import sys, megatron_exact.atomic_io, megatron_exact.cli; print(sorted({'torch', 'megatron'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.stdout.strip() == "[]"
