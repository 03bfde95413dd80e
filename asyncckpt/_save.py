"""Writing a snapshot as a Zarr v3 checkpoint and committing it (runs on the job thread).

Everything is written into a temporary directory next to the destination, the root `zarr.json`
last, then made durable with one file-system sync and renamed into place. A failure in any phase
removes the temporary directory; nothing partial ever appears at the destination.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from . import _format, _remote, _store
from ._distributed import Coordinator
from ._executor import Workers, batches
from ._snapshot import HostArray, Snapshot
from ._telemetry import Phases
from .errors import CheckpointError, CheckpointExistsError, CheckpointWriteError


def check_destination(dest: str, *, force: bool) -> None:
    """Refuse, before anything is written, a destination that must not be replaced. An
    object-store destination is checked by `begin_write` on the job thread instead: a listing is a
    network round trip, which `save()` should not wait for."""
    if _remote.is_url(dest):
        return
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise CheckpointExistsError(
            f"cannot save to {dest}: it exists and is not a directory; choose another path"
        )
    if os.path.exists(os.path.join(dest, _format.DOC)):
        if not _store.is_asyncckpt(dest):
            raise CheckpointExistsError(
                f"cannot save to {dest}: it holds a Zarr hierarchy that is not an asyncckpt "
                "checkpoint; choose another path (asyncckpt never overwrites foreign data)"
            )
        if not force:
            raise CheckpointExistsError(
                f"a checkpoint already exists at {dest}; pass `force=True` to replace it"
            )
        return
    if os.listdir(dest):
        raise CheckpointExistsError(
            f"cannot save to {dest}: the directory is not empty and is not a checkpoint; "
            "choose another path (asyncckpt never deletes data it did not write)"
        )


def begin_write(dest: str, replace: bool) -> str:
    """Where the save writes (`_store.begin`, which refuses a destination it must not replace)."""
    try:
        return _store.begin(dest, replace=replace)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointWriteError(e.errno, f"cannot save to {dest}: {e.strerror}") from e


_INLINE_CHUNK_BYTES = 4 << 20  # chunks up to this size are written with their array's document


def _write_groups(root: str, groups: list[str]) -> None:
    for group in groups:
        _store.makedirs(os.path.join(root, group))
        _store.write_file(os.path.join(root, group, _format.DOC), _format.GROUP_DOC)


def _write_arrays(root: str, arrays: list[HostArray]) -> None:
    """Each array's directory and document, and its chunks if they are small."""
    for array in arrays:
        path = os.path.join(root, array.spec.name)
        with _context(array, path):
            _store.mkdir(path)  # its parent group exists already
            _store.write_file(os.path.join(path, _format.DOC), _format.array_doc(array.spec))
        _write_chunks(root, [(array, c, d) for c, d in array.chunks if _inline(d)])


def _inline(data: np.ndarray) -> bool:
    return data.nbytes <= _INLINE_CHUNK_BYTES


def _write_chunks(root: str, chunks: list[tuple[HostArray, tuple[int, ...], np.ndarray]]) -> None:
    for array, coords, data in chunks:
        path = os.path.join(root, array.spec.chunk_key(coords))
        with _context(array, path):
            if array.spec.band_rows is None:
                _store.write_chunk(path, data)
            else:
                _store.write_banded_chunk(path, data, _format.band_nbytes(array.spec))


@contextlib.contextmanager
def _context(array: HostArray, path: str) -> Iterator[None]:
    """Name the variable and file in any OSError raised inside."""
    try:
        yield
    except OSError as e:
        raise CheckpointWriteError(
            e.errno, f"while writing variable {array.spec.name!r} to {path}: {e.strerror}"
        ) from e


def _write_tree(tmp: str, snap: Snapshot, workers: Workers, *, documents: bool) -> None:
    """Write the group and array documents (if `documents`) and this process's chunks.

    Phases, each spread over the I/O threads: group directories; array directories, documents
    and small chunks (one task touches one directory at a time, few barriers for thousands of
    small leaves); large chunks. Without `documents` the directories exist already (another
    process made them) and only chunks are written. In an object store the same phases run on
    the network pool, with many more requests in flight.
    """
    net = _remote.is_url(tmp)
    parts = workers.parts(net, background=True)
    if documents:
        groups = _format.group_names([a.spec.name for a in snap.arrays])
        workers.run_all([functools.partial(_write_groups, tmp, g)
                         for g in batches(groups, lambda g: 1, parts=parts, min_cost=32)],
                        background=True, network=net)
        per_array = batches(snap.arrays, lambda a: 1 + sum(d.nbytes for _, d in a.chunks
                                                           if _inline(d)) // 16384,
                            parts=parts, min_cost=1 if net else 64)
        workers.run_all([functools.partial(_write_arrays, tmp, g) for g in per_array],
                        background=True, network=net)
    rest = [(a, c, d) for a in snap.arrays for c, d in a.chunks if not (documents and _inline(d))]
    workers.run_all([functools.partial(_write_chunks, tmp, g) for g in
                     batches(rest, lambda c: c[2].nbytes + 16384, parts=parts, min_cost=1)],
                    background=True, network=net)


def _commit(tmp: str, snap: Snapshot, dest: str, replace: bool, extra: dict | None) -> None:
    """The root document (written last), one sync, the rename."""
    root = _format.root_doc([a.spec for a in snap.arrays], snap.tree, snap.metadata,
                            created=snap.created, extra=extra)
    _store.write_file(os.path.join(tmp, _format.DOC), root)
    _store.sync_tree(tmp)
    _store.publish(tmp, dest, replace=replace)


def _as_write_error(e: BaseException, dest: str, *, uncommitted: bool = False) -> BaseException:
    """`e` as the error of a failed save; `uncommitted`: it failed before the commit, so say
    that nothing was committed."""
    if not isinstance(e, OSError) or (isinstance(e, CheckpointError) and not
                                      (uncommitted and isinstance(e, CheckpointWriteError))):
        return e
    error = CheckpointWriteError(
        e.errno, f"saving the checkpoint {dest} failed, nothing was committed: "
        f"{e.strerror if isinstance(e, CheckpointWriteError) else e}")
    error.__cause__ = e
    return error


def write_snapshot(snap: Snapshot, dest: str, workers: Workers, *, replace: bool,
                   extra: dict | None = None, after_commit: Callable[[], None] | None = None,
                   coord: Coordinator | None = None, phases: Phases | None = None) -> str:
    """Write `snap` under a temporary name next to `dest`, make it durable, publish it, then
    run `after_commit` (the manager's retention). With `coord`: see `_write_together`.
    `phases` receives the time spent in `write`, `commit` and `retention`."""
    phases = phases if phases is not None else Phases()
    if coord is not None:
        return _write_together(snap, dest, workers, replace, extra, after_commit, coord, phases)
    tmp = None
    try:
        with phases("write"):
            tmp = begin_write(dest, replace)
            _write_tree(tmp, snap, workers, documents=True)
        with phases("commit"):
            _commit(tmp, snap, dest, replace, extra)
    except BaseException as e:
        if tmp is not None and not _committed_in_place(tmp, dest):
            _store.remove_tree(tmp)
        raise _as_write_error(e, dest, uncommitted=True) from None
    if after_commit is not None:
        with phases("retention"):
            after_commit()
    return dest


def _write_together(snap: Snapshot, dest: str, workers: Workers, replace: bool,
                    extra: dict | None, after_commit: Callable[[], None] | None,
                    coord: Coordinator, phases: Phases) -> str:
    """The multi-process save, in three barriers.

    1. `layout`: process 0 has created the temporary directory with every document and its own
       chunks. 2. `written`: every other process has added its chunks and synced them. 3. `done`:
    process 0 has written the root document, committed, and run `after_commit`. A process that
    fails still goes to the next barrier and reports its failure in the key-value store, so the
    others stop at once instead of at the deadline; a process that never arrives is named when
    the deadline passes. Nothing is committed unless every process wrote its part.
    """
    leader = coord.process == 0
    what = f"saving {dest} from {coord.count} processes"
    tmp, error = None, None
    t_write = time.perf_counter()
    if leader:
        try:
            tmp = begin_write(dest, replace)
            _write_tree(tmp, snap, workers, documents=True)
        except BaseException as e:
            error = e
    try:
        if leader:
            coord.put("layout", {"tmp": tmp, "dest": dest, "ok": error is None})
        coord.barrier("layout", f"{what}, nothing was committed")
        layout = coord.get("layout")
        if not leader and layout["dest"] != dest:
            error = CheckpointError(f"{what}: process 0 saves to {layout['dest']} but process "
                                    f"{coord.process} to {dest}; every process must save the "
                                    "same paths in the same order")
        elif not leader and layout["ok"]:
            try:
                _write_tree(layout["tmp"], snap, workers, documents=False)
                _store.sync_tree(layout["tmp"])
            except BaseException as e:
                error = e
        coord.put(f"written/{coord.process}", None if error is None else str(error))
        coord.barrier("written", f"{what}, nothing was committed")
        failed = {p: m for p, m in sorted(coord.gather("written").items()) if m is not None}
        if failed:
            if leader:
                _store.remove_tree(tmp)
            if error is not None:
                raise error
            p, message = next(iter(failed.items()))
            raise CheckpointWriteError(
                f"{what}: process {p} failed, so nothing was committed: {message}")
        phases.add("write", time.perf_counter() - t_write)
        if leader:
            try:
                with phases("commit"):
                    _commit(tmp, snap, dest, replace, extra)
                if after_commit is not None:
                    with phases("retention"):
                        after_commit()
            except BaseException as e:
                error = e
            coord.put("done", None if error is None else str(error))
        coord.barrier("done", what)
        if not leader and (message := coord.get("done")) is not None:
            raise CheckpointWriteError(f"{what}: process 0 failed to commit: {message}")
        if error is not None:
            raise error
    except BaseException as e:
        if leader and tmp is not None and not _committed_in_place(tmp, dest):
            _store.remove_tree(tmp)  # a no-op once committed locally: tmp was renamed
        raise _as_write_error(e, dest) from None
    return dest


def _committed_in_place(tmp: str, dest: str) -> bool:
    """In an object store a save writes at `dest` itself: once its root document is there the
    checkpoint is committed, and a later failure (after_commit) must not remove it."""
    if tmp != dest:
        return False
    try:
        return _remote.exists(_remote.join(dest, _format.DOC))
    except OSError:
        return True  # cannot tell: keep it (still marked uncommitted if it was not committed)
