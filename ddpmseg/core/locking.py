"""One writer at a time per store, run directory or prediction folder.

A writer (``extract`` into a store, ``fit`` into a run dir, ``predict`` into OUT; ``evaluate``,
``report`` and ``suggest`` into the folder they write) holds an exclusive lock for its whole
life, and ``evaluate`` and ``report`` hold the prediction folder's lock while they read it, so
they never see a half-rewritten prediction; a second writer fails at once with a one-line error naming the holder's pid. The lock is
an OS file lock (``filelock``: ``flock`` on Linux), so the kernel drops it when its process
dies: a stale lock file left by a killed writer never blocks the rerun. The lock file is a
hidden sibling of the locked folder, ``.<name>.lock``, not a file inside it: replacing a store
(``--overwrite``) deletes the folder, and a lock inside it would be deleted with it while held;
and it is never among the files of the folder (a prediction folder's contents are what
``evaluate`` and ``report`` read, and what ``predict`` checks for foreign files).
The lock is keyed by the folder's resolved real path, so a symlink (or ``..`` spelling) that
reaches a folder takes that folder's lock. ``fit`` reads its store under a shared lock
(``reader_lock``): any number of readers, no writer meanwhile.
dask workers write under their client's lock (each writes only its own images' chunks) and
take none themselves.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

try:
    import fcntl
except ImportError:  # Windows: readers go unlocked
    fcntl = None

from ddpmseg.core.errors import OutputError
from ddpmseg.core.fileio import is_url


class LockedError(OutputError):
    """Another process is writing the same store or run directory."""


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target``, keyed by its resolved real path: a symlink (or a ``..``
    spelling) that reaches the same folder takes the same lock."""
    target = Path(os.path.realpath(Path(target).expanduser()))
    return target.parent / f".{target.name}.lock"


def holder_pid(target: str | Path) -> int | None:
    """The pid the current (or last) holder wrote into the lock file, or None."""
    try:
        return int(lock_path(target).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def writer_lock(target: str | Path, what: str = "store", *,
                optional: bool = False) -> Iterator[None]:
    """Hold the exclusive writer lock of ``target`` (a local path; URLs are not locked).

    ``optional``: for a reader, go on unlocked when the lock file cannot be created (a
    read-only location, where no writer of ours can be at work either).
    """
    if is_url(target):
        yield
        return
    path = lock_path(target)
    if not _lock_file_made(path, optional):
        yield
        return
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        if _only_readers(path):
            raise LockedError(f"{what} {target} is being read by another process (lock "
                              f"{path})", "wait for it (a fit, say) to finish") from None
        raise _written_by_another(target, what, path) from None
    try:
        # Tell a refused second writer who holds the lock (the lock is the flock, not this).
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def reader_lock(target: str | Path, what: str = "store") -> Iterator[None]:
    """Hold a shared lock on ``target`` while reading it: any number of readers at once, and
    no writer meanwhile (a writer is refused at once, as is a reader while a writer writes).
    For a reader that would read a rewrite as damage (``fit`` during ``extract --compact``).
    Not locked: URLs, a read-only location, systems without ``flock``."""
    if is_url(target) or fcntl is None:
        yield
        return
    path = lock_path(target)
    if not _lock_file_made(path, optional=True):
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _flock(fd, fcntl.LOCK_SH):
            raise _written_by_another(target, what, path)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flock(fd: int, kind: int) -> bool:
    """Take a flock of ``kind`` without waiting; False when another process's lock stands."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _only_readers(path: Path) -> bool:
    """Whether the lock that stands is readers' (shared) rather than a writer's."""
    if fcntl is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return _flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _written_by_another(target, what: str, path: Path) -> LockedError:
    pid = holder_pid(target)
    who = f"process {pid}" if pid else "another process"
    return LockedError(f"{what} {target} is being written by {who} (lock {path})",
                       "wait for it to finish, or stop it; a killed writer's lock is "
                       "released by the system")


def _lock_file_made(path: Path, optional: bool) -> bool:
    """Create the lock file; False when it cannot be made and the lock is ``optional``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as exc:
        if optional:
            return False
        raise OutputError(f"cannot create {path} ({exc.strerror})",
                          "check the path and its permissions") from exc
    return True
