"""Checking a committed checkpoint end to end: every document, every chunk, every checksum.

Unlike a restore, which stops at the first bad chunk, a verification reads everything and
collects every problem, so one pass names all the damaged variables.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from . import _format, _tree
from ._executor import Read, Workers
from ._format import ArraySpec
from ._restore import read_root
from ._storage import Storage, open_storage
from .errors import (
    CheckpointError,
    CheckpointReadError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)

_PIECE_BYTES = 64 << 20  # a banded chunk is checked this many bytes at a time


@dataclass(frozen=True, slots=True)
class Problem:
    """One damaged or missing part of a checkpoint."""

    variable: str | None
    """The variable it belongs to; None for the checkpoint's own documents."""
    error: CheckpointError


def check(
    ckpt: Storage, workers: Workers, *, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    """Every problem of the committed checkpoint `ckpt` (empty: it is sound).

    Reads every chunk and checks its size and checksums, and checks that each array's own
    `zarr.json` (what zarr-python and TensorStore read) describes the same array as the root
    document. `progress(n)` is called from worker threads as `n` more data bytes are checked.
    An unreadable or damaged root document raises instead: nothing else can be checked then.
    """
    path = ckpt.url
    info = read_root(ckpt)
    problems: list[Problem] = []
    lock = threading.Lock()

    def guarded(name: str, fn: Callable[[], int]) -> None:
        try:
            n = fn()
        except CheckpointError as e:
            with lock:
                problems.append(Problem(name, e))
            return
        except OSError as e:
            with lock:
                problems.append(
                    Problem(
                        name,
                        CheckpointReadError(
                            e.errno, f"variable {name!r} of {path}: {e.strerror or e}"
                        ),
                    )
                )
            return
        if progress is not None:
            progress(n)

    tasks: list[Read] = []
    try:
        names = _tree.spec_leaf_names(info.tree)
    except CheckpointError as e:
        problems.append(Problem(None, e))
        names = []
    for name in names:
        if name not in info.arrays:
            problems.append(
                Problem(
                    name,
                    CorruptCheckpointError(
                        f"{path}: the tree lists variable {name!r}, but the root zarr.json has no "
                        "array of that name"
                    ),
                )
            )
    if info.hashes is not None:
        digest = _format.content_digest(list(info.arrays.values()), info.tree, info.hashes)
        if info.digest != digest:
            problems.append(
                Problem(
                    None,
                    CorruptCheckpointError(
                        f"{path}: the root zarr.json's content digest {info.digest} does not "
                        f"match its chunk hashes and tree ({digest}): the document was altered"
                    ),
                )
            )
    seen: set[str] = set()
    for spec in info.arrays.values():
        where = f"variable {spec.name!r} of {path}"
        try:
            ckpt.check_no_links(spec.name, where, seen)
        except CheckpointError as e:
            problems.append(Problem(spec.name, e))
            continue
        # each read says what to fetch ahead: thousands of small ones go in order on one
        # thread that asks for the next ones' bytes first (`Workers.run_reads`)
        check_doc = functools.partial(_check_doc, ckpt, spec, where)
        doc = f"{spec.name}/{_format.DOC}"
        tasks.append(
            Read(
                256,
                functools.partial(guarded, spec.name, check_doc),
                functools.partial(ckpt.prefetch, doc, _format.ARRAY_DOC_AHEAD),
            )
        )
        hashes = info.hashes[spec.name] if info.hashes is not None else None
        for i, coords in enumerate(spec.chunk_coords()):
            key = spec.chunk_key(coords)
            expected = hashes[i] if hashes is not None else None
            check_one = functools.partial(_check_chunk, ckpt, key, spec, where, expected)
            tasks.append(
                Read(
                    spec.chunk_nbytes,
                    functools.partial(guarded, spec.name, check_one),
                    functools.partial(ckpt.prefetch, key, spec.chunk_nbytes + _format.CRC_BYTES),
                )
            )
    workers.run_reads(tasks, network=ckpt.network)
    return sorted(problems, key=lambda p: (p.variable or "", str(p.error)))


def _check_doc(ckpt: Storage, spec: ArraySpec, where: str) -> int:
    """The array's own zarr.json must parse and describe the same array as the root document."""
    key = f"{spec.name}/{_format.DOC}"
    doc = ckpt.path(key)
    try:
        raw = ckpt.read_small(key, _format.MAX_ARRAY_DOC_BYTES)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{where}: {doc} is missing") from None
    parsed = _format.parse_array_doc(spec.name, _format.parse_json(raw, where, doc), doc)
    if parsed != spec:
        raise CorruptCheckpointError(
            f"{where}: {doc} describes {parsed.shape} {parsed.dtype} in chunks of "
            f"{parsed.chunk_shape}, the root zarr.json {spec.shape} {spec.dtype} in chunks of "
            f"{spec.chunk_shape}"
        )
    return 0


def _check_chunk(ckpt: Storage, key: str, spec: ArraySpec, where: str, expected: str | None) -> int:
    """Read the chunk `key`, checking its checksums and, where the root document records one,
    its content hash."""
    content = xxhash.xxh3_128()
    if spec.band_rows is None:
        out = np.empty(spec.chunk_shape, spec.dtype)
        ckpt.read_chunk_into(key, out, where)
        content.update(_format.bytes_view(out))
    else:
        band = _format.band_nbytes(spec)
        nbands = spec.chunk_nbytes // band
        step = max(1, _PIECE_BYTES // band)
        for first in range(0, nbands, step):
            count = min(step, nbands - first)
            out = np.empty((count * spec.band_rows, *spec.chunk_shape[1:]), spec.dtype)
            ckpt.read_bands_into(key, out, first, nbands, band, where)
            content.update(_format.bytes_view(out))
    if expected is not None and content.hexdigest() != expected:
        raise CorruptCheckpointError(
            f"{where}: chunk file {ckpt.path(key)} passes its checksums but its content is not "
            f"what the checkpoint recorded ({_format.HASH} {content.hexdigest()}, recorded "
            f"{expected}): it was rewritten with other data"
        )
    return spec.chunk_nbytes


def verify(path: Any) -> None:
    """Read every chunk of the checkpoint at `path` and check its size and checksums, and check
    each array's own `zarr.json`.

    Raises `IncompleteCheckpointError` when parts are only missing, else
    `CorruptCheckpointError`, naming every damaged variable and file (not just the first).
    """
    ckpt = open_storage(path)
    workers = Workers()
    try:
        problems = check(ckpt, workers)
    finally:
        workers.close()
    if not problems:
        return
    missing = all(isinstance(p.error, IncompleteCheckpointError) for p in problems)
    names = sorted({p.variable or "(checkpoint)" for p in problems})
    details = "; ".join(str(p.error) for p in problems[:20])
    more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
    kind = IncompleteCheckpointError if missing else CorruptCheckpointError
    raise kind(
        f"checkpoint {ckpt.url} is {'incomplete' if missing else 'damaged'}: "
        f"{len(names)} variable(s) {names[:20]}: {details}{more}. Restore another "
        "checkpoint (e.g. an earlier step)"
    )
