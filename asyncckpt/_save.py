"""Writing a snapshot as a Zarr v3 checkpoint and committing it (runs on the job thread).

Everything is written where the destination's storage says (`Storage.begin`: a temporary sibling
directory, or the destination prefix marked uncommitted), the root `zarr.json` last; then the
storage makes it durable and visible in one step (`Storage.commit`). A failure in any phase
discards what was written; nothing partial is ever committed.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _format, _tree
from ._distributed import Coordinator
from ._executor import Workers, batches
from ._snapshot import HostArray, Snapshot
from ._storage import Storage, open_storage
from ._telemetry import Phases
from .errors import CheckpointError, CheckpointWriteError


def begin_write(dest: Storage, replace: bool) -> Storage:
    """Where the save writes (`Storage.begin`, which refuses what it must not replace)."""
    try:
        return dest.begin(replace=replace)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointWriteError(e.errno, f"cannot save to {dest.url}: {e.strerror}") from e


_INLINE_CHUNK_BYTES = 4 << 20  # chunks up to this size are written with their array's document


def _write_groups(staged: Storage, groups: list[str]) -> None:
    for group in groups:
        staged.make_dirs([group])
        staged.write(f"{group}/{_format.DOC}", _format.GROUP_DOC)


def _write_arrays(staged: Storage, arrays: list[HostArray]) -> None:
    """Each array's directory and document, and its chunks if they are small."""
    for array in arrays:
        name = array.spec.name
        with _context(array, staged.path(name)):
            staged.make_dirs([name], parents=False)  # its parent group exists already
            staged.write(f"{name}/{_format.DOC}", _format.array_doc(array.spec))
        _write_chunks(staged, [(array, c, d) for c, d in array.chunks if _inline(d)])


def _inline(data: np.ndarray) -> bool:
    return data.nbytes <= _INLINE_CHUNK_BYTES


def _write_chunks(
    staged: Storage, chunks: list[tuple[HostArray, tuple[int, ...], np.ndarray]]
) -> None:
    for array, coords, data in chunks:
        key = array.spec.chunk_key(coords)
        band = _format.band_nbytes(array.spec) if array.spec.band_rows is not None else None
        with _context(array, staged.path(key)):
            staged.write_chunk(key, data, band)


@contextlib.contextmanager
def _context(array: HostArray, path: str) -> Iterator[None]:
    """Name the variable and file in any OSError raised inside."""
    try:
        yield
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointWriteError(
            e.errno, f"while writing variable {array.spec.name!r} to {path}: {e.strerror}"
        ) from e


def _write_tree(staged: Storage, snap: Snapshot, workers: Workers, *, documents: bool) -> None:
    """Write the group and array documents (if `documents`) and this process's chunks.

    Phases, each spread over the I/O threads: group directories; array directories, documents
    and small chunks (one task touches one directory at a time, few barriers for thousands of
    small leaves); large chunks. Without `documents` the directories exist already (another
    process made them) and only chunks are written. In an object store the same phases run on
    the network pool, with many more requests in flight.
    """
    net = staged.network
    parts = workers.parts(net, background=True)
    if documents:
        groups = _format.group_names([a.spec.name for a in snap.arrays])
        workers.run_all(
            [
                functools.partial(_write_groups, staged, g)
                for g in batches(groups, lambda g: 1, parts=parts, min_cost=32)
            ],
            background=True,
            network=net,
        )
        per_array = batches(
            snap.arrays,
            lambda a: 1 + sum(d.nbytes for _, d in a.chunks if _inline(d)) // 16384,
            parts=parts,
            min_cost=1 if net else 64,
        )
        workers.run_all(
            [functools.partial(_write_arrays, staged, g) for g in per_array],
            background=True,
            network=net,
        )
    rest = [(a, c, d) for a in snap.arrays for c, d in a.chunks if not (documents and _inline(d))]
    workers.run_all(
        [
            functools.partial(_write_chunks, staged, g)
            for g in batches(rest, lambda c: c[2].nbytes + 16384, parts=parts, min_cost=1)
        ],
        background=True,
        network=net,
    )


def _commit(
    staged: Storage,
    snap: Snapshot,
    dest: Storage,
    replace: bool,
    fields: _format.RootFields,
    tree: dict[str, Any] | None = None,
) -> None:
    """The root document (written last), durable, then visible (`Storage.commit`). `tree`: the
    description to write instead of the snapshot's (with every process's iterator states)."""
    tree = snap.tree if tree is None else tree
    root = _format.root_doc([a.spec for a in snap.arrays], tree, fields, created=snap.created)
    staged.write(_format.DOC, root)
    staged.sync()
    dest.commit(staged, replace=replace)


def _as_write_error(e: BaseException, dest: Storage, *, uncommitted: bool = False) -> BaseException:
    """`e` as the error of a failed save; `uncommitted`: it failed before the commit, so say
    that nothing was committed."""
    if not isinstance(e, OSError) or (
        isinstance(e, CheckpointError) and not (uncommitted and isinstance(e, CheckpointWriteError))
    ):
        return e
    error = CheckpointWriteError(
        e.errno,
        f"saving the checkpoint {dest.url} failed, nothing was committed: "
        f"{e.strerror if isinstance(e, CheckpointWriteError) else e}",
    )
    error.__cause__ = e
    return error


def write_snapshot(
    snap: Snapshot,
    dest: Storage,
    workers: Workers,
    *,
    replace: bool,
    fields: _format.RootFields,
    coord: Coordinator | None = None,
    phases: Phases | None = None,
) -> None:
    """Write `snap` where `dest` says, make it durable and commit it as `dest`. With `coord`:
    see `_write_together`. `phases` receives the time spent in `write` and `commit`."""
    phases = phases if phases is not None else Phases()
    if coord is not None:
        return _write_together(snap, dest, workers, replace, fields, coord, phases)
    staged = None
    try:
        with phases("write"):
            staged = begin_write(dest, replace)
            _write_tree(staged, snap, workers, documents=True)
        with phases("commit"):
            _commit(staged, snap, dest, replace, fields)
    except BaseException as e:
        if staged is not None:
            dest.discard(staged)
        raise _as_write_error(e, dest, uncommitted=True) from None


def _write_together(
    snap: Snapshot,
    dest: Storage,
    workers: Workers,
    replace: bool,
    fields: _format.RootFields,
    coord: Coordinator,
    phases: Phases,
) -> None:
    """The multi-process save, in three barriers.

    1. `layout`: process 0 has begun the checkpoint and written every document and its own
    chunks. 2. `written`: every other process has added its chunks and synced them. 3. `done`:
    process 0 has written the root document and committed. A process that fails still goes to
    the next barrier and reports its failure in the key-value store, so the others stop at once
    instead of at the deadline; a process that never arrives is named when the deadline
    passes. Nothing is committed unless every process wrote its part.
    """
    leader = coord.process == 0
    what = f"saving {dest.url} from {coord.count} processes"
    staged: Storage | None = None
    error: BaseException | None = None
    t_write = time.perf_counter()
    if leader:
        try:
            staged = begin_write(dest, replace)
            _write_tree(staged, snap, workers, documents=True)
        except BaseException as e:
            error = e
    try:
        if leader:
            coord.put(
                "layout",
                {
                    "staged": staged.url if staged is not None else None,
                    "dest": dest.url,
                    "ok": error is None,
                },
            )
        coord.barrier("layout", f"{what}, nothing was committed")
        layout = coord.get("layout")
        if not leader and layout["dest"] != dest.url:
            error = CheckpointError(
                f"{what}: process 0 saves to {layout['dest']} but process "
                f"{coord.process} to {dest.url}; every process must save "
                "the same paths in the same order"
            )
        elif not leader and layout["ok"]:
            try:
                theirs = open_storage(layout["staged"])
                _write_tree(theirs, snap, workers, documents=False)
                theirs.sync()
            except BaseException as e:
                error = e
        states = _tree.state_nodes(snap.tree)  # data iterators: each process has its own
        if states:
            coord.put(f"states/{coord.process}", states)
        coord.put(f"written/{coord.process}", None if error is None else str(error))
        coord.barrier("written", f"{what}, nothing was committed")
        failed = {p: m for p, m in sorted(coord.gather("written").items()) if m is not None}
        if failed:
            if error is not None:
                raise error
            p, message = next(iter(failed.items()))
            raise CheckpointWriteError(
                f"{what}: process {p} failed, so nothing was committed: {message}"
            )
        phases.add("write", time.perf_counter() - t_write)
        if leader and staged is not None:
            try:
                with phases("commit"):
                    tree = None
                    if states:
                        gathered = coord.gather("states")
                        per_process = [gathered[p] for p in range(coord.count)]
                        tree = _tree.with_process_states(snap.tree, per_process)
                    _commit(staged, snap, dest, replace, fields, tree)
            except BaseException as e:
                error = e
            coord.put("done", None if error is None else str(error))
        coord.barrier("done", what)
        if not leader and (message := coord.get("done")) is not None:
            raise CheckpointWriteError(f"{what}: process 0 failed to commit: {message}")
        if error is not None:
            raise error
    except BaseException as e:
        if leader and staged is not None:
            dest.discard(staged)  # never a committed checkpoint
        raise _as_write_error(e, dest) from None
