"""The only module that owns threads.

`Workers` holds a pool for work the caller waits on (snapshot copies, restore reads), a pool of
lower-priority threads for background writes, a larger pool for object-store requests (threads
that mostly wait on the network), a single job thread that runs whole saves one after
another, so commits happen in the order `save()` was called, and a single thread that removes the
files of deleted steps without holding up saves. Work that fails raises its first exception in the
thread that waits for it; nothing is only logged.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")


def default_workers() -> int:
    """I/O-bound threads: a few per core, at least 4, at most 32."""
    return max(4, min(32, 4 * (os.cpu_count() or 1)))


NETWORK_WORKERS = 64
"""Requests in flight to an object store: each costs a thread waiting on the network, and
per-request latency (tens of ms) bounds throughput unless many are in flight."""


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness by `nice` (Linux: priorities are per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass  # not permitted here: run at normal priority


class Workers:
    """An I/O thread pool for work the caller waits on (snapshot copies, restores), and, at a
    lower CPU priority (`background_nice`), a pool for background writes, one thread that runs
    save jobs in submission order and one that removes deleted steps.

    Background threads yield the CPU to the training loop: a save in the background then slows
    training less, and simply takes longer when the CPU is busy."""

    def __init__(self, max_workers: int | None = None, background_nice: int = 0,
                 network_workers: int = NETWORK_WORKERS) -> None:
        self.size = max_workers or default_workers()
        self.network_size = network_workers
        lower = functools.partial(_lower_priority, background_nice)
        self._network = ThreadPoolExecutor(network_workers, thread_name_prefix="asyncckpt-net",
                                           initializer=lower)
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="asyncckpt-io")
        # one writer per core at most: more runnable writer threads take more CPU time from
        # training, niced or not (big tree: 8 writers slowed a jitted loop 1.30-1.43x, 2 writers
        # on 2 cores 0.96-1.06x, commit time unchanged; benchmarks/README.md)
        self.background_size = min(self.size, max(2, os.cpu_count() or 1))
        self._background = ThreadPoolExecutor(self.background_size,
                                               thread_name_prefix="asyncckpt-write",
                                               initializer=lower)
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-job", initializer=lower)
        self._cleanup = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-cleanup",
                                           initializer=lower)

    def parts(self, network: bool, background: bool = False) -> int:
        """How many tasks keep the pool that `run_all(network=..., background=...)` uses busy."""
        return (self.network_size if network else self.background_size if background
                else self.size)

    def run_all(self, tasks: Sequence[Callable[[], Any]], *, background: bool = False,
                network: bool = False) -> None:
        """Run `tasks` on a pool and wait; on the first failure cancel the rest and raise it.
        `network`: the tasks make object-store requests (the larger, lower-priority pool)."""
        if len(tasks) <= 1:
            for task in tasks:
                task()
            return
        pool = self._network if network else self._background if background else self._pool
        futures = [pool.submit(task) for task in tasks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for f in pending:
                f.cancel()
            wait(pending)  # let running tasks finish before the caller cleans up
            raise failed[0].exception()  # type: ignore[misc]

    def run_reads(self, tasks: Sequence[tuple[int, Callable[[], Any]]], *,
                  network: bool = False) -> None:
        """Run `(cost in bytes, task)` pairs, grouped into about one batch per thread of the
        pool (each task also costs 8 KiB of overhead; on disk a group holds at least 1 MiB, so
        thousands of small chunks do not each pay the pool's per-task cost)."""
        groups = batches(tasks, lambda t: t[0] + 8192, parts=self.parts(network),
                         min_cost=1 if network else 1 << 20)
        self.run_all([functools.partial(_run_group, g) for g in groups], network=network)

    def submit_job(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the job thread, after every job submitted before it."""
        return self._jobs.submit(fn, *args)

    def submit_cleanup(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the clean-up thread (deleting files nobody waits for)."""
        return self._cleanup.submit(fn, *args)

    def close(self) -> None:
        """Wait for submitted work, then stop the threads."""
        self._jobs.shutdown(wait=True)
        self._cleanup.shutdown(wait=True)
        self._background.shutdown(wait=True)
        self._network.shutdown(wait=True)
        self._pool.shutdown(wait=True)


def _run_group(group: Sequence[tuple[int, Callable[[], Any]]]) -> None:
    for _, task in group:
        task()


def batches(
    items: Sequence[T], cost: Callable[[T], int], *, parts: int, min_cost: int
) -> list[list[T]]:
    """Split `items` into about `parts` groups of similar total cost, none (but the last) cheaper
    than `min_cost`: enough groups to keep every thread busy, few enough that the per-task cost
    of the pool does not dominate thousands of small items."""
    total = sum(cost(i) for i in items)
    target = max(min_cost, total // max(1, parts))
    groups: list[list[T]] = [[]]
    acc = 0
    for item in items:
        if acc >= target and groups[-1]:
            groups.append([])
            acc = 0
        groups[-1].append(item)
        acc += cost(item)
    return [g for g in groups if g]
