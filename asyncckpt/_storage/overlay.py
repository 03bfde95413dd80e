"""`Overlay`: a checkpoint as one process's restore reads it when some of its chunks came from
other processes (read once per job, a node-local step fetched from peers): those chunks from
host memory, everything else from the storage underneath. Read only."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .. import _format
from .base import Storage


class Overlay(Storage):
    """`chunks` (chunk key -> the chunk's data as uint8, checksums already verified) over
    `part` (None: nothing underneath, e.g. a host that lost its part of a local step). `doc`:
    the root document to serve instead of the one underneath (None: the one underneath)."""

    def __init__(
        self,
        part: Storage | None,
        url: str,
        chunks: dict[str, np.ndarray],
        doc: bytes | None = None,
    ) -> None:
        self.url = url
        self.network = part.network if part is not None else False
        self._part = part
        self._doc = doc
        self._chunks = chunks

    def in_memory(self, key: str) -> bool:
        """Whether the chunk `key` is served from host memory (reading it costs no I/O)."""
        return key in self._chunks

    def _own_doc(self, key: str) -> bool:
        return self._doc is not None and key == _format.DOC

    def _disk(self, key: str) -> Storage:
        if self._part is None:
            raise FileNotFoundError(f"{self.path(key)}: this host lost its part of the step")
        return self._part

    def child(self, key: str) -> Storage:
        return self._disk(key).child(key)

    def read_small(self, key: str, limit: int) -> bytes:
        if self._own_doc(key):
            return self._doc  # type: ignore[return-value]
        return self._disk(key).read_small(key, limit)

    def exists(self, key: str) -> bool:
        if self._own_doc(key) or key in self._chunks:
            return True
        return self._part is not None and self._part.exists(key)

    def get(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        suffix: int | None = None,
    ) -> np.ndarray:
        if not self._own_doc(key):
            return self._disk(key).get(key, start=start, end=end, suffix=suffix)
        doc = np.frombuffer(self._doc, np.uint8)  # type: ignore[arg-type]
        return doc[-suffix:] if suffix is not None else doc[start:end]

    def size(self, key: str) -> int:
        return len(self._doc) if self._own_doc(key) else self._disk(key).size(key)  # type: ignore[arg-type]

    def kind(self) -> Literal["missing", "file", "directory"]:
        return "directory"

    def read_chunk_into(self, key: str, out: np.ndarray, where: str) -> None:
        if key not in self._chunks:
            return self._disk(key).read_chunk_into(key, out, where)
        np.frombuffer(_format.bytes_view(out), np.uint8)[:] = self._chunks[key]
        return None

    def read_bands_into(
        self, key: str, out: np.ndarray, first: int, nbands: int, band_nbytes: int, where: str
    ) -> None:
        if key not in self._chunks:
            return self._disk(key).read_bands_into(key, out, first, nbands, band_nbytes, where)
        view = np.frombuffer(_format.bytes_view(out), np.uint8)
        view[:] = self._chunks[key][first * band_nbytes : first * band_nbytes + view.nbytes]
        return None

    def map_chunk(
        self, key: str, nbytes: int, band_nbytes: int | None, where: str
    ) -> np.ndarray | None:
        if key in self._chunks:
            return self._chunks[key]
        return self._disk(key).map_chunk(key, nbytes, band_nbytes, where)

    def prefetch(self, key: str, nbytes: int) -> None:
        if key not in self._chunks and self._part is not None:
            self._part.prefetch(key, nbytes)

    def drop_prefetched(self) -> None:
        if self._part is not None:
            self._part.drop_prefetched()

    def check_no_links(self, name: str, where: str, seen: set[str]) -> None:
        if self._part is not None:
            self._part.check_no_links(name, where, seen)

    def identity(self) -> Any:
        return self._part.identity() if self._part is not None else None

    def _read_only(self, *_: Any, **__: Any) -> Any:
        raise TypeError(f"{self.url}: a checkpoint being restored is read only")

    write = delete = list_dir = checkpoint_states = begin = sync = commit = discard = _read_only
    unlist = remove = set_aside = leftovers = _read_only
