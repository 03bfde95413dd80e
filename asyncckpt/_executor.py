"""The only module that owns threads.

`Workers` holds a pool for work the caller waits on (snapshot copies, restore reads), a pool of
lower-priority threads for background writes, a larger pool for object-store requests (threads
that mostly wait on the network), a single job thread that runs whole saves one after
another, so commits happen in the order `save()` was called, and a single thread that removes the
files of deleted steps without holding up saves. Work that fails raises its first exception in the
thread that waits for it; nothing is only logged.
"""

from __future__ import annotations

import enum
import functools
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, NamedTuple, TypeVar, cast

T = TypeVar("T")


def default_workers() -> int:
    """I/O-bound threads: two per core, at least 4, at most 32. More threads than that contend
    for the GIL on thousands of small chunks and read large ones no faster: on 2 cores, 4
    threads restored 4000 chunks of 16 KiB from disk in 0.49-0.52 s against 0.56-0.61 s with 8
    and 0.60-0.65 s with 16, a 1 GiB tree of 336 chunks in 0.60-0.64 s against 0.61-0.72 s
    (fresh processes, page cache dropped; benchmarks/README.md)."""
    return max(4, min(32, 2 * (os.cpu_count() or 1)))


NETWORK_WORKERS = 64
"""Requests in flight to an object store: each costs a thread waiting on the network, and
per-request latency (tens of ms) bounds throughput unless many are in flight."""


STALL_S = 0.05
"""How long a batch of tasks that runs on fewer threads than it could (`run_all(lanes=...)`)
may go without a task starting or ending before a waiting caller joins it: its threads may be
getting no CPU time (lowered priority under a busy loop)."""


Priority = int | Literal["idle"]
"""How much background threads yield the CPU: "idle" (Linux `SCHED_IDLE`: they run only on CPU
time no other thread wants), or a niceness to add (0 to 19; 0 keeps the caller's priority)."""


def check_priority(priority: Any) -> Priority:
    if priority == "idle" or (
        isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 19
    ):
        return priority
    raise ValueError(f"background_nice must be 'idle' or a niceness from 0 to 19, not {priority!r}")


LINE_END = 0.8
"""A paced save's writes are due by this share of `durable_within_s`: the rest of that time is
for its commit and for work the pacing thread cannot take (tasks that starved threads hold)."""


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET
"""The default of a deprecated argument: not given."""


def check_durable_within(value: Any, urgent_after_s: Any = UNSET) -> float | None:
    """`durable_within_s` as a number of seconds or None; `urgent_after_s`, its name before
    writes were paced, stands in for it with a DeprecationWarning."""
    if urgent_after_s is not UNSET:
        warnings.warn(
            "urgent_after_s is deprecated: use durable_within_s, the seconds after save() by which "
            "a save should be durable however busy the CPU (a writer at your priority now paces "
            "itself to that instead of writing flat out from that time on)",
            DeprecationWarning,
            stacklevel=4,
        )
        value = urgent_after_s
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"durable_within_s must be a number of seconds >= 0 or None (no pacing), got {value!r}"
        )
    return float(value)


def _lower_priority(
    priority: Priority, base: int, tid: int | None = None, lowered: set[int] | None = None
) -> None:
    """Give thread `tid` (default: the calling thread; Linux: priorities are per thread) the
    background priority, niceness `base + priority` (at most 19), and add it to `lowered`.
    From `base`, the niceness of the thread that made the pools, not from the thread's own: a
    pool thread started by a lowered thread (the job thread starts the writers) inherits its
    niceness, and a thread raised by `_pace` and lowered again must get the same. Where the
    idle policy is not available or not allowed, niceness 19 stands in for it."""
    tid = threading.get_native_id() if tid is None else tid
    if lowered is not None:
        lowered.add(tid)
    if priority == "idle":
        if hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                return
            except OSError:
                pass
        priority = 19
    if priority <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, base + priority))
    except OSError:
        pass  # not permitted here: run at normal priority


def _restore_priority(tids: set[int], nice: int) -> set[int]:
    """Give threads `tids` the normal policy and niceness `nice` again where this process may
    (privileges, or an RLIMIT_NICE that allows it); the ones it could."""
    if not hasattr(os, "setpriority"):
        return set()
    done = set()
    for tid in tids:
        try:
            if hasattr(os, "SCHED_OTHER"):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            done.add(tid)
        except OSError:
            pass  # not permitted (or the thread is gone): the pacing thread still helps
    return done


class _Schedule:
    """A save's writes against a straight line from its `save()` to `LINE_END` of `within_s`
    later: the cost of the work expected (`expect`, in bytes and bytes' worth per file) and of
    the work done."""

    def __init__(self, within_s: float) -> None:
        self.start = time.monotonic()
        self.line_s = LINE_END * within_s
        self.total = 0
        self.done = 0
        self._lock = threading.Lock()

    def expect(self, cost: int) -> None:
        with self._lock:
            self.total += cost

    def progress(self, cost: int) -> None:
        with self._lock:
            self.done += cost

    def behind_for(self, now: float) -> float:
        """Seconds the work done is behind the line (negative: ahead of it by that much). Past
        the line's end a save still in flight is behind however much it reported done (its
        commit, on the job thread, reports nothing), and so is a save with no work announced."""
        with self._lock:
            due_at = self.line_s * (self.done / self.total if self.total else 1.0)
        return now - self.start - due_at


class _Batch:
    """Tasks that the threads of a pool, and callers that wait for them, take one at a time.
    After a failure no further task starts; `wait` returns once the started ones have ended.
    `lanes`: the pool threads it runs on, if fewer than the pool's; callers then join it only
    once it stalls (`wants_help`)."""

    def __init__(
        self,
        tasks: Sequence[Callable[[], Any]],
        lanes: int | None = None,
        costs: Sequence[int] | None = None,
        schedule: _Schedule | None = None,
    ) -> None:
        self._tasks: list[Callable[[], Any] | None] = list(tasks)
        self._costs = costs
        self._schedule = schedule
        self._next = 0
        self._running = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.error: BaseException | None = None
        self.lanes = lanes
        self._progress = time.monotonic()  # when a task last started or ended

    def has_work(self) -> bool:
        with self._cond:
            return self.error is None and self._next < len(self._tasks)

    def wants_help(self) -> bool:
        """Whether a waiting caller should take tasks: there are some, and the batch runs on
        all the threads it may, or no task of it started or ended for `STALL_S`."""
        with self._cond:
            return (
                self.error is None
                and self._next < len(self._tasks)
                and (self.lanes is None or time.monotonic() - self._progress >= STALL_S)
            )

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run tasks until none is left (or, before each, `until()` is true). An exception that
        is not an `Exception` (a KeyboardInterrupt in a helping caller) is also raised here,
        after being recorded."""
        while until is None or not until():
            with self._cond:
                if self.error is not None or self._next >= len(self._tasks):
                    return
                index = self._next
                task = self._tasks[self._next]
                self._tasks[self._next] = None  # once taken, only this thread holds it
                self._next += 1
                self._running += 1
                self._progress = time.monotonic()
            assert task is not None
            try:
                task()
            except BaseException as e:
                with self._cond:
                    if self.error is None:
                        self.error = e
                if not isinstance(e, Exception):
                    raise
            finally:
                # Let go of the task (and the buffers it holds) before the waiter wakes: a
                # restore stages its next group as soon as `wait` returns, and the group before
                # must be gone by then (max_inflight_bytes)
                task = None
                # The count first, under the plain lock: entering it is C code, where a
                # KeyboardInterrupt cannot land (on the main thread, a caller helping in
                # `help_until`, one raised here before the count would leave `wait` waiting
                # for ever); `wait` looks again now and then for a notification so lost.
                with self._lock:
                    self._running -= 1
                    self._progress = time.monotonic()
                    self._cond.notify_all()
                if self._schedule is not None and self._costs is not None:
                    self._schedule.progress(self._costs[index])

    def wait(self) -> None:
        with self._cond:
            while not self._cond.wait_for(
                lambda: (
                    self._running == 0
                    and (self.error is not None or self._next >= len(self._tasks))
                ),
                timeout=1.0,
            ):
                pass

    def stop(self, error: BaseException) -> None:
        """Start no further task (the caller that waits for them is gone): `error` says why."""
        with self._lock:
            if self.error is None:
                self.error = error


class Workers:
    """I/O thread pools for work the caller waits on (snapshot copies, restores; one for files,
    one for object-store requests), and, at a lower CPU priority (`background_nice`), pools for
    background writes (to files, to object stores), one thread that runs save jobs in
    submission order and one that removes deleted steps.

    Background threads yield the CPU to the training loop: a save in the background then slows
    training less, and simply takes longer when the CPU is busy. A caller that has to wait for
    a save (`help_until`) writes too, on its own thread at its own priority, so a save never
    waits on the CPU time of a busy machine while the caller does nothing. And a save
    (`submit_save`) has one more writer, the pacing thread, at the priority of the thread that
    made these workers (the caller's), which writes only while the save is behind a straight
    line from its start to `LINE_END` of `durable_within_s` later: a training loop that keeps
    every core busy leaves idle-priority writers almost no CPU time, and the step would not
    become durable for many times its idle duration; written all at once at the caller's
    priority it would slow training down while it lasts (`_pace`)."""

    def __init__(
        self,
        max_workers: int | None = None,
        background_nice: Priority = 0,
        network_workers: int = NETWORK_WORKERS,
        durable_within_s: float | None = None,
    ) -> None:
        self.size = max_workers or default_workers()
        self.network_size = network_workers
        self._priority = check_priority(background_nice)
        self._lowered: set[int] = set()  # the threads of lowered priority
        # the caller's niceness: what background threads are lowered from and raised back to
        self._nice = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
        lower = functools.partial(
            _lower_priority, self._priority, self._nice, lowered=self._lowered
        )
        self._network = ThreadPoolExecutor(
            network_workers, thread_name_prefix="asyncckpt-net", initializer=lower
        )
        # object-store requests the caller waits for (a restore), at its priority: the threads
        # start when the caller first submits to them, and inherit its priority
        self._network_reads = ThreadPoolExecutor(
            network_workers, thread_name_prefix="asyncckpt-netread"
        )
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="asyncckpt-io")
        # one writer per core at most: more runnable writer threads take more CPU time from
        # training, niced or not (big tree: 8 writers slowed a jitted loop 1.30-1.43x, 2 writers
        # on 2 cores 0.96-1.06x, commit time unchanged; benchmarks/README.md)
        self.background_size = min(self.size, max(2, os.cpu_count() or 1))
        self._background = ThreadPoolExecutor(
            self.background_size, thread_name_prefix="asyncckpt-write", initializer=lower
        )
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-job", initializer=lower)
        self._cleanup = ThreadPoolExecutor(
            1, thread_name_prefix="asyncckpt-cleanup", initializer=lower
        )
        self._batches: list[_Batch] = []  # background batches in flight, open to helpers
        self._changed = threading.Condition()
        self.durable_within_s = check_durable_within(durable_within_s)
        self._pacer = None
        self._schedule: _Schedule | None = None  # of the save the job thread is writing
        if self.durable_within_s is not None:
            # made now, on the caller's thread: a thread inherits its maker's priority, and one
            # made later from a lowered thread could not be raised back without privileges
            self._pacer = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-pace")
            self._pacer.submit(lambda: None).result()

    def _threads(self, network: bool, background: bool) -> int:
        return self.network_size if network else self.background_size if background else self.size

    def parts(self, network: bool, background: bool = False) -> int:
        """How many tasks to split work for `run_all(network=..., background=...)` into: enough
        to keep its pool busy, and for background writes 16 per thread, so that a caller who
        starts waiting for a save finds work left to take (`help_until`), and the pacing thread
        keeps close to its line and finds little of its work in the hands of starved threads."""
        threads = self._threads(network, background)
        return 16 * threads if background and not network else threads

    def run_all(
        self,
        tasks: Sequence[Callable[[], Any]],
        *,
        background: bool = False,
        network: bool = False,
        lanes: int | None = None,
        costs: Sequence[int] | None = None,
    ) -> None:
        """Run `tasks` on a pool and wait; on the first failure start no more and raise it.
        `network`: the tasks make object-store requests (a larger pool; lowered with `background`).
        `background`: a save's writes, which a caller in `help_until` also runs.
        `lanes`: on at most this many of the pool's threads, for tasks that hold the GIL most of
        their time (thousands of small files): more threads only hand it to each other (a save
        of 4000 small leaves on 2 writers took 0.76 CPU s, on 1 0.33 s; benchmarks/README.md);
        a caller in `help_until` joins them only if they stall.
        `costs`: each task's share of the save's work announced by `expect`, counted as done
        when it ends (`submit_save`)."""
        if len(tasks) <= 1 and not background:
            for task in tasks:
                task()
            return
        if network:
            pool = self._network if background else self._network_reads
        else:
            pool = self._background if background else self._pool
        threads = self._threads(network, background)
        batch = _Batch(
            tasks,
            lanes if lanes is not None and lanes < threads else None,
            costs,
            self._schedule if background else None,
        )
        if background:
            with self._changed:
                self._batches.append(batch)
                self._changed.notify_all()
        try:
            for _ in range(min(len(tasks), batch.lanes or threads)):
                pool.submit(batch.run)
            batch.wait()
        except BaseException as e:  # a KeyboardInterrupt while waiting: stop the tasks too
            batch.stop(e)
            raise
        finally:
            if background:
                with self._changed:
                    self._batches.remove(batch)
        error = batch.error
        del batch  # it holds the error, whose traceback holds this frame: no cycle through it
        if error is not None:
            try:
                raise error
            finally:
                error = None

    def help_until(self, future: Future[Any]) -> None:
        """Run the background writes of the saves in flight on the calling thread until `future`
        is done: the caller waits for a save, so it lends its thread (and priority) to it;
        to a batch on fewer threads than the pool's (`lanes`) only once it stalls."""
        future.add_done_callback(lambda _: self._notify())
        while not future.done():
            with self._changed:
                batch = next((b for b in self._batches if b.wants_help()), None)
                if batch is None:
                    if not future.done():  # woken by a batch, the save's end, or to look again
                        self._changed.wait(STALL_S if any(b.lanes for b in self._batches) else None)
                    continue
            batch.run()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def run_reads(
        self, tasks: Sequence[tuple[int, Callable[[], Any]] | Read], *, network: bool = False
    ) -> None:
        """Run `(cost in bytes, task)` pairs, grouped into about one batch per thread of the
        pool (each task also costs 8 KiB of overhead; on disk a group holds at least 1 MiB, so
        thousands of small chunks do not each pay the pool's per-task cost).

        Small reads that say how to fetch their data ahead (`Read.prefetch`, on a file system)
        run in order on one thread instead (`_run_ahead`), beside the others: each costs more
        Python than copying, and more threads only hand the GIL to each other. 4000 chunks of
        16 KiB were read warm in 0.07-0.10 s against 0.14-0.19 s on 4 threads, and from disk in
        0.19-0.20 s (prefetched) against 0.21-0.25 s (0.34 s on one thread without it). The
        other groups prefetch ahead of themselves too when they can (`_run_ahead`): a thread
        that asks the disk for one chunk at a time leaves its queue short (compare_orbax's llm
        tree, 1 GiB in chunks of 0.3-6 MB, read from a dropped page cache in 0.43-0.48 s
        against 0.56-0.62 s)."""
        serial: list[Read] = []
        rest: list[tuple[int, Callable[[], Any]] | Read] = []
        for t in tasks:
            if isinstance(t, Read) and t.prefetch and t.cost < SERIAL_READ_BYTES and not network:
                serial.append(t)
            else:
                rest.append(t)
        groups = batches(
            rest,
            lambda t: t[0] + 8192,
            parts=self.parts(network),
            min_cost=1 if network else 1 << 20,
        )
        jobs = [functools.partial(_run_group, g) for g in groups]
        if serial:
            jobs.insert(0, functools.partial(_run_ahead, serial))  # likely the longest: first
        self.run_all(jobs, network=network)

    def adopt(self, tids: Iterable[int]) -> None:
        """Give threads this module did not start (`tids`: native ids, e.g. jaxlib's transfer
        threads that carry a save's copies to peers) the background priority, and raise them
        with the other lowered threads when a save falls behind (`_pace`)."""
        for tid in tids:
            if tid not in self._lowered:
                _lower_priority(self._priority, self._nice, tid, self._lowered)

    def submit_job(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the job thread, after every job submitted before it."""
        return self._jobs.submit(fn, *args)

    def submit_save(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """`submit_job` for a save: the work it announces (`expect`) and runs in background
        batches (`run_all(costs=...)`) is paced by the pacing thread (`_pace`) to be done
        `LINE_END` of `durable_within_s` from now, however busy the CPU."""
        if self._pacer is None:
            return self._jobs.submit(fn, *args)
        schedule = _Schedule(cast(float, self.durable_within_s))

        def job() -> T:
            self._schedule = schedule
            try:
                return fn(*args)
            finally:
                self._schedule = None

        future = self._jobs.submit(job)
        future.add_done_callback(lambda _: self._notify())
        self._pacer.submit(self._pace, schedule, future)
        return future

    def expect(self, cost: int) -> None:
        """Announce work of `cost` (bytes, and bytes' worth per file) that the save being
        written will run in `run_all(costs=...)`, or do itself."""
        if self._schedule is not None:
            self._schedule.expect(cost)

    def _pace(self, schedule: _Schedule, future: Future[Any]) -> None:
        """Write for the save of `future`, on the pacing thread at the caller's priority, while
        its work is behind its line, and wait while it is ahead: the idle-priority writers do
        what spare CPU time allows, this thread the rest, spread over the line's time rather
        than all at once (under a jitted loop on both cores of the test machine, 1 GB saves
        became durable in 2.5-2.8 s at the default 3 s and slowed the 1.5 s of training after
        `save()` 1.07x, against 1.2-1.4 s and 1.10-1.16x at 0; benchmarks/README.md).
        While the save is behind and nothing is left to take for `STALL_S` (tasks that the
        lowered threads hold, the job thread's own work), those threads get the caller's
        priority back where the process may raise priorities, until the save is ahead again;
        past the line's end, until it is done.
        Saves one after another: each waits for this thread to be done with the one before."""
        raised: set[int] = set()
        tried = False  # raising them, since the save was last ahead
        empty_since: float | None = None
        try:
            while not future.done():
                now = time.monotonic()
                if not tried and now - schedule.start >= schedule.line_s:
                    # past the line's end: every thread the save waits for, at full priority
                    raised, tried = _restore_priority(set(self._lowered), self._nice), True
                behind = schedule.behind_for(now)
                if behind < 0:  # (never past the line's end)
                    empty_since, tried = None, False
                    raised = self._lower(raised)
                    with self._changed:
                        if not future.done():
                            self._changed.wait(min(0.1, max(0.001, -behind)))
                    continue
                with self._changed:
                    batch = next((b for b in self._batches if b.wants_help()), None)
                    if batch is None:
                        empty_since = now if empty_since is None else empty_since
                        if not tried and now - empty_since >= STALL_S:
                            raised, tried = _restore_priority(set(self._lowered), self._nice), True
                        if not future.done():
                            self._changed.wait(STALL_S)
                        continue
                empty_since = None
                batch.run(until=lambda: schedule.behind_for(time.monotonic()) < 0)
        finally:
            self._lower(raised)

    def _lower(self, tids: set[int]) -> set[int]:
        """Give threads `tids`, raised by `_pace`, the background priority again."""
        for tid in tids:
            _lower_priority(self._priority, self._nice, tid)
        return set()

    def submit_cleanup(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the clean-up thread (deleting files nobody waits for)."""
        return self._cleanup.submit(fn, *args)

    def close(self) -> None:
        """Wait for submitted work, then stop the threads."""
        self._jobs.shutdown(wait=True)
        if self._pacer is not None:
            self._pacer.shutdown(wait=True)
        self._cleanup.shutdown(wait=True)
        self._background.shutdown(wait=True)
        self._network.shutdown(wait=True)
        self._network_reads.shutdown(wait=True)
        self._pool.shutdown(wait=True)


def at_interpreter_exit(callback: Callable[[], None]) -> None:
    """Call `callback` when the interpreter exits normally, while thread pools still take work.

    `atexit` is too late for that: before its handlers run, `concurrent.futures` has stopped
    every pool from taking new work, so a save still in flight would fail. Python's own pools
    use `threading._register_atexit` for this moment; it exists in every Python asyncckpt
    supports, and `atexit` stands in where it does not."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        import atexit

        atexit.register(callback)
    else:
        register(callback)


class Read(NamedTuple):
    """A task of `Workers.run_reads`: its cost in bytes, the read itself, and what starts
    fetching its data without waiting for it (`Storage.prefetch`), if anything."""

    cost: int
    run: Callable[[], Any]
    prefetch: Callable[[], Any] | None = None


SERIAL_READ_BYTES = 256 << 10
"""Reads smaller than this that can be prefetched run on one thread (`run_reads`): below it a
read's Python costs about as much as its copy. (Restores map chunks of this size and more.)"""

AHEAD_READS, AHEAD_BYTES = 64, 16 << 20
"""How far `_run_ahead` prefetches ahead of its reads: in reads, and in their bytes (a thread
each: `run_reads` may run several)."""


def _run_group(group: Sequence[tuple[int, Callable[[], Any]] | Read]) -> None:
    reads = [t for t in group if isinstance(t, Read)]
    if len(reads) == len(group):
        _run_ahead(reads)  # each prefetched some reads before it, where it can be
        return
    for task in group:
        task[1]()


def _run_ahead(reads: Sequence[Read]) -> None:
    """Run `reads` in order, each one's `prefetch` called up to `AHEAD_READS` reads (and
    `AHEAD_BYTES`, or one read) before it: the disk gets many requests at once from one
    thread."""
    ahead = pending = 0  # reads[:ahead] were prefetched; `pending` bytes of them not yet read
    for i, read in enumerate(reads):
        while (
            ahead < len(reads) and ahead - i < AHEAD_READS and (pending < AHEAD_BYTES or ahead == i)
        ):
            prefetch = reads[ahead].prefetch
            if prefetch is not None:
                prefetch()
            pending += reads[ahead].cost
            ahead += 1
        read.run()
        pending -= read.cost


def batches(
    items: Sequence[T], cost: Callable[[T], int], *, parts: int, min_cost: int
) -> list[list[T]]:
    """Split `items` into about `parts` groups of similar total cost, none (but the last) cheaper
    than `min_cost`: enough groups to keep every thread busy, few enough that the per-task cost
    of the pool does not dominate thousands of small items."""
    return weighed_batches(items, cost, parts=parts, min_cost=min_cost)[0]


def weighed_batches(
    items: Sequence[T], cost: Callable[[T], int], *, parts: int, min_cost: int
) -> tuple[list[list[T]], list[int]]:
    """`batches`, and the total cost of each (`cost` is called once an item)."""
    costs = [cost(i) for i in items]
    target = max(min_cost, sum(costs) // max(1, parts))
    groups: list[list[T]] = []
    totals: list[int] = []
    acc = target
    for item, c in zip(items, costs):
        if acc >= target:
            groups.append([])
            totals.append(0)
            acc = 0
        groups[-1].append(item)
        totals[-1] += c
        acc += c
    return groups, totals
