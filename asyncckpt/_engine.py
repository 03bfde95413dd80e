"""`Engine`: what `AsyncCheckpointer` and `CheckpointManager` both stand on.

It holds the threads (`Workers`), the host memory kept between saves (`ArenaPool`) and the saves
in flight, in order. A save: on the caller's thread, wait for the previous save (lending the
thread to it), check the destination and the root fields, take the snapshot; then one job on the
job thread writes and commits it (`_save.write_snapshot`). Jobs run one after another in the
order they were submitted, so a manager submits its retention as the job after its save
(`submit`) and knows it runs once the step is committed. A background failure is raised by the
next `save`, `check_for_errors`, `wait_until_finished` or `close`; at interpreter exit the saves
in flight are finished (or their failure logged) even if nobody calls `close`.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import jax

from . import _distributed, _format, _restore, _save, _telemetry
from ._executor import (
    UNSET,
    Priority,
    Workers,
    _Unset,
    at_interpreter_exit,
    check_durable_within,
)
from ._snapshot import ArenaPool, Snapshot, take_snapshot
from ._storage import Storage
from .errors import ClosedError

DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30
DEFAULT_BARRIER_TIMEOUT_S = 300.0
DEFAULT_BACKGROUND_NICE: Priority = "idle"
DEFAULT_DURABLE_WITHIN_S: float | None = 3.0
"""A save under a loop that keeps every core busy is paced to be written in 2.4 s (`LINE_END`)
and durable in about 3 (2.5-2.8 s for 1 GB under a loop on both cores here, where the idle
writers alone took 10 s and more), slow enough that the 1.5 s of training after `save()` lose
about half of what a save written at once costs them (4000 small leaves: two thirds);
benchmarks/README.md, "Paced writes"."""
log = logging.getLogger("asyncckpt")
T = TypeVar("T")


def check_inflight(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_inflight_bytes must be a positive number of bytes, got {value!r}")


class Engine:
    """Threads, host memory and the ordered saves of one checkpointer or manager."""

    def __init__(
        self,
        *,
        owner: str,
        max_workers: int | None = None,
        reuse_host_memory: bool = True,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        map_files: bool = True,
        read_once: bool | None = None,
        barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
        background_nice: Priority = DEFAULT_BACKGROUND_NICE,
        durable_within_s: float | None = DEFAULT_DURABLE_WITHIN_S,
        urgent_after_s: float | None | _Unset = UNSET,
        close_at_exit: Callable[[], None] | None = None,
    ) -> None:
        """`close_at_exit`: what finishes the owner's work at interpreter exit (default: this
        engine's `close`; a manager also waits for its retention and file removals)."""
        check_inflight(max_inflight_bytes)
        self.owner = owner
        self._close_at_exit = (
            close_at_exit  # for messages: "this AsyncCheckpointer", "this CheckpointManager of X"
        )
        self.workers = Workers(
            max_workers,
            background_nice=background_nice,
            durable_within_s=check_durable_within(durable_within_s, urgent_after_s),
        )
        self.barrier_timeout_s = barrier_timeout_s
        self.max_inflight_bytes = max_inflight_bytes
        self.map_files = map_files
        self.read_once = read_once
        self._pool = ArenaPool(enabled=reuse_host_memory)
        # (destination, its save); callers on several threads may check and wait: under _lock
        self._pending: list[tuple[str, Future[str]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.last_save: _telemetry.SaveStats | None = None
        self.last_restore: _telemetry.RestoreStats | None = None

    # -- saving ----------------------------------------------------------------------------------

    def save(
        self,
        dest: Storage | None,
        tree: Any,
        *,
        fields: _format.RootFields,
        force: bool,
        previous: Callable[[], Storage | None] | None = None,
        spare: Callable[[], Storage | None] | None = None,
        local: Storage | None = None,
        extra: Callable[[Any], tuple[dict[str, list[Any]], Callable[[], None] | None]]
        | None = None,
    ) -> Future[str]:
        """Snapshot `tree` (the only blocking part) and write it to `dest` on the job thread,
        with the root-document `fields` (`_format.root_fields`, checked by the caller); the
        future's result is the committed location. `previous`: called on the job thread when the
        save writes, it names a committed checkpoint whose chunks of unchanged content are
        reused, not written. `spare`: called likewise, it hands over the files of a deleted
        step to write over (`_save.begin_write`). `local`: also (first) write this process's
        part of a node-local step there, every replica it holds, from the same snapshot
        (`_save.write_local_part`); `dest` may then be None. `extra`: called with `tree` on
        this thread before the snapshot, it returns more chunks for the local part, by variable
        name (the shards peers send this process: `LocalTier.replicate`), and work for the job
        thread to do first when it writes the local part (offering this process's shards to
        its peers), or None."""
        self.check_open()
        target = dest if dest is not None else local
        assert target is not None
        t0 = time.perf_counter()
        for _, fut in self._saves():  # one save in flight at a time bounds host memory
            self.workers.help_until(fut)  # waiting: write on this thread too
        phases = _telemetry.Phases()
        phases.add("wait_previous", time.perf_counter() - t0)
        self.check_for_errors()
        if dest is not None:
            dest.check_writable(replace=force)
        coord = local_coord = None
        if _distributed.is_multi_process():
            if dest is not None:
                coord = _distributed.Coordinator(f"save {dest.url}", self.barrier_timeout_s)
            if local is not None:  # each host names its own directory: key by step
                local_coord = _distributed.Coordinator(
                    f"local save {fields.step}", self.barrier_timeout_s
                )
        with phases("snapshot"):
            received, offer = extra(tree) if extra is not None else ({}, None)
            snap = take_snapshot(
                tree,
                self.workers,
                self._pool,
                process_index=jax.process_index() if _distributed.is_multi_process() else 0,
                every_replica=local is not None,
            )
            if received:  # a loop over every array costs 1 ms a 4000-leaf save
                for array in snap.arrays:
                    array.extra.extend(received.get(array.spec.name, ()))
        phases.add("blocking", time.perf_counter() - t0)
        future = self.workers.submit_save(
            self._write,
            snap,
            dest,
            force,
            fields,
            coord,
            phases,
            t0,
            previous,
            spare,
            local,
            local_coord,
            offer,
        )
        with self._lock:
            self._pending.append((target.url, future))
        _finish_at_exit(self)
        return future

    def _write(
        self,
        snap: Snapshot,
        dest: Storage | None,
        replace: bool,
        fields: _format.RootFields,
        coord: _distributed.Coordinator | None,
        phases: _telemetry.Phases,
        t0: float,
        previous: Callable[[], Storage | None] | None,
        spare: Callable[[], Storage | None] | None,
        local: Storage | None,
        local_coord: _distributed.Coordinator | None,
        offer: Callable[[], None] | None,
    ) -> str:
        try:
            if local is not None:
                _save.write_local_part(
                    snap,
                    local,
                    self.workers,
                    replace=replace,
                    fields=fields,
                    coord=local_coord,
                    phases=phases,
                    offer=offer,
                )
            if dest is not None:
                _save.write_snapshot(
                    snap,
                    dest,
                    self.workers,
                    replace=replace,
                    fields=fields,
                    coord=coord,
                    phases=phases,
                    previous=previous() if previous is not None else None,
                    spare=spare() if spare is not None else None,
                )
        finally:
            if snap.arena is not None:
                self._pool.release(snap.arena)
        target = dest if dest is not None else local
        assert target is not None
        stats = _telemetry.SaveStats(
            path=target.url,
            step=fields.step,
            created=snap.created,
            arrays=len(snap.arrays),
            bytes=sum(d.nbytes for a in snap.arrays for _, d in a.chunks),
            blocking_s=phases["blocking"],
            wait_previous_s=phases["wait_previous"],
            snapshot_s=phases["snapshot"],
            write_s=phases["write"],
            commit_s=phases["commit"],
            retention_s=0.0,
            total_s=time.perf_counter() - t0,
            reused_bytes=sum(d.nbytes for a in snap.arrays for c, d in a.chunks if c in a.reused),
        )
        self.last_save = stats
        # a manager's save is reported once its retention (the next job) has run
        if fields.step is None:
            _telemetry.report("save", stats)
        return target.url

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the job thread, after every save and job submitted before it."""
        self.check_open()
        return self.workers.submit_job(fn, *args)

    def submit_cleanup(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the clean-up thread (removing files nobody waits for)."""
        return self.workers.submit_cleanup(fn, *args)

    def wait_for(self, future: Future[Any]) -> Any:
        """The result of a save or job, writing on this thread while it is not done."""
        self.workers.help_until(future)
        return future.result()

    def wait_done(self, future: Future[Any]) -> None:
        """Wait until a save or job is done, writing on this thread meanwhile; its failure is
        left for whoever checks it."""
        self.workers.help_until(future)

    # -- restoring -------------------------------------------------------------------------------

    def restore(
        self,
        src: Storage,
        target: Any,
        *,
        strict: bool,
        step: int | None = None,
        local_key: str | None = None,
    ) -> Any:
        """`asyncckpt.restore` of `src` with this engine's threads and options (`local_key`: see
        `_restore.restore_tree`)."""
        value, self.last_restore = timed_restore(
            src,
            target,
            strict,
            self.workers,
            self.max_inflight_bytes,
            self.map_files,
            step,
            self.barrier_timeout_s,
            local_key,
            read_once=self.read_once,
        )
        return value

    # -- lifecycle -------------------------------------------------------------------------------

    def _saves(self) -> list[tuple[str, Future[str]]]:
        with self._lock:
            return list(self._pending)

    def check_for_errors(self) -> None:
        """Raise the first failure of a finished save (once), if any."""
        error = None
        with self._lock:  # take finished saves off the list up to the first failed one
            for item in list(self._pending):
                if item[1].done():
                    self._pending.remove(item)
                    if (error := item[1].exception()) is not None:
                        break
        if error is not None:
            raise error

    def wait_until_finished(self) -> None:
        """Block until every save made so far has committed; raise the first failure."""
        while saves := self._saves():
            self.workers.help_until(saves[0][1])
            self.check_for_errors()

    def close(self) -> None:
        """Wait for the saves in flight, stop the threads, free held host memory."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self.workers.close()
            self._pool.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.owner} is closed; open a new one")

    def finish_before_exit(self) -> None:
        """At interpreter exit: wait for the saves still in flight, saying so, and log (never
        drop) a failure, since nobody is left to raise it to."""
        if self._closed or not self._saves():
            return
        running = [dest for dest, fut in self._saves() if not fut.done()]
        if running:
            log.warning(
                "asyncckpt: the program is exiting; waiting for %d save(s) to commit: %s "
                "(call close() or use `with` to wait explicitly)",
                len(running),
                ", ".join(running),
            )
        try:
            (self._close_at_exit or self.close)()
        except BaseException as e:  # at exit there is no caller to raise to
            log.error(
                "asyncckpt: work in flight failed before the program exited (a save that "
                "failed was not committed): %s",
                e,
            )


_unfinished: weakref.WeakSet[Engine] = weakref.WeakSet()
_unfinished_lock = threading.Lock()
_hooked = False


def _finish_at_exit(engine: Engine) -> None:
    """Make sure the saves of `engine` are committed (or their failure logged) before the
    interpreter exits, even if the program never calls `close()`."""
    global _hooked
    with _unfinished_lock:
        if not _hooked:
            at_interpreter_exit(_finish_all)
            _hooked = True
        _unfinished.add(engine)


def _finish_all() -> None:
    for engine in list(_unfinished):
        engine.finish_before_exit()
    _unfinished.clear()


def timed_restore(
    src: Storage,
    target: Any,
    strict: bool,
    workers: Workers,
    max_inflight_bytes: int,
    map_files: bool,
    step: int | None,
    barrier_timeout_s: float,
    local_key: str | None = None,
    *,
    read_once: bool | None = None,
) -> tuple[Any, _telemetry.RestoreStats]:
    """`_restore.restore_tree`, timed by phase and reported (`_telemetry.report`)."""
    phases = _telemetry.Phases()
    t0 = time.perf_counter()
    value = _restore.restore_tree(
        src,
        target,
        strict=strict,
        workers=workers,
        max_inflight_bytes=max_inflight_bytes,
        map_files=map_files,
        phases=phases,
        barrier_timeout_s=barrier_timeout_s,
        local_key=local_key,
        read_once=read_once,
    )
    stats = _telemetry.RestoreStats(
        path=src.url,
        step=step,
        arrays=phases.arrays,
        bytes=phases.bytes,
        plan_s=phases["plan"],
        read_s=phases["read"],
        place_s=phases["place"],
        total_s=time.perf_counter() - t0,
    )
    _telemetry.report("restore", stats)
    return value, stats
