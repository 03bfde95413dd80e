"""`Storage`: the one interface between asyncckpt and where checkpoints live.

A `Storage` is a place, a directory on a file system or a prefix in an object store, addressed
by `url` (an absolute path or a normalized URL); `child(key)` is a place under it, and every
other method takes keys relative to it ('/'-separated). Methods block and run on asyncckpt's
worker threads; a storage owns no threads. Missing files raise `FileNotFoundError`; what a
checkpoint's reader must report (damage, missing chunks) is raised as the `CheckpointError`s
that name the file.

What it offers, by group:
- places: `child`, `path`, `kind` (nothing, a file, a directory), `local_path`, `identity`;
- bytes: `read_small` (documents), `get` (whole, ranges, suffixes), `write`, `delete`, `exists`,
  `size`, and the chunk files of docs/FORMAT.md:
  `write_chunk`, `read_chunk_into`, `read_bands_into` (ranged reads into caller memory),
  `read_chunk_file` (a whole file, for copies and checks), `map_chunk` (a copy-on-write mapping
  where the backend can, else None);
- listing: `list_dir`, `list_dirs`, `checkpoint_states`;
- writing a checkpoint: `check_writable` (early and cheap), `begin` (where to write, refusing
  what must not be replaced), or `begin_in` (over a deleted checkpoint's files) and
  `remove_stale`, `sync`, `commit` (durable, then visible in one step), `discard`;
- deleting one: `unlist` (out of every listing at once, durably), `remove` (the files),
  `set_aside` (moved whole under another name); `leftovers` of crashed saves and deletions;
- `lock`: the writer lock of a manager directory, where the backend has one.

This base class implements the chunk-file operations over three primitives (`get`, `size`,
`write`), as an object store needs them: one request per chunk, the shard index first for
banded chunks. The local file system overrides them with file-descriptor I/O (one `preadv`
straight into the caller's buffer, `mmap`).
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from .. import _format
from ..errors import CheckpointExistsError, CorruptCheckpointError

COALESCE_GAP = 1 << 20  # `read_runs_into`: runs closer than this share one request
COALESCE_MAX = 64 << 20  # ... up to this many bytes per request

State = Literal["committed", "leftover"] | None
"""What a place under a directory holds: a committed checkpoint, the leftover of an interrupted
save or deletion (the next writer removes it), or neither."""


class WriterLock(ABC):
    """An exclusive lock on a directory, held by the one writer that may save and delete."""

    @abstractmethod
    def release(self) -> None: ...


class Storage(ABC):
    url: str
    """Where it is: an absolute path or a normalized URL (`s3://bucket/prefix`)."""
    network: bool = False
    """Requests wait on a network: run many at once (the network pool)."""
    has_directories: bool = False
    """A directory exists on its own, empty or not (a prefix exists only through its objects)."""
    recycles: bool = False
    """`begin_in` writes a new checkpoint over the files of a deleted one (a file system, where
    creating a file costs several times more than writing over one)."""

    # -- places ----------------------------------------------------------------------------------

    @abstractmethod
    def child(self, key: str) -> Storage:
        """The place `key` under this one."""

    def path(self, key: str = "") -> str:
        """The full path or URL of `key`, for messages."""
        return posixpath.join(self.url, key) if key else self.url

    @property
    def local_path(self) -> str | None:
        """The path of this place on a local (or mounted) file system, if it is on one."""
        return None

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and type(other) is type(self) and other.url == self.url

    def __hash__(self) -> int:
        return hash((type(self), self.url))

    # -- bytes -----------------------------------------------------------------------------------

    @abstractmethod
    def read_small(self, key: str, limit: int) -> bytes:
        """A whole metadata document; more than `limit` bytes is a `CorruptCheckpointError`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """A file (object) exists at `key`."""

    @abstractmethod
    def write(self, key: str, *buffers: Any) -> None:
        """Create or replace `key` with the concatenation of `buffers` (any buffer objects). A
        file that another checkpoint or a reader shares is never changed: it is replaced."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the file (object) `key`; FileNotFoundError if there is none (on disk)."""

    @abstractmethod
    def get(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        suffix: int | None = None,
    ) -> np.ndarray:
        """The bytes of `key` (uint8), or of `[start, end)`, or its last `suffix` bytes."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The size of `key` in bytes."""

    @abstractmethod
    def kind(self) -> Literal["missing", "file", "directory"]:
        """What is at this place: nothing, one file (object), or a directory (a prefix that
        holds objects)."""

    # -- chunk files (docs/FORMAT.md "Chunk files") ----------------------------------------------

    def write_chunk(
        self,
        key: str,
        data: np.ndarray | memoryview,
        band_nbytes: int | None,
        digest: str | None = None,
    ) -> str:
        """Write the chunk file of `data` (an array, or its bytes: `_format.bytes_view`): plain,
        or in row bands of `band_nbytes`. Return the data's content hash (`_format.chunk_hash`):
        `digest` where the caller took it already, else taken in the checksums' pass."""
        view = _format.bytes_view(data)
        if band_nbytes is None and view.nbytes <= _format.PIECE:  # most chunks: in one piece
            self.write(key, view, _format.crc_bytes(view))
            return _format.chunk_hash(view) if digest is None else digest
        sums = _format.Sums(content=digest is None)
        self._write_chunk_file(key, _format.chunk_file(view, band_nbytes), sums)
        return sums.content_hash() if digest is None else digest

    def _write_chunk_file(self, key: str, chunk: _format.ChunkFile, sums: _format.Sums) -> None:
        """Write `chunk` as the file `key`, its checksums taken by `sums` on the way."""
        self.write(key, *chunk.buffers(sums))

    def _get(self, key: str, where: str, expected: int | None = None, **request: int) -> np.ndarray:
        """`get`, with a missing file or a wrong size reported as the checkpoint's problem."""
        try:
            data = self.get(key, **request)
        except FileNotFoundError:
            raise _format.missing_chunk(self.path(key), where) from None
        if expected is not None and data.nbytes != expected:
            raise _format.wrong_size(self.path(key), data.nbytes, expected, where)
        return data

    def read_chunk_into(self, key: str, out: np.ndarray, where: str) -> None:
        """Fill the C-contiguous `out` from a plain chunk file; verify its size and checksum."""
        view = _format.bytes_view(out)
        data = self._get(key, where, view.nbytes + _format.CRC_BYTES)
        np.frombuffer(view, np.uint8)[:] = data[: -_format.CRC_BYTES]
        _format.check_crc(view, data[-_format.CRC_BYTES :].tobytes(), self.path(key), where)

    def read_bands_into(
        self, key: str, out: np.ndarray, first: int, nbands: int, band_nbytes: int, where: str
    ) -> None:
        """Fill the C-contiguous `out` with bands `first`, `first + 1`, ... of a banded chunk file
        of `nbands` bands, verifying each band's checksum and the shard index. The index is read
        first (a suffix): it says where the bands are."""
        path = self.path(key)
        view = _format.bytes_view(out)
        count = view.nbytes // band_nbytes
        size = _format.index_nbytes(nbands)
        index = self._get(key, where, size, suffix=size).tobytes()
        try:
            stride = _format.check_index(memoryview(index), nbands, band_nbytes, path, where)
        except CorruptCheckpointError:  # say so if the file is simply too short or long
            _format.stride_of_size(self.size(key), nbands * band_nbytes, band_nbytes, path, where)
            raise
        crcs = bytearray(_format.CRC_BYTES * count)
        pads = bytearray(stride - band_nbytes - _format.CRC_BYTES)
        buffers = _format.band_read_buffers(view, crcs, pads, stride, band_nbytes)
        start = first * stride
        length = sum(b.nbytes for b in buffers)
        data = self._get(key, where, length, start=start, end=start + length)
        offset = 0
        for b in buffers:
            np.frombuffer(b, np.uint8)[:] = data[offset : offset + b.nbytes]
            offset += b.nbytes
        _check_bands(view, crcs, first, band_nbytes, path, where)

    def read_runs_into(self, key: str, runs: Sequence[tuple[int, memoryview]], where: str) -> None:
        """Fill each buffer of `runs` with the bytes of the file `key` from its offset (offsets
        ascending, runs not overlapping); a file too short for them is damage. Here: one ranged
        `get` per stretch of runs less than `COALESCE_GAP` apart, since an object store bills and
        waits per request; the local disk reads each run straight into its buffer."""
        i = 0
        while i < len(runs):
            start = runs[i][0]
            end = start + runs[i][1].nbytes
            j = i + 1
            while j < len(runs) and runs[j][0] - end < COALESCE_GAP and end - start < COALESCE_MAX:
                end = runs[j][0] + runs[j][1].nbytes
                j += 1
            try:
                data = self._get(key, where, end - start, start=start, end=end)
            except CorruptCheckpointError:
                raise
            except Exception:
                size = self.size(key)
                if end > size:  # a range past the end (object stores refuse it): too short
                    raise _format.wrong_size(self.path(key), size, end, where) from None
                raise
            for offset, buf in runs[i:j]:
                np.frombuffer(buf, np.uint8)[:] = data[offset - start : offset - start + buf.nbytes]
            i = j

    def reuse_chunk(self, key: str, source: Storage, source_key: str) -> bool:
        """Make the chunk file `key` the same as `source_key` of the committed checkpoint
        `source` without passing its bytes through this process (a hard link, a server-side
        copy), and say whether it did; where it cannot (another file system or bucket, the
        source gone) the caller writes the chunk. The two must stay independent: deleting
        either never changes the other. Here: never."""
        return False

    def read_chunk_file(self, key: str, sizes: tuple[int, ...], where: str) -> memoryview:
        """The whole of a chunk file, which must hold one of `sizes` bytes (checksums are the
        caller's: `_format.check_chunk_file`)."""
        data = self._get(key, where)
        if data.nbytes not in sizes:
            raise _format.wrong_size(self.path(key), data.nbytes, sizes[0], where)
        return memoryview(data).cast("B")  # type: ignore[arg-type]

    def map_chunk(
        self, key: str, nbytes: int, band_nbytes: int | None, where: str
    ) -> np.ndarray | None:
        """The data of a chunk file as a private copy-on-write mapping of its pages (uint8),
        every checksum verified; None where this backend or file cannot be mapped: read it."""
        return None

    def prefetch(self, key: str, nbytes: int) -> None:
        """Start fetching the first `nbytes` of the file `key` into memory and return without
        waiting: a hint that it is read soon (what fails is the read's to report). Nothing, by
        default."""
        return None

    def drop_prefetched(self) -> None:
        """Let go of what `prefetch` holds for reads that never came (a restore that failed part
        way): at once, not when this storage is gone. Nothing, by default."""
        return None

    def check_no_links(self, name: str, where: str, seen: set[str]) -> None:
        """Refuse a variable whose directory is or passes through a symbolic link (which could
        lead outside the checkpoint); `seen`: what the backend found already, kept by the caller
        across the arrays of one restore (an empty set for the first)."""
        return None  # the default: nothing to do

    def identity(self) -> Any:
        """Something that changes when this place is deleted and made again (None: nothing
        here tells; a checkpoint's root document tells instead)."""
        return None

    # -- listing ---------------------------------------------------------------------------------

    @abstractmethod
    def list_dir(self, key: str = "") -> list[str]:
        """The names directly under `key`, sorted; none when it does not exist."""

    def list_dirs(self, keys: list[str]) -> list[list[str]]:
        """`list_dir` of each of `keys`."""
        return [self.list_dir(k) for k in keys]

    @abstractmethod
    def checkpoint_states(self, names: list[str]) -> list[State]:
        """What each of the places `names` directly under this one holds."""

    # -- writing a checkpoint --------------------------------------------------------------------

    def make_dirs(self, keys: Iterable[str], *, parents: bool = True) -> None:
        """Create the directories `keys` where the backend has directories: with their missing
        parents, or (`parents=False`) in parents that exist."""
        return None  # the default: nothing to do

    def check_writable(self, *, replace: bool) -> None:
        """Refuse at once, before anything is written, a checkpoint here that must not be
        written (foreign data; an existing checkpoint without `replace`), where that is cheap
        to tell; `begin` checks again in any case."""
        return None  # the default: nothing to do

    def _refuse_foreign(self, names: list[str], *, replace: bool) -> None:
        """The rule of what a save may replace, given the `names` at this place: nothing, an
        uncommitted leftover of asyncckpt, or (with `replace`) an asyncckpt checkpoint."""
        if _format.DOC in names:
            if not self.is_checkpoint():
                raise CheckpointExistsError(
                    f"cannot save to {self.url}: it holds a Zarr hierarchy that is not an "
                    "asyncckpt checkpoint; choose another path (asyncckpt never overwrites "
                    "foreign data)"
                )
            if not replace:
                raise CheckpointExistsError(
                    f"a checkpoint already exists at {self.url}; pass `force=True` to replace it"
                )
        elif names and _format.UNCOMMITTED not in names:
            raise CheckpointExistsError(
                f"cannot save to {self.url}: it is not empty and is not a checkpoint; choose "
                "another path (asyncckpt never deletes data it did not write)"
            )

    def is_checkpoint(self) -> bool:
        """Whether a committed asyncckpt checkpoint is here (its root document says so)."""
        try:
            raw = self.read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES)
        except (OSError, CorruptCheckpointError):
            return False
        return _format.is_asyncckpt_root(raw)

    @abstractmethod
    def begin(self, *, replace: bool) -> Storage:
        """Start writing a checkpoint here: the place to write it into until `commit`. Refuses
        (`CheckpointExistsError`) foreign data, and an existing checkpoint without `replace`."""

    def begin_in(self, spare: Storage, *, replace: bool) -> Storage | None:
        """Like `begin`, but the place to write is `spare`, the files of a checkpoint taken out
        of the listing (`unlist`), moved to where `begin` would write: the save writes over
        them (`write` never changes a file another checkpoint or process holds) and removes
        what it does not write (`remove_stale`). None where this backend cannot (`recycles`):
        begin afresh and remove `spare`. Here: never."""
        return None

    def remove_stale(self, files: Iterable[str], dirs: Iterable[str]) -> None:
        """Remove the `files` and the directories `dirs` (with whatever is in them) of a
        checkpoint being written over (`begin_in`), which the new one does not write."""
        for key in files:
            try:
                self.delete(key)
            except FileNotFoundError:
                pass

    @abstractmethod
    def sync(self) -> None:
        """Make everything written under this place durable."""

    @abstractmethod
    def commit(self, staged: Storage, *, replace: bool) -> None:
        """Make the finished checkpoint `staged` (from `begin`, its root document written last,
        synced) durable and visible here in one step; with `replace`, instead of the checkpoint
        that is here, which only an asyncckpt checkpoint may be."""

    @abstractmethod
    def discard(self, staged: Storage) -> None:
        """Remove what a save that failed wrote into `staged`; never a committed checkpoint.
        Best effort: what stays is a leftover that the next writer removes."""

    # -- deleting --------------------------------------------------------------------------------

    @abstractmethod
    def unlist(self) -> Storage:
        """Take the checkpoint here out of every listing, durably, in one step; return the
        place that still holds its files (`remove` them later). FileNotFoundError if there is no
        committed checkpoint here."""

    @abstractmethod
    def remove(self) -> None:
        """Remove everything under this place (nothing there is fine)."""

    @abstractmethod
    def set_aside(self, name: str) -> Storage:
        """Move the checkpoint here, whole, to the sibling `name`; return that place."""

    @abstractmethod
    def leftovers(self) -> list[Storage]:
        """Interrupted saves and deletions under this directory."""

    def lock(self) -> WriterLock | None:
        """Take this directory's writer lock (`DirectoryLockedError` if another writer holds
        it); None where the backend has no locks."""
        return None

    def prepare_directory(self) -> None:
        """Make this place ready to hold many checkpoints (create it, tune it)."""
        return None  # the default: nothing to do


def _check_bands(
    view: memoryview, crcs: bytearray, first: int, band_nbytes: int, path: str, where: str
) -> None:
    for j in range(view.nbytes // band_nbytes):
        _format.check_band(
            view[j * band_nbytes : (j + 1) * band_nbytes],
            crcs[_format.CRC_BYTES * j : _format.CRC_BYTES * (j + 1)],
            first + j,
            path,
            where,
        )
