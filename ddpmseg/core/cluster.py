"""Connecting to dask.distributed for ``--scheduler local[:N]|tcp://host:port``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from distributed import Client, LocalCluster, get_worker

from ddpmseg.core.errors import ConfigError, DdpmsegError, InputNotFoundError, SchedulerLostError

HINT = "use local, local:N or a scheduler address (tcp://host:8786)"
# distributed's comm protocols that name a host and port.
PROTOCOLS = ("tcp", "tls", "ws", "wss", "ucx")
PROBE_SECONDS = 5.0

log = logging.getLogger(__name__)


def check_scheduler(scheduler: str | None, probe: bool = True) -> None:
    """Refuse a malformed --scheduler (and, with ``probe``, an address where nothing listens)
    before a command writes anything: a bad one must not leave an empty store or run dir."""
    if not scheduler:
        return
    text = scheduler.strip()
    if text == "local" or text.startswith("local:"):
        n = text.partition(":")[2]
        if n and not (n.isdigit() and int(n) >= 1):
            raise ConfigError(f"bad scheduler {scheduler!r}: N must be a whole number >= 1",
                              HINT)
        return
    if "://" not in text:
        raise ConfigError(f"bad scheduler {scheduler!r}", HINT)
    parts = urlsplit(text)
    if parts.scheme not in PROTOCOLS:
        raise ConfigError(f"bad scheduler {scheduler!r}: unknown protocol {parts.scheme!r} "
                          f"(dask speaks {', '.join(PROTOCOLS)})", HINT)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"bad scheduler {scheduler!r}: no host:port", HINT)
    if probe:
        log.info("checking the dask scheduler at %s ...", text)
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        except OSError as exc:
            raise ConfigError(f"cannot reach the dask scheduler {text} "
                              f"({exc.strerror or exc})",
                              "check that it runs and the address, or use --scheduler local"
                              ) from None


@contextlib.contextmanager
def _environ_kept():
    # Starting worker processes writes OMP_NUM_THREADS=1 and friends into this process's
    # os.environ; any subprocess started later would then compute with other thread counts.
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def connect(scheduler: str, default_workers: int):
    """(client, cluster): a LocalCluster of single-threaded worker processes for ``local[:N]``
    (cluster is then ours to close), or a client of a running scheduler (cluster None)."""
    check_scheduler(scheduler, probe=False)
    text = scheduler.strip()
    if text == "local" or text.startswith("local:"):
        n = text.partition(":")[2]
        try:
            workers = int(n) if n else default_workers
        except ValueError:
            raise ConfigError(f"bad scheduler {scheduler!r}", HINT) from None
        if workers < 1:
            raise ConfigError(f"bad scheduler {scheduler!r}: N must be at least 1", HINT)
        # ":0": a free port for the dashboard. None still falls back to 8787, and the cluster
        # then fails to start wherever a notebook's cluster already holds that port.
        with _environ_kept():
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.ERROR)
        return Client(cluster), cluster
    if "://" not in text:
        raise ConfigError(f"bad scheduler {scheduler!r}", HINT)
    try:
        return Client(text, timeout=30), None
    except OSError as exc:
        raise ConfigError(f"cannot reach the dask scheduler {text} ({exc})",
                          "check the address, or use --scheduler local") from exc


# -- what workers see -----------------------------------------------------------------------

def absolute(path) -> str:
    """A local path made absolute for a worker (a ``tcp://`` scheduler's workers run in
    folders of their own: a relative path would resolve there); a URL as it is."""
    text = str(path)
    if "://" in text:
        return text
    return str(Path(text).expanduser().absolute())


def worker_name() -> str:
    """This worker's address, or "this process" outside a dask worker."""
    try:
        return f"worker {get_worker().address}"
    except ValueError:
        return "this process"


def worker_must_see(path, what: str) -> None:
    """On a worker: refuse, naming this worker and the path, a local path it cannot see."""
    text = str(path)
    if "://" in text or os.path.exists(text):
        return
    raise InputNotFoundError(
        f"{worker_name()} cannot see {text} ({what})",
        "workers must see the client's files at the same absolute paths (a shared file "
        "system), or use --scheduler local")


# -- a session with a scheduler ---------------------------------------------------------------

@contextlib.contextmanager
def session(scheduler: str, default_workers: int, doing: str, kept: str):
    """A client of ``scheduler`` (``connect``), closed at the end. A scheduler lost meanwhile
    is one ``SchedulerLostError`` line (``doing``: what was under way; ``kept``: what is
    finished and stays) instead of distributed's cancelled futures and its logged tracebacks."""
    client, cluster = connect(scheduler, default_workers)
    # distributed logs each failed reconnection with a traceback: the error below says it.
    # (dask's logging config gives some of its loggers levels of their own: set each.)
    names = ["distributed"] + [n for n in logging.root.manager.loggerDict
                               if n.startswith("distributed.")]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield client
    except (DdpmsegError, KeyboardInterrupt):
        raise
    except (concurrent.futures.CancelledError, OSError, TimeoutError) as exc:
        if client.status == "running":
            raise
        why = ("its connection closed" if isinstance(exc, concurrent.futures.CancelledError)
               else f"{type(exc).__name__}: {_first_line(exc)}")
        raise SchedulerLostError(
            f"lost the dask scheduler {scheduler.strip()} while {doing} ({why})",
            f"{kept}; start the scheduler again (or use --scheduler local) and rerun the same "
            "command to resume") from exc
    finally:
        try:
            client.close(timeout=10)
        except Exception:  # noqa: BLE001 - a client whose scheduler is gone closes anyway
            pass
        if cluster is not None:
            cluster.close()
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else "no detail"
