"""Per-image work of predict, suggest and verify as dask tasks (``core.cluster.run_tasks``).

A command's images are split into chunks, one task each; a task returns one result per item
of its chunk, and :func:`in_order` hands them back in the items' order, so that the client
writes exactly what one process writes. A worker keeps what its tasks opened (a run and its
source, a store) for the next task of the same command (``core.cluster.Opened``), instead of loading
the model once per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from ddpmseg.core.cluster import Opened, run_tasks, workers_for

# Tasks per worker: enough that a slow worker does not hold the end back, few enough that
# each task's opening costs little.
CHUNKS_PER_WORKER = 4


def chunked(items: Sequence, workers: int) -> list[list]:
    """``items`` in consecutive chunks, ``CHUNKS_PER_WORKER`` per worker (at least 1 item)."""
    size = max(1, -(-len(items) // (workers * CHUNKS_PER_WORKER)))
    return [list(items[k:k + size]) for k in range(0, len(items), size)]


def _indexed(fn: Callable, k: int, setup, chunk: list) -> tuple[int, list]:
    return k, fn(setup, chunk)


def in_order(scheduler: str, fn: Callable, setup, items: Sequence, *, name: str,
             doing: str, kept: str = "nothing is written until every image is done"
             ) -> Iterator:
    """``fn(setup, chunk)`` (one result per item of ``chunk``) over ``items`` in chunks, as
    dask tasks on ``scheduler`` at this process's torch thread count; yields the results one
    by one in the order of ``items``, whatever order the tasks finish in. ``fn`` must be a
    module-level function (tasks pickle it by name) and ``setup`` picklable."""
    if not items:
        return
    threads = torch.get_num_threads()
    workers = workers_for(threads)
    chunks = chunked(items, workers)
    tasks = run_tasks(scheduler, _indexed, [(fn, k, setup, c) for k, c in enumerate(chunks)],
                      name=name, threads=threads, default_workers=workers, doing=doing,
                      kept=kept, plugins=[Opened()])
    waiting: dict[int, list] = {}
    next_k = 0
    with contextlib.closing(tasks):
        for k, results in tasks:
            waiting[k] = results
            while next_k in waiting:
                yield from waiting.pop(next_k)
                next_k += 1
