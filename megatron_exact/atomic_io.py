"""Writing outputs so that a reader never sees half of one: the one helper every tool uses.

An output (a file or a directory) is written under a temporary name next to
its final path and renamed onto it (``os.replace``, atomic on POSIX) only
once complete. On an error or an interrupt the temporary is removed and the
final path is left as it was.

Temporary names are unique per writer and say who owns them:
``.{name}.tmp-{host}-{pid}-{random}[suffix]``. Two concurrent writers never
share one, and a later run can tell a temporary left by a dead process
(:func:`stale_temporaries`) from one a live run is still writing. A run that
must be the only writer of an output holds :func:`exclusive_lock` for its
duration.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Iterator, Optional, Union

from megatron_exact.errors import UserError

PathLike = Union[str, os.PathLike]

_TMP_MARK = ".tmp-"
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
# .{name}.tmp-{host}-{pid}-{random}{suffix}
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>.*)$")


class OutputLockedError(UserError):
    """Another live run holds the lock of an output."""


def temporary_path(final: PathLike, suffix: str = "") -> Path:
    """A fresh temporary name next to ``final`` (``suffix`` keeps an extension a writer needs, e.g. ``.png``)."""
    final = Path(final)
    return final.parent / f".{final.name}{_TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: PathLike, *, suffix: str = "", overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path next to ``final``; on success it replaces ``final``.

    For writers that take a file name (matplotlib, Megatron's dataset builder).
    The parent directory must exist. With ``overwrite=False`` an existing
    ``final`` is refused up front.
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise FileExistsError(errno.EEXIST, "already exists; remove it or choose another path", str(final))
    tmp = temporary_path(final, suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "the writer produced no file", str(tmp))
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_directory(final.parent)


@contextlib.contextmanager
def atomic_open(final: PathLike, mode: str = "w", *, overwrite: bool = True, **open_kwargs) -> Iterator[IO]:
    """``open`` for writing whose content appears at ``final`` only when the block succeeds (fsynced)."""
    if not any(flag in mode for flag in "wx"):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} must contain 'w'")
    with atomic_path(final, overwrite=overwrite) as tmp:
        with open(tmp, mode.replace("x", "w"), **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: PathLike, text: str, *, overwrite: bool = True) -> Path:
    with atomic_open(path, "w", overwrite=overwrite, encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: PathLike, value, *, indent: Optional[int] = 2, sort_keys: bool = False,
               overwrite: bool = True) -> Path:
    """``value`` as JSON (one trailing newline), atomically."""
    return write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n", overwrite=overwrite)


@contextlib.contextmanager
def atomic_directory(final: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; rename it to ``final`` on success.

    On an exception the temporary directory is removed and ``final`` is left as
    it was. With ``overwrite`` an existing ``final`` is replaced (moved aside
    first, deleted once the new one is in place).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists; remove it or choose another path", str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if final.exists():
        old = temporary_path(final, ".old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        _remove(old)
    _fsync_directory(final.parent)


def check_writable(path: PathLike, *, directory: bool) -> None:
    """Raise :class:`UserError` unless ``path`` (a directory, or a file with ``directory=False``)
    can be written: what exists there is of the right kind, the nearest existing ancestor is a
    directory, and a file can really be created there (a read-only file system, a full quota or a
    path under a regular file fail here, at start-up, not after hours of work). Creates nothing
    that stays."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise UserError(f"{path} exists and is not a directory")
        if not directory and path.is_dir():
            raise UserError(f"{path} is a directory, expected a file")
        where = path if directory else path.parent
    else:
        where = path.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise UserError(f"cannot create {path}: {where} is a file, not a directory")
    probe = temporary_path(where / ".write-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
        if path.is_file() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    except OSError as err:
        raise UserError(f"cannot write in {where}: {err.strerror or err}") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_of(path: PathLike) -> Optional[tuple[str, int]]:
    """``(host, pid)`` of the writer that made temporary ``path``; None for other names."""
    match = _TMP_PATTERN.match(Path(path).name)
    return (match["host"], int(match["pid"])) if match else None


def temporaries(directory: PathLike, final_glob: str = "*") -> list[Path]:
    """Every temporary in ``directory`` whose final name matches ``final_glob``, live or not."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _TMP_PATTERN.match(entry.name)
        if match and fnmatch.fnmatchcase(match["name"], final_glob):
            found.append(entry)
    return sorted(found)


def stale_temporaries(directory: PathLike, final_glob: str = "*") -> list[Path]:
    """Temporaries in ``directory`` (of final names matching ``final_glob``) whose writer is gone.

    A temporary made on another host is left alone (its writer may be alive
    there), as is one whose process still runs here.
    """
    stale = []
    for path in temporaries(directory, final_glob):
        host, pid = owner_of(path)
        if host == _HOST and not _process_alive(pid):
            stale.append(path)
    return stale


def remove_temporaries(paths: list[Path]) -> list[Path]:
    """Delete the given temporaries (files or directories); returns them."""
    for path in paths:
        _remove(path)
    return paths


def remove_stale_temporaries(directory: PathLike, final_glob: str = "*") -> list[Path]:
    """Delete what dead writers left in ``directory`` (see :func:`stale_temporaries`); returns the paths."""
    return remove_temporaries(stale_temporaries(directory, final_glob))


@contextlib.contextmanager
def exclusive_lock(path: PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (a lock file, created for the block) for the block.

    A second holder is refused at once with :class:`OutputLockedError` naming
    ``what`` and the pid that holds it, instead of waiting or racing. The lock
    is released when the block ends or the process dies (``flock``). The holder
    deletes the lock file before releasing it; a process that locked the file
    just before it was deleted sees that it no longer has that name and tries
    again, so two holders never coexist. A file left by a killed holder is
    simply locked again.
    """
    path = Path(path)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputLockedError(f"{what} is being written by another run ({holder} holds {path}); "
                                    "wait for it to finish or choose another output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # locked a file its previous holder had just deleted
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        handle.close()
