"""Copying a committed checkpoint file by file (disk <-> object store), with the commit protocol.

The bytes are copied as they are (same chunks, same documents), after checking each chunk's
checksums in memory: a damaged source fails the copy instead of spreading. The destination is
written like a save (`Storage.begin`: a temporary sibling directory, or the prefix marked
uncommitted) and committed by writing its root `zarr.json` last.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import _format, _save
from ._executor import Workers
from ._format import ArraySpec
from ._restore import read_root
from ._storage import Storage
from .errors import CheckpointExistsError


def copy(
    src: Storage,
    dst: Storage,
    workers: Workers,
    *,
    progress: Callable[[int], None] | None = None,
    previous: Storage | None = None,
    force: bool = False,
) -> int | None:
    """Copy the committed checkpoint `src` to `dst`; return the chunk bytes copied, or None
    when `dst` holds this very checkpoint already (committed, the same root document: a copy
    run before), which is left as it is. Another checkpoint at `dst` is refused unless `force`
    (then replaced); an uncommitted leftover there is not a checkpoint and is written over.
    `progress(n)` is called from worker threads as `n` more data bytes are done.
    `previous`: a committed checkpoint beside `dst` (the step copied before it): a chunk whose
    recorded content hash it holds in the same layout is linked or copied server-side from it,
    not read from `src` (so copying the steps of an incremental run costs what they added)."""
    info = read_root(src)
    reuse = _save.Reuse.of(previous) if info.hashes is not None else None
    root = src.read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES)
    if dst.is_checkpoint():
        if dst.read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES) == root:
            return None
        if not force:
            raise CheckpointExistsError(
                f"{dst.url} holds a different checkpoint than {src.url} (their root documents "
                "differ); pass --force to replace it, or copy to another place"
            )
    dst.check_writable(replace=force)
    staged, _ = _save.begin_write(dst, replace=force)
    try:
        for group in _format.group_names(list(info.arrays)):
            staged.make_dirs([group])
            staged.write(f"{group}/{_format.DOC}", _format.GROUP_DOC)
        tasks = []
        seen: set[str] = set()
        for spec in info.arrays.values():
            src.check_no_links(spec.name, f"copying variable {spec.name!r} of {src.url}", seen)
            staged.make_dirs([spec.name])
            tasks.append((256, functools.partial(_copy_doc, src, staged, spec)))
            for i, coords in enumerate(spec.chunk_coords()):
                key = spec.chunk_key(coords)
                if (
                    reuse is not None
                    and info.hashes is not None
                    and reuse.has(spec, coords, info.hashes[spec.name][i])
                    and staged.reuse_chunk(key, reuse.place, key)
                ):
                    if progress is not None:
                        progress(spec.chunk_nbytes)
                    continue
                copy_one = functools.partial(_copy_chunk, src, staged, spec, coords, progress)
                tasks.append((spec.chunk_nbytes, copy_one))
        workers.run_reads(tasks, network=src.network or dst.network)
        staged.write(_format.DOC, root)
        staged.sync()
        dst.commit(staged, replace=force)
    except BaseException:
        dst.discard(staged)
        raise
    return sum(size for size, task in tasks if task.func is _copy_chunk)


def _copy_doc(src: Storage, dst: Storage, spec: ArraySpec) -> None:
    key = f"{spec.name}/{_format.DOC}"
    dst.write(key, src.read_small(key, _format.MAX_ARRAY_DOC_BYTES))


def _copy_chunk(
    src: Storage,
    dst: Storage,
    spec: ArraySpec,
    coords: tuple[int, ...],
    progress: Callable[[int], None] | None,
) -> None:
    key = spec.chunk_key(coords)
    where = f"copying variable {spec.name!r} of {src.url}"
    band = _format.band_nbytes(spec) if spec.band_rows is not None else None
    data = src.read_chunk_file(key, _format.chunk_file_sizes(spec.chunk_nbytes, band), where)
    _format.check_chunk_file(data, spec.chunk_nbytes, band, src.path(key), where)
    dst.write(key, data)
    if progress is not None:
        progress(spec.chunk_nbytes)
