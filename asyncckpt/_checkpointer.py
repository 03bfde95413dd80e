"""The public entry points: `AsyncCheckpointer`, `save`, `restore`, `list_variables`,
`load_variable`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _distributed, _format, _restore, _save, _store, _telemetry, _tree
from ._executor import Priority, Workers, at_interpreter_exit
from ._snapshot import ArenaPool, Snapshot, take_snapshot
from .errors import (
    CheckpointError,
    CheckpointReadError,
    VariableNotFoundError,
)

DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30
DEFAULT_BARRIER_TIMEOUT_S = 300.0
DEFAULT_BACKGROUND_NICE: Priority = "idle"
log = logging.getLogger("asyncckpt")


class AsyncCheckpointer:
    """Saves pytrees in the background; `save()` blocks only while it copies arrays to host.

    ```python
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save("/ckpt/step_100", state)   # returns after the host copy
        state = train_step(state)             # donating `state` is fine
    # leaving the block waits for the save to commit and raises any failure
    ```

    Saves run one after another in the order they were made; a new `save()` first waits for the
    previous one to commit (that wait is part of its blocking time). A failure in the background
    is raised by the next `save()`, `wait_until_finished()`, `check_for_errors()` or `close()`.

    Args:
        max_workers: threads for file I/O and host copies (default: 4 per core, 4 to 32).
        reuse_host_memory: keep the host buffers of a finished save for the next one. Saves of
            the same tree then skip first-touch page faults, at the cost of holding one host copy
            of the tree between saves. `close()` frees it.
        max_inflight_bytes: host memory that a restore's shards may take between being read and
            being placed on devices (one array's shards, if they take more).
        map_files: restore each chunk of a local checkpoint that is exactly one device's shard by
            mapping the file's pages copy-on-write instead of copying them into new memory
            (`restore` docs). False reads every chunk into memory of its own.
        barrier_timeout_s: under `jax.distributed`, how long a save waits for the other
            processes at each of its barriers before it fails naming the missing ones.
        background_nice: how much the background writer threads yield the CPU to training:
            "idle" (the default; Linux `SCHED_IDLE`, else niceness 19): they run only on CPU time
            nothing else wants; or a niceness to add, 0 to 19 (0: the caller's priority). A save
            then takes longer only while the CPU is busy, and a caller that has to wait for one
            (the next `save`, `wait_until_finished`, `close`) writes on its own thread too.
    """

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        reuse_host_memory: bool = True,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        map_files: bool = True,
        barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
        background_nice: Priority = DEFAULT_BACKGROUND_NICE,
    ) -> None:
        _check_inflight(max_inflight_bytes)
        self._workers = Workers(max_workers, background_nice=background_nice)
        self._barrier_timeout_s = barrier_timeout_s
        self._pool = ArenaPool(enabled=reuse_host_memory)
        self._pending: list[tuple[str, Future[str]]] = []  # (destination, its save)
        self._max_inflight_bytes = max_inflight_bytes
        self._map_files = map_files
        self._closed = False
        self._last_save: _telemetry.SaveStats | None = None
        self._last_restore: _telemetry.RestoreStats | None = None

    def save(
        self, path: Any, tree: Any, *, metadata: Any = None, force: bool = False
    ) -> Future[str]:
        """Snapshot `tree` to host memory and write it to `path` in the background.

        Returns a future whose result is the committed path. `metadata` (JSON) is stored with
        the checkpoint. An existing checkpoint at `path` is replaced only with `force=True`.
        """
        return self._save(_restore.checkpoint_path(path), tree, metadata=metadata, force=force)

    def _save(
        self,
        dest: str,
        tree: Any,
        *,
        metadata: Any,
        force: bool,
        extra: dict | None = None,
        after_commit: Callable[[float], None] | None = None,
    ) -> Future[str]:
        """`save`, plus what a manager adds: `extra` root attributes, and `after_commit(created)`
        run on the job thread once the checkpoint is committed (its failure fails the future)."""
        self._check_open()
        t0 = time.perf_counter()
        for _, fut in self._pending:  # one save in flight at a time bounds host memory
            self._workers.help_until(fut)  # waiting: write on this thread too
        phases = _telemetry.Phases()
        phases.add("wait_previous", time.perf_counter() - t0)
        self.check_for_errors()
        _save.check_destination(dest, force=force)
        _format.encode_json(metadata, what="`metadata`")
        coord = None
        if _distributed.is_multi_process():
            coord = _distributed.Coordinator(_distributed.call_key(f"save {dest}"),
                                             self._barrier_timeout_s)
        with phases("snapshot"):
            snap = take_snapshot(tree, metadata, self._workers, self._pool,
                                 process_index=coord.process if coord else 0)
        phases.add("blocking", time.perf_counter() - t0)
        future = self._workers.submit_job(self._write, snap, dest, force, extra, after_commit,
                                          coord, phases, t0)
        self._pending.append((dest, future))
        _finish_at_exit(self)
        return future

    def _write(self, snap: Snapshot, dest: str, replace: bool, extra: dict | None,
               after_commit: Callable[[float], None] | None,
               coord: _distributed.Coordinator | None, phases: _telemetry.Phases,
               t0: float) -> str:
        try:
            _save.write_snapshot(
                snap, dest, self._workers, replace=replace, extra=extra, coord=coord,
                after_commit=functools.partial(after_commit, snap.created) if after_commit
                else None, phases=phases)
        finally:
            if snap.arena is not None:
                self._pool.release(snap.arena)
        stats = _telemetry.SaveStats(
            path=dest, step=(extra or {}).get("step"), arrays=len(snap.arrays),
            bytes=sum(d.nbytes for a in snap.arrays for _, d in a.chunks),
            blocking_s=phases["blocking"], wait_previous_s=phases["wait_previous"],
            snapshot_s=phases["snapshot"], write_s=phases["write"], commit_s=phases["commit"],
            retention_s=phases["retention"], total_s=time.perf_counter() - t0)
        self._last_save = stats
        _telemetry.report("save", stats)
        return dest

    def last_save_stats(self) -> _telemetry.SaveStats | None:
        """Timings by phase and bytes of the last committed save (None before the first)."""
        return self._last_save

    def last_restore_stats(self) -> _telemetry.RestoreStats | None:
        """Timings by phase and bytes of the last restore (None before the first)."""
        return self._last_restore

    @property
    def workers(self) -> Workers:
        return self._workers

    def restore(self, path: Any, target: Any = None, *, strict: bool = True) -> Any:
        """Like `asyncckpt.restore`, using this checkpointer's threads."""
        self._check_open()
        return self._restore(_restore.checkpoint_path(path), target, strict=strict)

    def _restore(self, path: str, target: Any, *, strict: bool, step: int | None = None) -> Any:
        value, self._last_restore = _timed_restore(path, target, strict, self._workers,
                                                   self._max_inflight_bytes, self._map_files, step,
                                                   self._barrier_timeout_s)
        return value

    def check_for_errors(self) -> None:
        """Raise the first failure of a finished background save (once), if any."""
        for item in list(self._pending):
            if item[1].done():
                self._pending.remove(item)
                if (error := item[1].exception()) is not None:
                    raise error

    def wait_until_finished(self) -> None:
        """Block until every save made so far has committed; raise the first failure."""
        while self._pending:
            self._workers.help_until(self._pending[0][1])
            self.check_for_errors()

    def close(self) -> None:
        """Wait for the saves in flight, stop the threads, free held host memory."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self._workers.close()
            self._pool.clear()

    def _finish_before_exit(self) -> None:
        """At interpreter exit: wait for the saves still in flight, saying so, and log (never
        drop) a failure, since nobody is left to raise it to."""
        if self._closed or not self._pending:
            return
        running = [dest for dest, fut in self._pending if not fut.done()]
        if running:
            log.warning("asyncckpt: the program is exiting; waiting for %d save(s) to commit: %s "
                        "(call close() or use `with` to wait explicitly)", len(running),
                        ", ".join(running))
        try:
            self.close()
        except BaseException as e:  # at exit there is no caller to raise to
            log.error("asyncckpt: a save was not committed before the program exited: %s", e)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed; create a new one")

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_unfinished: weakref.WeakSet[AsyncCheckpointer] = weakref.WeakSet()
_unfinished_lock = threading.Lock()


def _finish_at_exit(ckptr: AsyncCheckpointer) -> None:
    """Make sure the saves of `ckptr` are committed (or their failure logged) before the
    interpreter exits, even if the program never calls `close()`."""
    with _unfinished_lock:
        if not _unfinished:
            at_interpreter_exit(_finish_all)
        _unfinished.add(ckptr)


def _finish_all() -> None:
    for ckptr in list(_unfinished):
        ckptr._finish_before_exit()
    _unfinished.clear()


def save(path: Any, tree: Any, *, metadata: Any = None, force: bool = False) -> None:
    """Save `tree` to the directory `path` and return once the checkpoint is committed.

    Leaves: `jax.Array` (any sharding; typed PRNG keys too), numpy arrays and scalars, python
    int/float/bool/str. `metadata`: any JSON value, returned by `read_metadata`.
    """
    with AsyncCheckpointer(reuse_host_memory=False) as ckptr:
        ckptr.save(path, tree, metadata=metadata, force=force)


def restore(
    path: Any,
    target: Any = None,
    *,
    strict: bool = True,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    map_files: bool = True,
) -> Any:
    """Read the checkpoint at `path`.

    Without `target`: the saved tree, arrays as numpy arrays (typed PRNG keys as jax key arrays).
    With `target` (a pytree of `jax.Array`, `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` or
    numpy arrays): exactly its structure, dtypes and shardings; each process reads only the chunks
    its devices need. `strict=False` lets the target hold a subset of the saved leaves.

    `max_inflight_bytes`: host memory that shards may take between being read and being placed
    on devices: arrays are read and placed in groups of at most that many bytes (a larger array
    alone), so on accelerators a restore needs that much host memory, not the whole tree.
    `map_files` (default True): a chunk of a local checkpoint that is exactly one device's shard
    (the usual resume) is mapped copy-on-write, not copied: its checksums are verified through the
    mapping and the pages stay the page cache's, so a resume neither fills fresh memory nor
    copies. On accelerators the mapping is released once the shard is on the device; CPU arrays
    keep it, and writes to them (donation) copy the pages they touch, never reaching the file.
    asyncckpt never changes a committed file (saves write new files and rename them), but a file
    truncated in place by something else while mapped would end the process with SIGBUS: pass
    False if anything may do that.
    """
    _check_inflight(max_inflight_bytes)
    workers = Workers()
    try:
        return _timed_restore(_restore.checkpoint_path(path), target, strict, workers,
                              max_inflight_bytes, map_files, None, DEFAULT_BARRIER_TIMEOUT_S)[0]
    finally:
        workers.close()


def _check_inflight(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_inflight_bytes must be a positive number of bytes, got {value!r}")


def _timed_restore(path: str, target: Any, strict: bool, workers: Workers,
                   max_inflight_bytes: int, map_files: bool, step: int | None,
                   barrier_timeout_s: float) -> tuple[Any, _telemetry.RestoreStats]:
    """`restore_tree`, timed by phase and reported (`_telemetry.report`)."""
    phases = _telemetry.Phases()
    t0 = time.perf_counter()
    value = _restore.restore_tree(path, target, strict=strict, workers=workers,
                                  max_inflight_bytes=max_inflight_bytes, map_files=map_files,
                                  phases=phases, barrier_timeout_s=barrier_timeout_s)
    stats = _telemetry.RestoreStats(
        path=path, step=step, arrays=phases.arrays, bytes=phases.bytes, plan_s=phases["plan"],
        read_s=phases["read"], place_s=phases["place"], total_s=time.perf_counter() - t0)
    _telemetry.report("restore", stats)
    return value, stats


@dataclass(frozen=True, slots=True)
class VariableInfo:
    """One array variable of a checkpoint, as `list_variables` describes it."""

    name: str
    """Variable name: the keypath joined by `/` (`params/dense/kernel`)."""
    shape: tuple[int, ...]
    """Global shape as stored (PRNG keys: their key data, with the trailing key dimension)."""
    dtype: np.dtype
    """Stored dtype."""
    nbytes: int
    """Size of the data in bytes."""
    chunk_shape: tuple[int, ...]
    """Shape of each chunk (one per shard at save time)."""
    prng_impl: str | None = None
    """PRNG implementation for typed key arrays, else None."""


def _info(spec: _format.ArraySpec) -> VariableInfo:
    return VariableInfo(spec.name, spec.shape, spec.dtype, spec.nbytes, spec.chunk_shape,
                        spec.prng_impl)


def list_variables(path: Any) -> dict[str, VariableInfo]:
    """Every array variable of the checkpoint at `path`, in tree order (reads one file)."""
    info = _restore.read_root(_restore.checkpoint_path(path))
    order = {name: i for i, name in enumerate(_tree.spec_leaf_names(info.tree))}
    names = sorted(info.arrays, key=lambda n: order.get(n, len(order)))
    return {name: _info(info.arrays[name]) for name in names}


def read_metadata(path: Any) -> Any:
    """The user `metadata` saved with the checkpoint at `path`."""
    return _restore.read_root(_restore.checkpoint_path(path)).metadata


def load_variable(path: Any, name: str) -> np.ndarray:
    """Read one variable as a numpy array; nothing else of the checkpoint is read.

    PRNG key arrays come back as their raw key data (`uint32`).
    """
    root = _restore.checkpoint_path(path)
    if not _store.exists(os.path.join(root, _format.DOC)):
        _restore.read_root(root)  # raises the precise "not found" / "incomplete" error
    where = f"checkpoint {root}"
    _format.check_name(name, where)
    doc_path = os.path.join(root, name, _format.DOC)
    try:
        raw = _store.read_small_file(doc_path, _format.MAX_ARRAY_DOC_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        known = list(list_variables(root))
        raise VariableNotFoundError(
            f"{where} has no variable {name!r}; it has: {', '.join(known[:30])}"
            + (f" ... ({len(known)} in all)" if len(known) > 30 else "")
        ) from None
    except OSError as e:
        raise CheckpointReadError(e.errno, f"cannot read {doc_path}: {e.strerror}") from e
    doc = _format.parse_json(raw, where, doc_path)
    if isinstance(doc, dict) and doc.get("node_type") == "group":
        under = [n for n in list_variables(root) if n.startswith(name + "/")]
        raise VariableNotFoundError(
            f"{name!r} in {where} is a group, not a variable; the variables under it: "
            f"{', '.join(under[:30])}" + (f" ... ({len(under)} in all)" if len(under) > 30
                                          else "") + " (load them one by one, or restore the "
            "checkpoint with a target holding just them and strict=False)")
    spec = _format.parse_array_doc(name, doc, where)
    raw_spec = dataclasses.replace(spec, prng_impl=None)  # key data stays raw uint32
    workers = Workers(max_workers=4)
    try:
        (value,) = _restore.read_arrays(root, [(raw_spec, None)], workers,
                                        max_inflight_bytes=DEFAULT_MAX_INFLIGHT_BYTES)
    finally:
        workers.close()
    return value
