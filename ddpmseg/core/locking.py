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

A store at a URL (``s3://``, ``memory://``...) has an object as its writer lock, the sibling
``.<name>.lock`` of the store's prefix: created with a conditional put (S3: ``If-None-Match:
*``), so that of two writers exactly one creates it; it holds its owner (host, pid, a random
token) and an expiry, which the holder renews every third of ``OBJECT_LOCK_TTL_S`` while it
writes. A second writer is refused while the lock is live. One whose expiry has passed, or
whose owner was a process of this host that is gone (a killed extract, rerun here), is taken
over with a conditional put on the lock's ETag (``If-Match``): of two writers taking it over,
one wins. The lock is deleted at the end. Readers take no lock on an object store.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

try:
    import fcntl
except ImportError:  # Windows: readers go unlocked
    fcntl = None

from ddpmseg.core import objectstore
from ddpmseg.core.errors import OutputError
from ddpmseg.core.fileio import is_url

log = logging.getLogger(__name__)

# Seconds an object-store lock stays live without renewal (its holder renews it every third).
OBJECT_LOCK_TTL_S = 600.0


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
    """Hold the exclusive writer lock of ``target``: a local path's lock file, or a URL's
    lock object (``object_writer_lock``).

    ``optional``: for a reader, go on unlocked when the lock file cannot be created (a
    read-only location, where no writer of ours can be at work either).
    """
    if is_url(target):
        with object_writer_lock(str(target), what):
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


# -- object stores --------------------------------------------------------------------------

def object_lock_url(target: str) -> str:
    """The lock object of a store at a URL: ``.<name>.lock`` beside the store's prefix (never
    inside it: replacing the store deletes its prefix)."""
    head, _, name = str(target).rstrip("/").rpartition("/")
    return f"{head}/.{name}.lock"


@contextlib.contextmanager
def object_writer_lock(target: str, what: str = "store",
                       ttl: float = OBJECT_LOCK_TTL_S) -> Iterator[dict]:
    """Hold the writer lock object of the store at URL ``target`` (see the module's notes);
    yields the record it holds (owner, expires). Refused at once (``LockedError``) while
    another writer's lock is live."""
    objectstore.check_access(target)
    url = object_lock_url(target)
    fs, key = objectstore.filesystem(url)
    record = {"owner": f"{socket.gethostname()}:{os.getpid()}", "host": socket.gethostname(),
              "pid": os.getpid(), "token": secrets.token_hex(8), "ttl_s": ttl}
    tag = _take_object_lock(fs, key, record, target, what)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_object_lock, args=(fs, key, record, tag, stop),
                               name="ddpmseg-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield dict(record)
    finally:
        stop.set()
        renewer.join()
        now = objectstore.read_tagged(fs, key)
        if now is not None and _lock_record(now[0]).get("token") == record["token"]:
            objectstore.delete_object(fs, key, now[1])


def _lock_bytes(record: dict) -> bytes:
    record["expires"] = time.time() + record["ttl_s"]
    return json.dumps(record, sort_keys=True).encode()


def _lock_record(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _take_object_lock(fs, key: str, record: dict, target: str, what: str) -> str:
    """Create the lock object, or take over a dead writer's; its tag. LockedError while a
    live writer holds it."""
    for _ in range(5):  # another writer may release or take it between our steps
        if objectstore.create_object(fs, key, _lock_bytes(record)):
            return _own_tag(fs, key, record)
        held = objectstore.read_tagged(fs, key)
        if held is None:
            continue  # released meanwhile: create it again
        holder = _lock_record(held[0])
        if _lock_is_live(holder):
            raise _object_locked(target, what, holder, key)
        log.info("%s %s: taking over the lock of %s (%s)", what, target,
                 holder.get("owner", "an unknown writer"), _why_dead(holder))
        if objectstore.replace_object(fs, key, _lock_bytes(record), held[1]):
            return _own_tag(fs, key, record)
    raise LockedError(f"{what} {target}: its lock {key} keeps changing hands",
                      "another writer is starting; wait for it to finish")


def _own_tag(fs, key: str, record: dict) -> str:
    now = objectstore.read_tagged(fs, key)
    if now is None or _lock_record(now[0]).get("token") != record["token"]:
        raise LockedError(f"the lock {key} was taken by another writer as it was created",
                          "wait for that writer to finish")
    return now[1]


def _lock_is_live(holder: dict) -> bool:
    """Whether a lock record stands for a writer that may still be writing."""
    try:
        expires, pid = float(holder["expires"]), int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False  # not a lock record of ours: nobody renews it
    if expires <= time.time():
        return False
    if holder.get("host") == socket.gethostname() and pid != os.getpid():
        return _pid_alive(pid)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, another user's
    return True


def _why_dead(holder: dict) -> str:
    if not holder.get("expires"):
        return "not a lock record"
    if float(holder["expires"]) <= time.time():
        return "expired " + _when(holder["expires"])
    return f"process {holder.get('pid')} of this host is gone"


def _when(stamp) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(stamp)))


def _object_locked(target: str, what: str, holder: dict, key: str) -> LockedError:
    return LockedError(f"{what} {target} is being written by {holder.get('owner', '?')} (lock "
                       f"object {key}, live until {_when(holder['expires'])})",
                       "wait for it to finish, or stop it; a killed writer's lock is taken "
                       "over once it expires, at once on the writer's own host")


def _renew_object_lock(fs, key: str, record: dict, tag: str, stop: threading.Event) -> None:
    """Push the lock's expiry forward every third of its ttl until ``stop``; a lock that
    another writer took over (ours had expired) is left to it, with a warning."""
    while not stop.wait(record["ttl_s"] / 3):
        try:
            if not objectstore.replace_object(fs, key, _lock_bytes(record), tag):
                log.warning("warning: the writer lock %s was taken over by another writer; "
                            "this one's writes are no longer protected", key)
                return
            tag = _own_tag(fs, key, record)
        except Exception as exc:  # noqa: BLE001 - a lost connection: retried at the next tick
            log.warning("warning: could not renew the writer lock %s (%s)", key, exc)
