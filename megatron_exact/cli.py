"""One path from an exception to a message, shared by every command-line tool.

Every ``tools/*.py`` entry point (and ``python -m megatron_exact...``) is::

    def main(argv=None) -> int:
        return cli.run("preprocess_data.py", _main, argv)

:func:`run` calls ``_main(argv)`` and turns what a user can act on into one
line on stderr, ``<prog>: error: <message>``, and an exit status:

- :class:`~megatron_exact.errors.UserError` (and the library's older
  ``ValueError`` messages, which name their flag or file): status 1, or the
  error's ``exit_code``;
- ``OSError`` (missing file, permission, full disk, read-only file system):
  status 1, with the path and what it means;
- Ctrl-C or SIGTERM: ``<prog>: interrupted``, status 128 + signal number,
  after cleanup ran (SIGTERM is turned into
  :class:`~megatron_exact.errors.Interrupted` so that ``finally`` blocks and
  context managers remove temporaries and stop worker pools).

Anything else is a bug and keeps its traceback. ``MEGATRON_EXACT_TRACEBACK=1``
shows the traceback of handled errors too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional, Sequence

from megatron_exact.errors import Interrupted, UserError, describe

HANDLED = (UserError, OSError, ValueError)
TRACEBACK_ENV = "MEGATRON_EXACT_TRACEBACK"

_interrupted = False  # set by run() when it reported an interrupt


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_termination_handler() -> None:
    """Make SIGTERM raise :class:`Interrupted` in the main thread (as Ctrl-C raises
    KeyboardInterrupt), so a terminated tool cleans up like an interrupted one."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


def _rank_tag() -> str:
    """`` [rank R/W]`` in a multi-process launch (torchrun's RANK/WORLD_SIZE), else nothing: every
    rank prints the errors it detects itself, since torchrun may stop the others before they could."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" [rank {os.environ.get('RANK', '?')}/{world}]" if world not in ("", "1") else ""


def error_line(prog: str, error: BaseException) -> str:
    return f"{prog}: error:{_rank_tag()} {describe(error)}"


def run(prog: str, main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` with the shared error handling; returns the exit status."""
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    install_termination_handler()
    try:
        status = main(argv)
        return 0 if status is None else int(status)
    except KeyboardInterrupt as err:
        global _interrupted
        _interrupted = True
        print(f"{prog}: interrupted{_rank_tag()}", file=sys.stderr, flush=True)
        return err.exit_code if isinstance(err, Interrupted) else 128 + signal.SIGINT
    except HANDLED as err:
        if show_traceback:
            raise
        print(error_line(prog, err), file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_process(status: int) -> None:
    """End a tool's process with ``status`` (the ``if __name__ == "__main__"`` line of every tool).

    After an interrupt the cleanup has already run inside :func:`run`; finalizing the
    interpreter would then only tear down torch and Megatron-Core modules, which takes
    seconds (more on a loaded node) while a user or a scheduler waits for the process to
    end. So an interrupted tool flushes its output and exits at once; otherwise this is
    ``sys.exit(status)``.
    """
    if _interrupted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
