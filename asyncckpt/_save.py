"""Writing a snapshot as a Zarr v3 checkpoint and committing it (runs on the job thread).

Phases: (1) directories and array/group `zarr.json` documents, (2) every chunk, (3) the root
`zarr.json`, then one file-system sync and the atomic rename of the temporary directory. A failure
in any phase removes the temporary directory; nothing partial ever appears at the destination.
"""

from __future__ import annotations

import errno
import functools
import json
import os

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


def _write_docs(root: str, arrays: list[HostArray], groups: list[str]) -> None:
    for group in groups:
        _store.makedirs(os.path.join(root, group))
        _store.write_file(os.path.join(root, group, _format.DOC), _group_doc_bytes())
    for array in arrays:
        path = os.path.join(root, array.spec.name)
        _store.makedirs(path)
        doc = json.dumps(_format.array_doc(array.spec), separators=(",", ":")).encode()
        _store.write_file(os.path.join(path, _format.DOC), doc)


@functools.cache
def _group_doc_bytes() -> bytes:
    return json.dumps(_format.GROUP_DOC, separators=(",", ":")).encode()


def _write_chunks(root: str, group: list[tuple[HostArray, tuple[int, ...], object]]) -> None:
    for array, coords, data in group:
        path = os.path.join(root, array.spec.chunk_key(coords))
        try:
            _store.write_chunk(path, data)  # type: ignore[arg-type]
        except OSError as e:
            raise CheckpointWriteError(
                e.errno, f"while writing variable {array.spec.name!r} to {path}: {e.strerror}"
            ) from e


def write_snapshot(snap: Snapshot, dest: str, workers: Workers, *, replace: bool) -> str:
    """Write `snap` under a temporary name next to `dest`, make it durable, then publish it."""
    parent = os.path.dirname(dest)
    tmp = _store.temporary_sibling(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
        groups = _format.group_names([a.spec.name for a in snap.arrays])
        doc_tasks = batches(snap.arrays, lambda a: 1, parts=workers.size, min_cost=64)
        workers.run_all([functools.partial(_write_docs, tmp, g, []) for g in doc_tasks]
                        + [functools.partial(_write_docs, tmp, [], groups)])  # fmt: skip
        chunks = [(a, coords, data) for a in snap.arrays for coords, data in a.chunks]
        chunk_tasks = batches(chunks, lambda c: c[2].nbytes + 8192, parts=workers.size,  # type: ignore[attr-defined]
                              min_cost=1 << 20)  # fmt: skip
        workers.run_all([functools.partial(_write_chunks, tmp, g) for g in chunk_tasks])
        root = _format.root_doc([a.spec for a in snap.arrays], snap.tree, snap.metadata,
                                created=snap.created)  # fmt: skip
        _store.write_file(os.path.join(tmp, _format.DOC), _format.encode_json(root, what="root"))
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
