"""Copying a committed checkpoint file by file (disk <-> object store), with the commit protocol.

The bytes are copied as they are (same chunks, same documents), after checking each chunk's
checksums in memory: a damaged source fails the copy instead of spreading. The destination is
written like a save (a temporary sibling directory, or the `.asyncckpt-uncommitted` marker in an
object store) and committed by writing its root `zarr.json` last.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from . import _format, _remote, _save, _store
from ._executor import Workers
from ._format import ArraySpec
from ._restore import read_root


def copy(src: str, dst: str, workers: Workers, *,
         progress: Callable[[int], None] | None = None) -> None:
    """Copy the committed checkpoint `src` to `dst`, which must not exist yet.
    `progress(n)` is called from worker threads as `n` more data bytes are copied."""
    info = read_root(src)
    root = _store.read_small_file(os.path.join(src, _format.DOC), _format.MAX_ROOT_DOC_BYTES)
    _save.check_destination(dst, force=False)
    tmp = _save.begin_write(dst, replace=False)
    try:
        for group in _format.group_names(list(info.arrays)):
            _store.makedirs(os.path.join(tmp, group))
            _store.write_file(os.path.join(tmp, group, _format.DOC), _format.GROUP_DOC)
        tasks = []
        seen: set[str] = set()
        for spec in info.arrays.values():
            _store.check_no_links(src, spec.name, f"copying variable {spec.name!r} of {src}",
                                  seen)
            _store.makedirs(os.path.join(tmp, spec.name))
            tasks.append((256, functools.partial(_copy_doc, src, tmp, spec)))
            tasks += [(spec.chunk_nbytes, functools.partial(_copy_chunk, src, tmp, spec, c,
                                                            progress))
                      for c in spec.chunk_coords()]
        workers.run_reads(tasks, network=_remote.is_url(src) or _remote.is_url(dst))
        _store.write_file(os.path.join(tmp, _format.DOC), root)
        _store.sync_tree(tmp)
        _store.publish(tmp, dst, replace=False)
    except BaseException:
        _store.remove_tree(tmp)
        raise


def _copy_doc(src: str, dst: str, spec: ArraySpec) -> None:
    name = os.path.join(spec.name, _format.DOC)
    _store.write_file(os.path.join(dst, name),
                      _store.read_small_file(os.path.join(src, name), _format.MAX_ARRAY_DOC_BYTES))


def _copy_chunk(src: str, dst: str, spec: ArraySpec, coords: tuple[int, ...],
                progress: Callable[[int], None] | None) -> None:
    key = spec.chunk_key(coords)
    where = f"copying variable {spec.name!r} of {src}"
    band = _format.band_nbytes(spec) if spec.band_rows is not None else None
    path = os.path.join(src, key)
    data = _store.read_file(path, _store.chunk_file_sizes(spec.chunk_nbytes, band), where)
    _store.check_chunk_file(data, spec.chunk_nbytes, band, path, where)
    _store.write_file(os.path.join(dst, key), data)
    if progress is not None:
        progress(spec.chunk_nbytes)
