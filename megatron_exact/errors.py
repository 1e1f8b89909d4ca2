"""The project's error vocabulary: what a user can fix, said in the library's own terms.

Library code raises :class:`UserError` (or a subclass) for a problem in the
user's input, files or settings; the message names the file, line or
setting and says what to do. Command-line tools turn these, and operating
system errors such as a full disk, into one line on stderr through
:func:`megatron_exact.cli.run` (the CLI layer names its flags). Anything
else is a bug and keeps its traceback.

This module imports nothing heavy: every layer may use it.
"""

from __future__ import annotations

import errno
import signal


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` says what and where.

    ``exit_code`` is the process status a command-line tool exits with.
    """

    exit_code = 1


class BadInputError(UserError, ValueError):
    """Input data (a corpus line, a dataset file) that cannot be used; the message names the
    file (and line). ``kind`` is its category, for counts of skipped lines."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind or message


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread so that cleanup (temporary
    files, worker pools, locks) runs on the way out, as for Ctrl-C."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def read_json(path) -> object:
    """The JSON value in file ``path``; invalid JSON is a :class:`BadInputError` naming
    ``path:line:column`` (``json``'s own error names neither the file nor what to do)."""
    import json

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); fix or re-create the file",
                            "invalid JSON") from None


def describe(error: BaseException) -> str:
    """One line for a user: the message of a :class:`UserError`, or what an OS error
    means and which file it concerns (a full disk says so, with the path)."""
    if isinstance(error, OSError) and not isinstance(error, UserError):
        where = f" {error.filename}" if error.filename else ""
        if error.errno == errno.ENOSPC:
            return f"no space left on the device while writing{where}: free space there or write elsewhere"
        if error.errno == errno.EDQUOT:
            return f"disk quota exceeded while writing{where}"
        if error.errno == errno.EROFS:
            return f"read-only file system:{where}"
        if error.strerror:
            return f"{error.strerror}:{where}" if where else error.strerror
    text = str(error)
    return text if text else type(error).__name__
