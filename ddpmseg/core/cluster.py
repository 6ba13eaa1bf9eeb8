"""dask.distributed for ``scheduler="local[:N]"`` or ``"tcp://host:port"``: parsing the string,
connecting, and running a command's tasks (``run_tasks``), each with the client's torch thread
count; extract and fit use it alike."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from distributed import Client, LocalCluster, Nanny, WorkerPlugin, as_completed, get_worker

from ddpmseg.core.device import use_threads
from ddpmseg.core.errors import ConfigError, DdpmsegError, InputNotFoundError, SchedulerLostError
from ddpmseg.core.fileio import is_url

HINT = "use local, local:N or a scheduler address (tcp://host:8786)"
# distributed's comm protocols that name a host and port.
PROTOCOLS = ("tcp", "tls", "ws", "wss", "ucx")
PROBE_SECONDS = 5.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scheduler:
    """A ``--scheduler`` string, parsed: a LocalCluster (``local``, ``local:N``; ``workers``
    None: the command's default) or the address of a running scheduler."""

    text: str
    local: bool
    workers: int | None = None
    host: str = ""
    port: int = 0


def workers_for(threads: int) -> int:
    """A LocalCluster's workers for a bare ``local``: the cores, ``threads`` each."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))


def parse_scheduler(scheduler: str) -> Scheduler:
    """The one reading of a ``--scheduler`` string; a malformed one is a ConfigError."""
    text = scheduler.strip()
    if text == "local" or text.startswith("local:"):
        n = text.partition(":")[2]
        if n and not (n.isdigit() and int(n) >= 1):
            raise ConfigError(f"bad scheduler {scheduler!r}: N must be a whole number >= 1",
                              HINT)
        return Scheduler(text, True, int(n) if n else None)
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
    return Scheduler(text, False, host=host, port=port)


def check_scheduler(scheduler: str | None, probe: bool = True) -> None:
    """Refuse a malformed scheduler (and, with ``probe``, an address where nothing listens)
    before a command writes anything: a bad one must not leave an empty store or run dir."""
    if not scheduler:
        return
    parsed = parse_scheduler(scheduler)
    if parsed.local or not probe:
        return
    log.info("checking the dask scheduler at %s ...", parsed.text)
    try:
        socket.create_connection((parsed.host, parsed.port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the dask scheduler {parsed.text} "
                          f"({exc.strerror or exc})",
                          "check that it runs and the address, or use `scheduler=local`"
                          ) from None


class _Nanny(Nanny):
    """distributed's nanny, except that it gives its worker process the environment it would
    write into this process's ``os.environ`` before spawning (``OMP_NUM_THREADS=1`` and friends
    from ``distributed.nanny.pre-spawn-environ``, ``PYTHONHASHSEED``) as the worker's own
    environment (``Nanny.env``, set in the child): this process, and whatever it starts later,
    keeps its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pre_spawn_env = {}   # already merged into self.env, which the child applies


def _local_cluster(workers: int) -> LocalCluster:
    # ":0": a free port for the dashboard. None still falls back to 8787, and the cluster then
    # fails to start wherever a notebook's cluster already holds that port.
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        worker_class=_Nanny, dashboard_address=":0",
                        silence_logs=logging.ERROR)


def connect(scheduler: str, default_workers: int):
    """(client, cluster): a LocalCluster of single-threaded worker processes for ``local[:N]``
    (cluster is then ours to close), or a client of a running scheduler (cluster None)."""
    parsed = parse_scheduler(scheduler)
    if parsed.local:
        cluster = _local_cluster(parsed.workers or default_workers)
        return Client(cluster), cluster
    try:
        return Client(parsed.text, timeout=30), None
    except OSError as exc:
        raise ConfigError(f"cannot reach the dask scheduler {parsed.text} ({exc})",
                          "check the address, or use `scheduler=local`") from exc


# -- what workers see -----------------------------------------------------------------------

def absolute(path) -> str:
    """A local path made absolute for a worker (a ``tcp://`` scheduler's workers run in
    folders of their own: a relative path would resolve there); a URL as it is."""
    text = str(path)
    if is_url(text):
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
    if is_url(text) or os.path.exists(text):
        return
    raise InputNotFoundError(
        f"{worker_name()} cannot see {text} ({what})",
        "workers must see the client's files at the same absolute paths (a shared file "
        "system), or use `scheduler=local`")


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
            f"{kept}; start the scheduler again (or use `scheduler=local`) and rerun the same "
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


# -- running tasks ----------------------------------------------------------------------------

def _with_threads(fn: Callable, threads: int | None, *args):
    # Some CPU kernels (1x1 convolutions among them) sum in an order that depends on torch's
    # thread count: a task computes with the client's, so its results are bit-identical to
    # a one-process run, and the worker's own count is restored after it.
    with use_threads(threads):
        return fn(*args)


def run_tasks(scheduler: str, fn: Callable, calls: Sequence[tuple], *, name: str,
              threads: int | None, default_workers: int, doing: str, kept: str,
              plugins: Sequence = ()) -> Iterator:
    """``fn(*args)`` for each ``args`` of ``calls``, as dask tasks on ``scheduler``
    (``session``), each under torch's thread count ``threads``; yields their results as they
    finish. ``plugins``: distributed ``WorkerPlugin``s to register first (state a worker keeps
    between tasks, such as a loaded model). On an error, the tasks not yet done are cancelled."""
    with session(scheduler, default_workers, doing, kept) as client:
        for plugin in plugins:
            client.register_plugin(plugin)
        stamp = f"{os.getpid()}-{time.time_ns()}"
        futures = [client.submit(_with_threads, fn, threads, *args, pure=False,
                                 key=f"ddpmseg-{name}-{k}-{stamp}")
                   for k, args in enumerate(calls)]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:
            for other in futures:
                other.cancel()
            raise


# -- state a worker keeps between a command's tasks ----------------------------------------------

class Opened(WorkerPlugin):
    """What a dask worker's tasks opened (one thing at a time), kept for its later tasks:
    ``worker.plugins[Opened.name].get(key, make)``."""

    name = "ddpmseg-opened"

    def __init__(self):
        self.key: Hashable | None = None
        self.value = None

    def get(self, key: Hashable, make: Callable[[], object]):
        if key != self.key:
            self.value, self.key = None, None   # the old one goes before the new one loads
            self.value, self.key = make(), key
        return self.value


def opened(key: Hashable, make: Callable[[], object]):
    """``make()``, kept by this worker's ``Opened`` for the next task with the same ``key``;
    made afresh outside a worker that has the plugin."""
    try:
        cache = get_worker().plugins.get(Opened.name)
    except ValueError:   # not on a dask worker
        cache = None
    return cache.get(key, make) if cache is not None else make()
