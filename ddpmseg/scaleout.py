"""Connecting to dask.distributed for ``--scheduler local[:N]|tcp://host:port``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlsplit

from distributed import Client, LocalCluster

from .errors import ConfigError

HINT = "use local, local:N or a scheduler address (tcp://host:8786)"
# distributed's comm protocols that name a host and port.
PROTOCOLS = ("tcp", "tls", "ws", "wss", "ucx")
PROBE_SECONDS = 5.0

log = logging.getLogger("ddpmseg")


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
