"""Preprocessing under bad input, concurrent and interrupted runs: a message naming the file,
line or flag; outputs complete or absent, never half-written; interrupts end within seconds."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_exact import atomic_io

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROG = "preprocess_data.py"


def _tool(tmp_path, *extra, input=None, prefix="out"):
    """tools/preprocess_data.py in this process: (exit status, stderr)."""
    from tools import preprocess_data

    argv = ["--input", str(input), "--output-prefix", str(tmp_path / prefix), "--tokenizer-type", "ByteTokenizer",
            "--workers", "1", *extra]
    return preprocess_data.main(argv)


def _outputs(tmp_path, prefix="out"):
    return sorted(name for name in os.listdir(tmp_path) if prefix in name)


def _lines(*texts):
    return "".join(json.dumps({"text": text}) + "\n" for text in texts)


def test_input_without_documents_fails_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _tool(tmp_path, input=empty) == 1
    err = capsys.readouterr().err
    assert f"{PROG}: error: --input {empty}: no documents in 1 file(s)" in err and "nothing was written" in err
    assert _outputs(tmp_path) == []
    # Every line bad and skipped: also no documents, and the message says why.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\nnot json\n')
    assert _tool(tmp_path, "--skip-bad-lines", input=bad) == 1
    err = capsys.readouterr().err
    assert f"--input {bad}: no documents" in err and "all 2 line(s) were bad and skipped" in err
    assert "Traceback" not in err and _outputs(tmp_path) == []


@pytest.mark.parametrize("name, content, expected", [
    ("cut.jsonl.gz", gzip.compress(_lines("a", "b", "c").encode())[:-12], "cut.jsonl.gz:"),
    ("plain.jsonl.gz", _lines("not gzip at all").encode(), "plain.jsonl.gz:1: cannot read the file past line 0"),
    ("corrupt.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 8, "corrupt.jsonl.zst:1: cannot read the file past line 0"),
], ids=["truncated-gzip", "not-gzip", "corrupt-zstd"])
def test_undecodable_compressed_input_is_named_by_file_and_line(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert _tool(tmp_path, input=path) == 1
    err = capsys.readouterr().err
    assert f"{PROG}: error: {tmp_path}/{expected}" in err and "truncated or corrupt" in err
    assert "Traceback" not in err and _outputs(tmp_path) == []


def test_lone_surrogate_is_a_bad_line_and_can_be_skipped(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud800 here"}\n{"text": "also fine"}\n')
    assert _tool(tmp_path, input=path) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: value of key 'text' holds a lone surrogate" in err and "--skip-bad-lines" in err
    assert _outputs(tmp_path) == []
    assert _tool(tmp_path, "--skip-bad-lines", input=path) == 0
    assert "Skipped 1 bad line(s): {'lone surrogate': 1}" in capsys.readouterr().err
    record = json.loads((tmp_path / "out_text_document.tokenizer_info.json").read_text())
    assert record["num_documents"] == 2


def test_subdirectory_named_like_input_is_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(_lines("hello"))
    (corpus / "nested.jsonl").mkdir()
    assert _tool(tmp_path, input=corpus) == 1
    err = capsys.readouterr().err
    assert f"--input {corpus}: {corpus}/nested.jsonl is a directory, not an input file" in err
    assert "Traceback" not in err and _outputs(tmp_path) == []


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path, capsys):
    """Temporaries of a dead run (and the fixed names of earlier versions) go; one of a live writer stays."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(_lines("hello", "world"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "out_text_document.bin"
    stale = atomic_io.temporary_path(final).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    (tmp_path / stale).write_bytes(b"x" * 1000)
    (tmp_path / "out_text_document.bin.tmp").write_bytes(b"x" * 1000)
    live = atomic_io.temporary_path(tmp_path / "out_text_document.idx")  # this process is alive
    live.write_bytes(b"x")
    assert _tool(tmp_path, input=corpus) == 0
    err = capsys.readouterr().err
    assert "removed 2 temporary file(s) left by an interrupted run" in err and stale in err
    assert _outputs(tmp_path) == sorted(["out_text_document.bin", "out_text_document.idx",
                                         "out_text_document.tokenizer_info.json", live.name])


def test_failed_rerun_leaves_previous_outputs_intact(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(_lines("first", "second"))
    assert _tool(tmp_path, input=good) == 0
    before = {name: (tmp_path / name).read_bytes() for name in _outputs(tmp_path)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_lines("x") + "{broken\n")
    assert _tool(tmp_path, input=bad) == 1
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in _outputs(tmp_path)} == before


# ---------------------------------------------------------------- concurrent and interrupted runs (processes)


@pytest.fixture(scope="module")
def long_input(tmp_path_factory):
    """A glob over many links to one corpus: a run that takes a while, from a small file."""
    root = tmp_path_factory.mktemp("long")
    text = " ".join(["alpha beta gamma delta epsilon zeta eta theta"] * 25)
    (root / "base.jsonl").write_text(_lines(*[text] * 20000))
    for i in range(40):
        os.symlink(root / "base.jsonl", root / f"part{i:02d}.jsonl")
    return str(root / "part*.jsonl")


def _signals_as_from_a_terminal():
    """In the child before exec: SIGINT at its default and no signal blocked, as a shell starts a
    foreground command. An ignored or blocked signal is inherited through exec, and the test process
    may have either (a background job of a non-interactive shell ignores SIGINT); a tool started
    that way rightly ignores Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _catches(pid, sig):
    """Whether process ``pid`` has a handler installed for ``sig`` (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught >> (sig - 1) & 1)


def _start(long_input, prefix, workers):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", long_input,
         "--output-prefix", prefix, "--tokenizer-type", "ByteTokenizer", "--workers", str(workers),
         "--log-interval", "2000"],
        stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO,
        preexec_fn=_signals_as_from_a_terminal,
    )
    for line in proc.stderr:  # in the main loop: locked, temporaries open, workers busy
        if line.startswith("Processed"):
            break
    else:
        raise AssertionError(f"preprocessing ended early (status {proc.wait()})")
    import psutil

    return proc, [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]


def _gone(pids):
    import psutil

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(pid) for pid in pids)


def _unlocked(path):
    """Whether no process holds the ``flock`` on ``path`` (a missing file is not held)."""
    import fcntl

    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return True
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_second_writer_refused_and_interrupt_ends_within_seconds(tmp_path, capsys, long_input, sig):
    """While a run with --workers 2 writes a prefix, a second run to it is refused; Ctrl-C (to the
    whole process group, as a terminal sends it) or SIGTERM then ends the first within 10 s,
    workers reaped, temporaries removed, nothing half-written."""
    proc, workers = _start(long_input, str(tmp_path / "out"), workers=2)
    try:
        assert len(workers) >= 2 and atomic_io.temporaries(tmp_path)
        assert _catches(proc.pid, signal.SIGINT) and _catches(proc.pid, signal.SIGTERM)
        small = tmp_path / "small.jsonl"
        small.write_text(_lines("hello"))
        assert _tool(tmp_path, input=small) == 1
        err = capsys.readouterr().err
        assert f"{PROG}: error: --output-prefix {tmp_path}/out" in err and "is being written by another run" in err
        start = time.time()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rest = proc.stderr.read()
        status = proc.wait(timeout=10)
        assert time.time() - start < 10
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert status == 128 + sig and f"{PROG}: interrupted" in rest and "Traceback" not in rest
    deadline = time.time() + 5
    while not _gone(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(workers)
    assert _outputs(tmp_path) == []  # no output, no temporary, no lock file
    assert sorted(os.listdir(tmp_path)) == ["small.jsonl"]


@pytest.mark.slow
def test_killed_run_orphans_no_worker_and_its_temporaries_are_cleaned(tmp_path, capsys, long_input):
    proc, workers = _start(long_input, str(tmp_path / "out"), workers=2)
    proc.kill()  # no cleanup can run
    proc.wait(timeout=10)
    proc.stderr.close()
    # The workers end with their parent. A worker's main thread can already be a zombie while
    # its other threads still exit holding the inherited lock, so wait for the lock itself too.
    lock = tmp_path / ".out_text_document.lock"
    deadline = time.time() + 10
    while not (_gone(workers) and _unlocked(lock)) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(workers) and _unlocked(lock)
    left = atomic_io.temporaries(tmp_path)
    assert left and all(path.name.startswith(".out_text_document.") for path in left)
    small = tmp_path / "small.jsonl"
    small.write_text(_lines("hello"))
    assert _tool(tmp_path, input=small) == 0
    assert f"removed {len(left)} temporary file(s) left by an interrupted run" in capsys.readouterr().err
    assert _outputs(tmp_path) == ["out_text_document.bin", "out_text_document.idx",
                                  "out_text_document.tokenizer_info.json"]
