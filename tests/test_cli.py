"""The shared error-to-message path of every command-line tool."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_exact import cli
from megatron_exact.errors import UserError


def test_user_error_is_one_line_with_its_exit_code(capsys):
    class Refused(UserError):
        exit_code = 4

    def main(argv):
        raise Refused(f"--flag {argv[0]}: no such thing; pass a real one")

    assert cli.run("tool.py", main, ["x"]) == 4
    assert capsys.readouterr().err == "tool.py: error: --flag x: no such thing; pass a real one\n"


def test_os_errors_say_what_and_where(capsys):
    def full_disk(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/iter_0000010/0_0.distcp")

    assert cli.run("tool.py", full_disk) == 1
    err = capsys.readouterr().err
    assert "no space left on the device while writing /ckpt/iter_0000010/0_0.distcp" in err

    def missing(argv):
        open("/nonexistent/dir/file")

    assert cli.run("tool.py", missing) == 1
    assert "No such file or directory: /nonexistent/dir/file" in capsys.readouterr().err


def test_bugs_keep_their_traceback():
    def bug(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        cli.run("tool.py", bug)


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(UserError):
        cli.run("tool.py", lambda argv: (_ for _ in ()).throw(UserError("shown with its traceback")))


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    """A terminated tool removes its temporary output on the way out (as for Ctrl-C) and exits 128+15
    at once: the interpreter is not finalized (no atexit hook runs; that teardown takes seconds once
    torch is imported)."""
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, sys, time
        from megatron_exact import cli
        from megatron_exact.atomic_io import atomic_open

        atexit.register(lambda: print("finalized", file=sys.stderr, flush=True))

        def main(argv):
            with atomic_open({str(tmp_path / 'out.txt')!r}) as f:
                f.write("partial")
                print("writing", flush=True)
                time.sleep(60)

        cli.exit_process(cli.run("tool.py", main))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.stdout.readline().strip() == "writing"
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.time() - start < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert "tool.py: interrupted" in err and "Traceback" not in err and "finalized" not in err
    assert list(tmp_path.iterdir()) == [script]  # no out.txt, no temporary


def test_exit_process_without_interrupt_is_a_normal_exit(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent("""
        import atexit, sys
        from megatron_exact import cli

        atexit.register(lambda: print("finalized", file=sys.stderr, flush=True))
        cli.exit_process(cli.run("tool.py", lambda argv: 3))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 3 and done.stderr == "finalized\n"
