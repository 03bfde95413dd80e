"""Writing a snapshot as a Zarr v3 checkpoint and committing it (runs on the job thread).

Everything is written into a temporary directory next to the destination, the root `zarr.json`
last, then made durable with one file-system sync and renamed into place. A failure in any phase
removes the temporary directory; nothing partial ever appears at the destination.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
from collections.abc import Iterator

import numpy as np

from . import _format, _store
from ._executor import Workers, batches
from ._snapshot import HostArray, Snapshot
from .errors import CheckpointError, CheckpointExistsError, CheckpointWriteError


def check_destination(dest: str, *, force: bool) -> None:
    """Refuse, before anything is written, a destination that must not be replaced."""
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise CheckpointExistsError(
            f"cannot save to {dest}: it exists and is not a directory; choose another path"
        )
    if os.path.exists(os.path.join(dest, _format.DOC)):
        if not _is_asyncckpt(dest):
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


def _is_asyncckpt(path: str) -> bool:
    try:
        raw = _store.read_small_file(os.path.join(path, _format.DOC), _format.MAX_ROOT_DOC_BYTES)
        attrs = json.loads(raw).get("attributes", {})
        return isinstance(attrs, dict) and _format.ATTR in attrs
    except (OSError, ValueError, AttributeError, CheckpointError):
        return False


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
            os.mkdir(path)  # its parent group exists already
            _store.write_file(os.path.join(path, _format.DOC), _format.array_doc(array.spec))
        _write_chunks(root, [(array, c, d) for c, d in array.chunks if _inline(d)])


def _inline(data: np.ndarray) -> bool:
    return data.nbytes <= _INLINE_CHUNK_BYTES


def _write_chunks(root: str, chunks: list[tuple[HostArray, tuple[int, ...], np.ndarray]]) -> None:
    for array, coords, data in chunks:
        path = os.path.join(root, array.spec.chunk_key(coords))
        with _context(array, path):
            _store.write_chunk(path, data)


@contextlib.contextmanager
def _context(array: HostArray, path: str) -> Iterator[None]:
    """Name the variable and file in any OSError raised inside."""
    try:
        yield
    except OSError as e:
        raise CheckpointWriteError(
            e.errno, f"while writing variable {array.spec.name!r} to {path}: {e.strerror}"
        ) from e


def write_snapshot(snap: Snapshot, dest: str, workers: Workers, *, replace: bool,
                   extra: dict | None = None) -> str:
    """Write `snap` under a temporary name next to `dest`, make it durable, then publish it.

    Phases, each spread over the I/O threads: group directories; array directories, documents
    and small chunks (one task touches one directory at a time, few barriers for thousands of
    small leaves); large chunks; then the root document, one sync and the rename.
    """
    parent = os.path.dirname(dest)
    tmp = _store.temporary_sibling(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
        groups = _format.group_names([a.spec.name for a in snap.arrays])
        workers.run_all([functools.partial(_write_groups, tmp, g)
                         for g in batches(groups, lambda g: 1, parts=workers.size, min_cost=32)])
        per_array = batches(snap.arrays, lambda a: 1 + sum(d.nbytes for _, d in a.chunks
                                                           if _inline(d)) // 16384,
                            parts=workers.size, min_cost=64)
        workers.run_all([functools.partial(_write_arrays, tmp, g) for g in per_array])
        large = [(a, c, d) for a in snap.arrays for c, d in a.chunks if not _inline(d)]
        workers.run_all([functools.partial(_write_chunks, tmp, g) for g in
                         batches(large, lambda c: c[2].nbytes, parts=workers.size, min_cost=1)])
        root = _format.root_doc([a.spec for a in snap.arrays], snap.tree, snap.metadata,
                                created=snap.created, extra=extra)
        _store.write_file(os.path.join(tmp, _format.DOC), root)
        _store.sync_tree(tmp)
        _publish(tmp, dest, replace)
    except BaseException as e:
        _store.remove_tree(tmp)
        if isinstance(e, CheckpointError) or not isinstance(e, OSError):
            raise
        raise CheckpointWriteError(
            e.errno, f"saving the checkpoint {dest} failed, nothing was committed: {e}"
        ) from e
    return dest


def _publish(tmp: str, dest: str, replace: bool) -> None:
    try:
        _store.publish(tmp, dest, replace=replace)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise CheckpointExistsError(
                f"could not commit the checkpoint: {dest} appeared while saving; "
                "two writers must not share a path"
            ) from e
        raise
