"""The on-disk format, all of it, as pure functions (no I/O): docs/FORMAT.md in code.

A checkpoint is a Zarr v3 group; every array leaf is a Zarr array named by its variable name, one
chunk per shard, codecs `bytes` + `crc32c`; chunks over 4 MiB are Zarr shards of row bands; the
root `zarr.json` is written last, carries consolidated metadata and the `asyncckpt` attributes,
and marks the commit. Around checkpoints: the names of temporary, deleted and damaged ones, of a
manager directory's steps, of its lock and of the object-store marker.

Sections: array and group documents; chunk files (byte layouts, checksums); the root document;
parsing (everything parsed here comes from disk and is untrusted); names. Storage backends write
and read the bytes these functions lay out and check; changing the layout is this module and
FORMAT.md.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import fastcrc
import numpy as np
import orjson
import xxhash

from . import _dtypes
from .errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedTypeError,
)

FORMAT_VERSION = 1
DOC = "zarr.json"
ATTR = "asyncckpt"
MAX_NDIM = 64
MAX_ROOT_DOC_BYTES = 256 << 20  # ~500 bytes per variable: half a million variables
MAX_ARRAY_DOC_BYTES = 1 << 20
ARRAY_DOC_AHEAD = 4096  # what an array's zarr.json is fetched ahead by (they hold < 1 KiB)
MAX_CHUNKS = 1 << 20  # per array; asyncckpt writes one chunk per shard
BAND_BYTES = 4 << 20  # target size of the row bands of large chunks
MIN_BAND_BYTES = 1 << 20  # below this, bands cost more syscalls than they save bytes


# ---------------------------------------------------------------------------------------------
# Variable names and chunk grids

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_RESERVED = frozenset({".", "..", DOC})
_MAX_PART = 200  # bytes; file systems allow 255 per path component
ROOT_LEAF_NAME = "~root"  # a tree that is a single leaf; `~` never appears in an escaped key


def escape_part(part: str) -> str:
    """Escape one keypath part into a valid Zarr node name (injective up to hash collisions)."""
    if part == "":
        return "~"
    if _SAFE.issuperset(part):  # most parts: checked in C (restores escape thousands of names)
        out = part
    else:
        out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in part)
    if out in _RESERVED or out.startswith("__"):
        out = f"%{ord(out[0]):02X}{out[1:]}"
    if len(out) > _MAX_PART:
        digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        out = f"{out[: _MAX_PART - 25]}~{digest}"
    return out


def variable_name(parts: list[str]) -> str:
    """The name of the variable at the keypath with these (unescaped) parts."""
    if not parts:
        return ROOT_LEAF_NAME
    return "/".join([escape_part(p) for p in parts])


def chunk_shape(
    shape: tuple[int, ...], shards: Iterable[tuple[slice, ...]] | None
) -> tuple[int, ...]:
    """The chunk shape of an array of `shape` whose shards are the regions `shards` (None: one
    chunk): the largest shape that tiles every shard (the shard shape when shards are even, as
    NamedSharding's are). A dimension of length 0 has chunks of length 1."""
    if shards is None:
        return tuple(max(n, 1) for n in shape)
    shards = list(shards)
    chunk = []
    for dim, size in enumerate(shape):
        g = size
        for index in shards:
            s = index[dim]
            g = math.gcd(g, s.start or 0, size if s.stop is None else s.stop)
        chunk.append(max(g, 1))
    return tuple(chunk)


def index_region(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A shard's index into an array of `shape`, as a hashable ((start, stop), ...)."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def chunk_id(coords: tuple[int, ...]) -> str:
    """A chunk's coordinates as the documents name them (`"0,1"`; `""` when 0-d)."""
    return ",".join(map(str, coords))


def chunk_id_coords(key: str) -> tuple[int, ...]:
    """The coordinates of a `chunk_id`."""
    return tuple(int(i) for i in key.split(",")) if key else ()


@functools.lru_cache(maxsize=4096)  # thousands of arrays share a few, `(0,)` most of all
def _chunk_suffix(coords: tuple[int, ...]) -> str:
    return "/c" + "".join(f".{i}" for i in coords)


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """One array variable as stored."""

    name: str
    """Variable name: the array's path inside the checkpoint group."""
    shape: tuple[int, ...]
    """Global shape."""
    dtype: np.dtype
    """Stored NumPy dtype (`uint32` key data for PRNG keys)."""
    chunk_shape: tuple[int, ...]
    """Shape of every chunk (one chunk per shard)."""
    prng_impl: str | None = None
    """For typed PRNG key arrays: the key implementation (`threefry2x32` ...)."""
    band_rows: int | None = None
    """Large chunks are stored as Zarr shards of row bands: inner chunks of `band_rows` rows
    (the chunk's full extent in every other dimension), each with its own crc32c, so a reader
    can read and verify only the rows it needs. None: a plain chunk."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each dimension."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape))

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    def chunk_key(self, coords: tuple[int, ...]) -> str:
        """The key of one chunk relative to the checkpoint root (`w/c.0.1`; `w/c` when 0-d)."""
        return self.name + _chunk_suffix(coords)

    def chunk_coords(self) -> list[tuple[int, ...]]:
        """Coordinates of every chunk in C order (`[()]` when 0-d, none when empty)."""
        grid = self.grid
        if all(n == 1 for n in grid):  # one chunk (most small arrays): no np.ndindex
            return [(0,) * len(grid)]
        return [tuple(c) for c in np.ndindex(*grid)]

    def chunk_slices(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, self.chunk_shape))


def array_doc(spec: ArraySpec) -> bytes:
    """The Zarr v3 `zarr.json` of one array, encoded (it does not depend on the name)."""
    return _array_doc(spec.shape, spec.dtype, spec.chunk_shape, spec.prng_impl, spec.band_rows)


def _data_codecs(dtype: np.dtype) -> list[dict[str, Any]]:
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return [bytes_codec, {"name": "crc32c"}]


_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def band_rows_for(chunk_shape: tuple[int, ...], itemsize: int) -> int | None:
    """Rows per band for a chunk of `chunk_shape`: the most rows that divide the chunk and fit in
    BAND_BYTES. None (a plain chunk) for chunks of one band, or whose bands would be tiny."""
    if len(chunk_shape) == 0 or math.prod(chunk_shape) * itemsize <= BAND_BYTES:
        return None
    row = math.prod(chunk_shape[1:]) * itemsize
    rows = chunk_shape[0]
    fits = [
        d
        for k in range(1, math.isqrt(rows) + 1)
        if rows % k == 0
        for d in (k, rows // k)
        if d * row <= BAND_BYTES
    ]
    best = max(fits, default=0)
    return best if best * row >= MIN_BAND_BYTES and best < rows else None


def band_nbytes(spec: ArraySpec) -> int:
    """Bytes of data in one band of `spec` (without its checksum)."""
    assert spec.band_rows is not None
    return spec.band_rows * math.prod(spec.chunk_shape[1:]) * spec.dtype.itemsize


@functools.lru_cache(maxsize=4096)  # thousands of leaves share a handful of documents
def _array_doc(
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunk_shape: tuple[int, ...],
    prng_impl: str | None,
    band_rows: int | None,
) -> bytes:
    codecs = _data_codecs(dtype)
    if band_rows is not None:
        codecs = [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [band_rows, *chunk_shape[1:]],
                    "codecs": codecs,
                    "index_codecs": _INDEX_CODECS,
                    "index_location": "end",
                },
            }
        ]
    attributes = {ATTR: {"prng_impl": prng_impl}} if prng_impl else {}
    return _compact(
        {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(shape),
            "data_type": _dtypes.zarr_name(dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "fill_value": _dtypes.fill_value_json(dtype),
            "codecs": codecs,
            "attributes": attributes,
            "storage_transformers": [],
        }
    )


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


GROUP_DOC = _compact({"zarr_format": 3, "node_type": "group", "attributes": {}})


def node_order(name: str) -> tuple[int, str]:
    """The order of the nodes in consolidated metadata: by depth, then by name. zarr-python up to
    3.1 rebuilds the hierarchy with `itertools.groupby` over the keys sorted by depth only, so
    the children of one group must be adjacent; this order makes them so (zarr-python itself
    writes it since 3.1.2)."""
    return name.count("/"), name


def group_names(array_names: list[str]) -> list[str]:
    """Every intermediate group implied by the array names, parents first."""
    groups = {n.rsplit("/", i)[0] for n in array_names for i in range(1, n.count("/") + 1)}
    return sorted(groups, key=node_order)


# ---------------------------------------------------------------------------------------------
# Chunk files
#
# A plain chunk file is the chunk's C-order bytes, then their crc32c (4 bytes, little endian): the
# Zarr `bytes` + `crc32c` codecs. A banded chunk (Zarr `sharding_indexed`, row bands as inner
# chunks) is
#   band 0 | crc 0 | pad | band 1 | crc 1 | pad | ... | index | index crc
# with the index holding (offset, nbytes) as 2 x uint64 per band. Band i starts at i * stride.
# When a band is a whole number of 4 KiB pages, stride is band + 4 rounded up to 4 KiB ("aligned":
# every band starts on a page, so a restore can map the bands next to each other in memory instead
# of copying them); otherwise stride is band + 4 and there is no padding ("packed", also what
# asyncckpt wrote before aligned bands). The file size tells the two apart.

BAND_ALIGN = 4096
CRC_BYTES = 4


# CRC-32C is fastcrc's `iscsi`: 0.033 CPU s per GiB here against 0.069 for the `crc32c` package
# (SSE 4.2), which is a third of a save's CPU (benchmarks/README.md, "Writes around the page
# cache"); both let other threads run meanwhile.
_iscsi = fastcrc.crc32.iscsi


def crc32c(buf: Any) -> int:
    """The CRC-32C (Castagnoli) of a buffer."""
    return int(_iscsi(buf))


def crc_bytes(buf: Any) -> bytes:
    """The checksum that follows `buf` in a chunk file."""
    return crc32c(buf).to_bytes(CRC_BYTES, "little")


def bytes_view(a: np.ndarray | memoryview) -> memoryview:
    """The bytes of a C-contiguous array (any dtype, bfloat16 too) without a copy (a memoryview
    is taken to be such bytes already)."""
    if isinstance(a, memoryview):
        return a
    return memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def band_stride(band_nbytes: int) -> int:
    """The distance between the starts of two bands in the files asyncckpt writes."""
    if band_nbytes % BAND_ALIGN:
        return band_nbytes + CRC_BYTES
    return -(-(band_nbytes + CRC_BYTES) // BAND_ALIGN) * BAND_ALIGN


def band_strides(band_nbytes: int) -> tuple[int, ...]:
    """The strides a reader accepts: the one asyncckpt writes now, and the packed one."""
    return tuple(dict.fromkeys((band_stride(band_nbytes), band_nbytes + CRC_BYTES)))


def band_index(nbands: int, band_nbytes: int, stride: int) -> bytes:
    """The shard index of a banded chunk (without its checksum)."""
    index = np.empty((nbands, 2), "<u8")
    index[:, 0] = np.arange(nbands, dtype=np.uint64) * stride
    index[:, 1] = band_nbytes + CRC_BYTES
    return index.tobytes()


def index_nbytes(nbands: int) -> int:
    """Size of the shard index of `nbands` bands, with its checksum."""
    return 16 * nbands + CRC_BYTES


def chunk_file_sizes(nbytes: int, band_nbytes: int | None) -> tuple[int, ...]:
    """Every size a readable chunk file holding `nbytes` of data may have; the first is the
    layout asyncckpt writes now."""
    if band_nbytes is None:
        return (nbytes + CRC_BYTES,)
    nbands = nbytes // band_nbytes
    return tuple(nbands * s + index_nbytes(nbands) for s in band_strides(band_nbytes))


PIECE = 1 << 20
"""The bytes a chunk's checksums and content hash take at a time (`Sums`): a piece stays in the
CPU's cache from the first pass over it to the last."""


def pieces(view: memoryview) -> Iterator[memoryview]:
    """`view` in consecutive pieces of at most `PIECE` bytes."""
    for start in range(0, view.nbytes, PIECE):
        yield view[start : start + PIECE]


class Sums:
    """The CRC-32C of each data part of a chunk file and, if `content`, the content hash
    (`chunk_hash`) of all of them, taken as their bytes go by in pieces (`update`, in order):
    each piece is read from memory once for both, and a writer that copies it (an `O_DIRECT`
    bounce buffer) passes the copy while it is in the cache. 1 GiB in 64 MiB chunk files here,
    CPU s per GB: 0.20 against 0.25 for hash, checksums and write each in a pass of their own
    from page-aligned memory, 0.27 against 0.42 through the bounce buffer
    (`benchmarks/chunk_passes.py`; benchmarks/README.md, "One pass over a chunk's bytes")."""

    def __init__(self, content: bool) -> None:
        self._crc = 0
        self._hash = xxhash.xxh3_128() if content else None

    def update(self, piece: memoryview) -> None:
        self._crc = _iscsi(piece, self._crc)
        if self._hash is not None:
            self._hash.update(piece)

    def crc_bytes(self) -> bytes:
        """The checksum of the data part whose bytes went by since the last call."""
        crc, self._crc = self._crc, 0
        return int(crc).to_bytes(CRC_BYTES, "little")

    def content_hash(self) -> str:
        assert self._hash is not None, "Sums(content=False) takes no content hash"
        return self._hash.hexdigest()


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """The chunk file of some data, as written: each data part (the whole chunk, or each row band)
    followed by its checksum and `gap` (zero padding), then `trailer` (a banded chunk's shard
    index and the index's checksum)."""

    parts: list[memoryview]
    gap: bytes = b""
    trailer: bytes = b""

    @property
    def nbytes(self) -> int:
        data = sum(p.nbytes for p in self.parts)
        return data + len(self.parts) * (CRC_BYTES + len(self.gap)) + len(self.trailer)

    def buffers(self, sums: Sums) -> list[memoryview | bytes]:
        """The buffers that, written one after another, make the file (no copy of the data:
        one `writev` writes them), the checksums taken by `sums`."""
        out: list[memoryview | bytes] = []
        for part in self.parts:
            for piece in pieces(part):
                sums.update(piece)
            out += [part, sums.crc_bytes()]
            if self.gap:
                out.append(self.gap)
        if self.trailer:
            out.append(self.trailer)
        return out


def chunk_file(data: np.ndarray | memoryview, band_nbytes: int | None) -> ChunkFile:
    """The chunk file of `data`: plain, or in row bands of `band_nbytes`."""
    view = bytes_view(data)
    if band_nbytes is None:
        return ChunkFile([view])
    stride = band_stride(band_nbytes)
    bands = [view[start : start + band_nbytes] for start in range(0, view.nbytes, band_nbytes)]
    index = band_index(len(bands), band_nbytes, stride)
    return ChunkFile(bands, bytes(stride - band_nbytes - CRC_BYTES), index + crc_bytes(index))


def band_read_buffers(
    view: memoryview, crcs: bytearray, pads: bytearray, stride: int, band_nbytes: int
) -> list[memoryview]:
    """The buffers one `preadv` fills from consecutive bands into `view`: data, checksum
    (into `crcs`), padding (into `pads`), ..."""
    buffers = []
    for j in range(view.nbytes // band_nbytes):
        buffers += [
            view[j * band_nbytes : (j + 1) * band_nbytes],
            memoryview(crcs)[CRC_BYTES * j : CRC_BYTES * (j + 1)],
        ]
        if stride > band_nbytes + CRC_BYTES and (j + 1) * band_nbytes < view.nbytes:
            buffers.append(memoryview(pads))
    return buffers


def missing_chunk(path: str, where: str) -> IncompleteCheckpointError:
    return IncompleteCheckpointError(
        f"{where}: chunk file {path} is missing; the checkpoint is incomplete"
    )


def wrong_size(path: str, size: int, expected: int, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: chunk file {path} has {size} bytes, expected {expected} "
        "(truncated or overwritten)"
    )


def stride_of_size(size: int, nbytes: int, band_nbytes: int, path: str, where: str) -> int:
    """The stride of a banded chunk file of `size` bytes (it must be one of the known layouts)."""
    nbands = nbytes // band_nbytes
    for stride in band_strides(band_nbytes):
        if size == nbands * stride + index_nbytes(nbands):
            return stride
    raise wrong_size(path, size, chunk_file_sizes(nbytes, band_nbytes)[0], where)


def check_crc(data: Any, crc: Any, path: str, where: str) -> None:
    """A plain chunk's data against its checksum."""
    if crc32c(data) != int.from_bytes(crc, "little"):
        raise CorruptCheckpointError(f"{where}: checksum mismatch in chunk file {path}")


def check_band(band: Any, crc: Any, number: int, path: str, where: str) -> None:
    if crc32c(band) != int.from_bytes(crc, "little"):
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch in band {number} of chunk file {path}"
        )


def check_index(
    index: memoryview,
    nbands: int,
    band_nbytes: int,
    path: str,
    where: str,
    stride: int | None = None,
) -> int:
    """Check a shard index (and its checksum) against the layouts asyncckpt reads; its stride."""
    body = bytes(index[:-CRC_BYTES])
    if crc32c(body) == int.from_bytes(index[-CRC_BYTES:], "little"):
        for s in band_strides(band_nbytes) if stride is None else (stride,):
            if body == band_index(nbands, band_nbytes, s):
                return s
    raise CorruptCheckpointError(f"{where}: the shard index of chunk file {path} is damaged")


def check_chunk_file(
    data: memoryview, nbytes: int, band_nbytes: int | None, path: str, where: str
) -> None:
    """Verify the size and every checksum of a whole chunk file's bytes, as read back."""
    if band_nbytes is None:
        if data.nbytes != nbytes + CRC_BYTES:
            raise wrong_size(path, data.nbytes, nbytes + CRC_BYTES, where)
        check_crc(data[:-CRC_BYTES], data[-CRC_BYTES:], path, where)
        return
    stride = stride_of_size(data.nbytes, nbytes, band_nbytes, path, where)
    nbands = nbytes // band_nbytes
    check_index(data[nbands * stride :], nbands, band_nbytes, path, where, stride)
    for j in range(nbands):
        start = j * stride
        check_band(
            data[start : start + band_nbytes],
            data[start + band_nbytes : start + band_nbytes + CRC_BYTES],
            j,
            path,
            where,
        )


# ---------------------------------------------------------------------------------------------
# The root document


def encode_json(doc: Any, *, what: str) -> bytes:
    try:
        return _compact(doc)
    except (TypeError, ValueError) as e:
        raise UnsupportedTypeError(f"{what} cannot be stored as JSON: {e}") from None


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_metrics(metrics: Any, where: str) -> Any:
    """Metrics as JSON: numpy / JAX scalars become numbers, NaN and infinities the strings
    "NaN", "Infinity" and "-Infinity" (JSON has no such numbers)."""

    def convert(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise UnsupportedTypeError(f"{where}: metric keys must be strings (at {path!r})")
            return {k: convert(v, f"{path}/{k}" if path else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float, np.generic)) or getattr(value, "shape", None) == ():
            number = np.asarray(value).item()
            if isinstance(number, float) and not math.isfinite(number):
                return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
            if isinstance(number, (bool, int, float)):
                return number
        raise UnsupportedTypeError(
            f"{where}: metric {path!r} is a {type(value).__name__}; metrics must be numbers "
            "(python, numpy or 0-d JAX scalars), strings, bools, lists or dicts"
        )

    return convert(metrics, "")


def decode_metrics(metrics: Any) -> Any:
    """Inverse of `encode_metrics` (the strings "NaN", "Infinity", "-Infinity" become floats)."""
    if isinstance(metrics, dict):
        return {k: decode_metrics(v) for k, v in metrics.items()}
    if isinstance(metrics, list):
        return [decode_metrics(v) for v in metrics]
    if isinstance(metrics, str) and metrics in _NON_FINITE:
        return _NON_FINITE[metrics]
    return metrics


@dataclass(frozen=True, slots=True)
class StepFields:
    """What a `CheckpointManager` records about a step in its root document."""

    step: int
    metrics: Any = None
    """As given to `save`: numbers (python, numpy, 0-d JAX), strings, lists, dicts; NaN and
    infinities allowed."""
    best: tuple[str, str] | None = None
    """`(best_metric, best_mode)` when the manager ranks steps by a metric name."""


@dataclass(frozen=True, slots=True)
class RootFields:
    """The asyncckpt attributes of a root document known when `save` is called, encoded (so
    checked) then: a `metadata` or metric that JSON cannot hold fails the call, not the write."""

    metadata: Any
    step: int | None = None
    metrics: Any = None
    """Encoded: NaN and infinities as the strings "NaN", "Infinity", "-Infinity"."""
    best: tuple[str, str] | None = None

    @property
    def decoded_metrics(self) -> Any:
        """The metrics as a reader gets them back (plain python numbers)."""
        return decode_metrics(self.metrics)


def root_fields(metadata: Any, step: StepFields | None, where: str) -> RootFields:
    """Encode and check what `save` was given for the root document: it must leave room for the
    rest of it, or no reader would open the checkpoint (`MAX_ROOT_DOC_BYTES`)."""
    size = len(encode_json(metadata, what="`metadata`"))
    if size > MAX_ROOT_DOC_BYTES // 2:
        raise CheckpointWriteError(
            errno.EFBIG,
            f"{where}: `metadata` is {size} bytes of JSON; a checkpoint's root document may "
            f"hold at most {MAX_ROOT_DOC_BYTES} bytes in all (readers refuse more), so keep "
            "metadata small and save large data as arrays in the tree",
        )
    if step is None:
        return RootFields(metadata)
    metrics = None if step.metrics is None else encode_metrics(step.metrics, where)
    return RootFields(metadata, step.step, metrics, step.best)


# ---------------------------------------------------------------------------------------------
# Content hashes: one per chunk, one digest per checkpoint

HASH = "xxh3-128"
"""The content hash of chunks: xxHash's XXH3, 128 bits, of a chunk's data (its C-order bytes,
before checksums and bands), as 32 lower-case hex digits."""


def chunk_hash(data: np.ndarray | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(bytes_view(data))


def content_digest(
    arrays: list[ArraySpec], tree: dict[str, Any], hashes: dict[str, list[str]]
) -> str:
    """One hash of a checkpoint's content: its tree description (structure, python scalars,
    data-iterator states) and, for every array by name, its dtype, shape and chunk hashes. Equal
    digests: equal content, whatever the time, metadata or metrics of the two saves."""
    listed = sorted([a.name, dtype_text(a), list(a.shape), hashes[a.name]] for a in arrays)
    text = json.dumps([tree, listed], sort_keys=True, separators=(",", ":"))
    return f"{HASH}:{xxhash.xxh3_128_hexdigest(text.encode())}"


def dtype_text(spec: ArraySpec) -> str:
    return spec.dtype.str if spec.prng_impl is None else f"{spec.dtype.str}/{spec.prng_impl}"


@dataclass(frozen=True, slots=True)
class Contents:
    """What a save learned while writing, for the root document: each array's chunk hashes (in
    `ArraySpec.chunk_coords` order) and the chunk bytes it wrote (not reused)."""

    hashes: dict[str, list[str]]
    new_bytes: int


@dataclass(frozen=True, slots=True)
class LocalPart:
    """One process's part of a step in a node-local tier (MULTITIER.md): which process wrote
    it, of how many, and which chunks each of them holds (`held[p][array]`: chunk keys
    `"i,j"`). Written once every process's part is durable, so any part names every holder."""

    process: int
    processes: int
    held: list[dict[str, list[str]]]


def root_doc(
    arrays: list[ArraySpec],
    tree: dict[str, Any],
    fields: RootFields,
    *,
    created: float,
    contents: Contents | None = None,
    local_part: LocalPart | None = None,
) -> bytes:
    """The root `zarr.json`: group, consolidated metadata of every node, asyncckpt attributes.

    Assembled from the already-encoded node documents: re-encoding thousands of array documents
    inside one big dict cost ~0.2 s of CPU per save of 4000 leaves."""
    stamp = _dt.datetime.fromtimestamp(created, _dt.UTC).isoformat()
    ours: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": stamp,
        "created_unix": created,
    }
    if fields.step is not None:
        ours.update(step=fields.step, metrics=fields.metrics)
    if fields.best is not None:
        ours["best"] = {"metric": fields.best[0], "mode": fields.best[1]}
    ours.update(tree=tree, metadata=fields.metadata)
    if local_part is not None:
        ours["local_part"] = {
            "process": local_part.process,
            "processes": local_part.processes,
            "held": local_part.held,
        }
    if contents is not None:
        ours.update(
            digest=content_digest(arrays, tree, contents.hashes),
            new_bytes=contents.new_bytes,
            chunk_hashes=contents.hashes,
        )
    nodes = [(g, GROUP_DOC) for g in group_names([a.name for a in arrays])]
    nodes += [(a.name, array_doc(a)) for a in arrays]
    nodes.sort(key=lambda node: node_order(node[0]))
    doc = b"".join(
        [
            b'{"zarr_format":3,"node_type":"group","attributes":',
            encode_json({ATTR: ours}, what="the tree description or `metadata`"),
            b',"consolidated_metadata":{"kind":"inline","must_understand":false,"metadata":{',
            b",".join(json.dumps(name).encode() + b":" + doc for name, doc in nodes),
            b"}}}",
        ]
    )
    if len(doc) > MAX_ROOT_DOC_BYTES:  # what the writer commits, its readers must open
        raise CheckpointWriteError(
            errno.EFBIG,
            f"the root document would be {len(doc)} bytes for {len(arrays)} arrays, more than "
            f"the {MAX_ROOT_DOC_BYTES} bytes readers accept: save fewer, larger leaves (e.g. "
            "stack per-layer parameters), or less metadata",
        )
    return doc


ROOT_PREFIX = b'{"zarr_format":3,"node_type":"group","attributes":{"asyncckpt":{'
"""The first bytes of every root document asyncckpt writes (`root_doc`)."""


def is_asyncckpt_root(raw: bytes) -> bool:
    """Whether the bytes of a root `zarr.json` are one that asyncckpt wrote (its attributes are
    there); anything unreadable is not."""
    try:
        doc = parse_json(raw, "", "")
    except CorruptCheckpointError:
        return False
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attrs, dict) and isinstance(attrs.get(ATTR), dict)


# ---------------------------------------------------------------------------------------------
# Parsing (untrusted input)


@dataclass(frozen=True, slots=True)
class RootInfo:
    """What the root document of a committed checkpoint says."""

    format_version: int
    created: float
    tree: dict[str, Any]
    metadata: Any
    arrays: dict[str, ArraySpec]
    step: int | None = None
    """The step, for checkpoints written by a `CheckpointManager`."""
    metrics: Any = None
    """The metrics given to `CheckpointManager.save` (non-finite floats restored)."""
    best: tuple[str, str] | None = None
    """The manager's `(best_metric, best_mode)` when it ranked steps by a named metric."""
    hashes: dict[str, list[str]] | None = None
    """Each array's chunk hashes (`chunk_hash`), in `ArraySpec.chunk_coords` order."""
    digest: str | None = None
    """`content_digest` of the checkpoint, as its writer computed it."""
    new_bytes: int | None = None
    """The chunk bytes its save wrote; the rest it reused from the step before."""
    local_part: LocalPart | None = None
    """Set for one process's part of a node-local step: not a whole checkpoint by itself."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        _fail(where, msg)


def _fail(where: str, msg: str) -> NoReturn:
    raise CorruptCheckpointError(f"{where}: {msg}")


_KEY_ENCODING = {"name": "default", "configuration": {"separator": "."}}


def _object(value: Any, where: str, msg: str) -> dict[str, Any]:
    """`value` if it is a JSON object, else a `CorruptCheckpointError` saying `msg`."""
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: {msg}")
    return value


_PLAIN_PART = r"(?!__|\.\.?(?:/|$))[A-Za-z0-9._~%-]+"
_PLAIN_NAME = re.compile(f"{_PLAIN_PART}(?:/{_PLAIN_PART})*")
"""Names as asyncckpt writes them (escaped parts, none `.`, `..` or starting with `__`): those
pass `check_name` with one match in C, instead of a split and a check of each part in Python."""


def _plain_name(name: Any) -> bool:
    return type(name) is str and len(name) < 4096 and _PLAIN_NAME.fullmatch(name) is not None


def check_name(name: Any, where: str) -> str:
    """A name read from disk must stay inside the checkpoint: no absolute, `..` or empty parts."""
    if _plain_name(name):
        return name
    ok = isinstance(name, str) and 0 < len(name) < 4096 and "\\" not in name and "\x00" not in name
    parts = name.split("/") if ok else []
    ok = ok and all(p not in ("", ".", "..") and not p.startswith("__") for p in parts)
    if not ok:  # messages are formatted only on failure: thousands of arrays pass here per restore
        _fail(where, f"invalid variable name {str(name)[:200]!r} (it would leave the checkpoint)")
    return name


def _int_list(value: Any, where: str, what: str, *, positive: bool) -> tuple[int, ...]:
    ok = isinstance(value, list) and len(value) <= MAX_NDIM
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ok = ok and all(v > 0 if positive else v >= 0 for v in value)
    if not ok:
        _fail(
            where,
            f"`{what}` must be a list of {'positive' if positive else 'non-negative'} "
            f"integers, got {str(value)[:200]}",
        )
    return tuple(value)


def _parse_array_node(
    name: str,
    doc: dict[str, Any],
    where: str,
    seen: dict[Any, list[tuple[dict[str, Any], ArraySpec]]],
) -> ArraySpec:
    """`parse_array_doc`, once for each distinct document of a root document's arrays (4000
    small leaves share a few): `seen` holds those parsed, by data type and shape."""
    shape, kind = doc.get("shape"), doc.get("data_type")
    key = (kind, tuple(shape)) if isinstance(shape, list) else None
    try:
        same = seen.setdefault(key, []) if key is not None else []
    except TypeError:  # not numbers (parse_array_doc says what is wrong)
        key, same = None, []
    for parsed, spec in same:
        if parsed == doc:
            return ArraySpec(
                name if _plain_name(name) else check_name(name, f"{where}, array {name!r}"),
                spec.shape,
                spec.dtype,
                spec.chunk_shape,
                spec.prng_impl,
                spec.band_rows,
            )
    spec = parse_array_doc(name, doc, where)
    if key is not None and len(same) < 4:  # (a few kinds of one shape and type)
        same.append((doc, spec))
    return spec


def parse_array_doc(name: str, doc: Any, where: str) -> ArraySpec:
    """Validate one array `zarr.json` (as written by asyncckpt) and return its spec."""
    where = f"{where}, array {name!r}"
    _check(isinstance(doc, dict), where, "the array document is not a JSON object")
    _check(
        doc.get("zarr_format") == 3 and doc.get("node_type") == "array",
        where,
        "not a Zarr v3 array document",
    )
    shape = _int_list(doc.get("shape"), where, "shape", positive=False)
    dtype = _dtypes.numpy_dtype(doc.get("data_type"), where=where)
    grid = doc.get("chunk_grid")
    _check(
        isinstance(grid, dict) and grid.get("name") == "regular",
        where,
        "only the `regular` chunk grid is supported",
    )
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    chunk = _int_list(
        conf.get("chunk_shape") if isinstance(conf, dict) else None,
        where,
        "chunk_shape",
        positive=True,
    )
    if len(chunk) != len(shape):
        _fail(where, f"chunk shape {chunk} does not match shape {shape}")
    if not all(c <= max(n, 1) for c, n in zip(chunk, shape)):
        _fail(where, f"chunk shape {chunk} is larger than the array {shape}")
    nchunks = math.prod(-(-n // c) for n, c in zip(shape, chunk))
    if nchunks > MAX_CHUNKS:
        _fail(
            where,
            f"{nchunks} chunks of {chunk} in an array of {shape}: "
            f"more than the {MAX_CHUNKS} asyncckpt reads (it writes one chunk per shard)",
        )
    key_enc = doc.get("chunk_key_encoding")
    if key_enc != _KEY_ENCODING:
        _fail(where, f"unsupported chunk_key_encoding {str(key_enc)[:200]}")
    codecs = doc.get("codecs")
    band_rows = None
    if (
        isinstance(codecs, list)
        and len(codecs) == 1
        and isinstance(codecs[0], dict)
        and codecs[0].get("name") == "sharding_indexed"
    ):
        band_rows = _parse_bands(codecs[0].get("configuration"), chunk, where)
        codecs = codecs[0]["configuration"].get("codecs")
    _check_data_codecs(codecs, where)
    attrs = doc.get("attributes")
    ours = attrs.get(ATTR) if isinstance(attrs, dict) else None
    impl = ours.get("prng_impl") if isinstance(ours, dict) else None
    _check(impl is None or isinstance(impl, str), where, "bad `prng_impl` attribute")
    return ArraySpec(check_name(name, where), shape, dtype, chunk, impl, band_rows)


def _check_data_codecs(codecs: Any, where: str) -> None:
    names = (
        [c.get("name") if isinstance(c, dict) else None for c in codecs]
        if isinstance(codecs, list)
        else None
    )
    if names != ["bytes", "crc32c"]:
        _fail(where, f"unsupported codecs {str(codecs)[:200]}; asyncckpt reads `bytes` + `crc32c`")
    conf = codecs[0].get("configuration")
    _check(conf is None or isinstance(conf, dict), where, "bad `bytes` codec configuration")
    endian = (conf or {}).get("endian", "little")
    _check(endian == "little", where, f"unsupported endianness {endian!r}")


def _parse_bands(conf: Any, chunk: tuple[int, ...], where: str) -> int:
    """The rows per band of a `sharding_indexed` codec as asyncckpt writes it (row bands)."""
    _check(isinstance(conf, dict), where, "`sharding_indexed` without configuration")
    inner = _int_list(conf.get("chunk_shape"), where, "sharding chunk_shape", positive=True)
    _check(
        len(inner) == len(chunk) > 0 and inner[1:] == chunk[1:] and chunk[0] % inner[0] == 0,
        where,
        f"unsupported shard layout: inner chunks {inner} in chunks {chunk} "
        "(asyncckpt reads row bands)",
    )
    _check(conf.get("index_location", "end") == "end", where, "shard index must be at the end")
    _check(
        conf.get("index_codecs") == _INDEX_CODECS,
        where,
        f"unsupported shard index codecs {str(conf.get('index_codecs'))[:200]}",
    )
    return inner[0]


_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))  # digits -> 0, else ' '
_LONG_RUN = b"0" * 19


def _long_integer(raw: bytes) -> bool:
    """Whether `raw` may hold an integer of 19 digits or more: a run of that many digits that is
    not inside a hex hash or after a decimal point (`orjson` reads such integers as floats)."""
    digits = raw.translate(_DIGITS)
    start = digits.find(_LONG_RUN)
    while start != -1:
        before = raw[max(0, start - 64) : start].rstrip(b"-").rstrip()[-1:]
        if before in (b"", b":", b",", b"["):  # a number token (or inside a string: rare)
            return True
        start = digits.find(_LONG_RUN, start + 1)
    return False


def parse_json(raw: bytes, where: str, what: str) -> Any:
    """Decode a JSON document read from a checkpoint (untrusted: any bytes at all).

    `orjson` decodes a root document of 4000 arrays in about half the time of `json`; what it
    refuses (NaN and Infinity, numbers out of a float's range, lone surrogates, very deep
    nesting) and integers it would turn into floats go to `json`, so the result is `json`'s."""
    try:
        if not _long_integer(raw):
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass  # `json` decodes it, or says what is wrong
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: {what} is nested too deeply") from None


def parse_root_doc(raw: bytes, where: str) -> RootInfo:
    """Validate the root `zarr.json` of a checkpoint."""
    doc = _object(
        parse_json(raw, where, "root zarr.json"),
        where,
        "root zarr.json is not a Zarr v3 group document",
    )
    _check(doc.get("node_type") == "group", where, "root zarr.json is not a Zarr v3 group document")
    attrs = doc.get("attributes")
    ours = _object(
        attrs.get(ATTR) if isinstance(attrs, dict) else None,
        where,
        "root zarr.json has no `asyncckpt` attributes: this Zarr group was not "
        "written by asyncckpt",
    )
    version = ours.get("format_version")
    if not isinstance(version, int):
        raise CorruptCheckpointError(f"{where}: missing `format_version`")
    _check(
        version <= FORMAT_VERSION,
        where,
        f"format version {version} is newer than this "
        f"asyncckpt reads ({FORMAT_VERSION}): upgrade asyncckpt",
    )
    consolidated = doc.get("consolidated_metadata")
    nodes = _object(
        consolidated.get("metadata") if isinstance(consolidated, dict) else None,
        where,
        "missing consolidated metadata",
    )
    seen: dict[Any, list[tuple[dict[str, Any], ArraySpec]]] = {}
    arrays = {
        name: _parse_array_node(name, node, where, seen)
        for name, node in nodes.items()
        if isinstance(node, dict) and node.get("node_type") == "array"
    }
    created = ours.get("created_unix")
    tree = _object(ours.get("tree"), where, "missing tree description")
    return RootInfo(
        format_version=version,
        created=float(created) if isinstance(created, (int, float)) else 0.0,
        tree=tree,
        metadata=ours.get("metadata"),
        arrays=arrays,
        step=step if isinstance(step := ours.get("step"), int) else None,
        metrics=decode_metrics(ours.get("metrics")),
        best=_best(ours.get("best")),
        hashes=_hashes(ours.get("chunk_hashes"), arrays, where),
        digest=digest if isinstance(digest := ours.get("digest"), str) else None,
        new_bytes=n if isinstance(n := ours.get("new_bytes"), int) else None,
        local_part=_local_part(ours.get("local_part"), arrays, where),
    )


def with_local_process(raw: bytes, process: int) -> bytes:
    """The root document `raw` of one process's local part, as the part of `process` (the
    documents of a step's parts differ only in the process they name)."""
    doc = json.loads(raw)
    doc["attributes"][ATTR]["local_part"]["process"] = process
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _local_part(value: Any, arrays: dict[str, ArraySpec], where: str) -> LocalPart | None:
    if value is None:
        return None
    part = _object(value, where, "local_part is not an object")
    process, processes, held = part.get("process"), part.get("processes"), part.get("held")
    _check(
        isinstance(processes, int)
        and isinstance(process, int)
        and 0 <= process < processes
        and isinstance(held, list)
        and len(held) == processes
        and all(
            isinstance(h, dict)
            and all(
                n in arrays and isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                for n, keys in h.items()
            )
            for h in held
        ),
        where,
        "local_part is malformed (process, processes, held)",
    )
    return LocalPart(cast(int, process), cast(int, processes), cast(list, held))


_HEX32 = re.compile(r"[0-9a-f]{32}")


def _hashes(value: Any, arrays: dict[str, ArraySpec], where: str) -> dict[str, list[str]] | None:
    """The chunk hashes of a root document: one 32-digit hex string per chunk of each array."""
    if value is None:
        return None
    table = _object(value, where, "chunk_hashes is not an object")
    _check(set(table) == set(arrays), where, "chunk_hashes does not name every array")
    for name, spec in arrays.items():
        listed = table[name]
        if (  # most arrays, without a generator each
            type(listed) is list
            and len(listed) == 1
            and spec.chunk_shape == spec.shape
            and isinstance(listed[0], str)
            and _HEX32.fullmatch(listed[0])
        ):
            continue
        _check(
            isinstance(listed, list)
            and len(listed) == math.prod(spec.grid)
            and all(isinstance(h, str) and _HEX32.fullmatch(h) for h in listed),
            where,
            f"chunk_hashes of {name!r} is not one {HASH} hash per chunk",
        )
    return table


def _best(value: Any) -> tuple[str, str] | None:
    if (
        isinstance(value, dict)
        and isinstance(value.get("metric"), str)
        and value.get("mode") in ("min", "max")
    ):
        return value["metric"], value["mode"]
    return None


# ---------------------------------------------------------------------------------------------
# Names around checkpoints
#
# A save writes `.<name>.asyncckpt-tmp-<12 hex>` next to its destination and renames it into
# place; a deletion renames the checkpoint to `.<name>.asyncckpt-deleting-<12 hex>` and then
# removes it; both are leftovers if a crash interrupts them. In an object store a checkpoint is
# written in place, its prefix marked with `UNCOMMITTED` until the root document is written.
# A manager directory holds `<step>/` checkpoints, `.asyncckpt.lock`, and the damaged steps that
# a restore set aside, `<step>.damaged-<UTC time>`.

UNCOMMITTED = ".asyncckpt-uncommitted"
LOCK_NAME = ".asyncckpt.lock"
_STEP = re.compile(r"(0|[1-9][0-9]{0,18})\Z")
_LEFTOVER = re.compile(r"\..+\.asyncckpt-(tmp|deleting)-[0-9a-f]{12}\Z")
_DAMAGED = re.compile(r"(0|[1-9][0-9]{0,18})\.damaged-[0-9]{8}T[0-9]{6}Z(-[0-9a-f]{6})?\Z")


def step_name(step: int) -> str:
    """The name of a step's checkpoint in a manager directory: the number, no padding."""
    return str(step)


def parse_step(name: str) -> int | None:
    """The step a manager-directory entry is named for, or None."""
    return int(name) if _STEP.match(name) else None


def temporary_name(name: str) -> str:
    """A fresh hidden name next to `name` for a save in progress."""
    return f".{name}.asyncckpt-tmp-{uuid.uuid4().hex[:12]}"


def deleting_name(name: str) -> str:
    """A fresh hidden name next to `name` for a checkpoint being deleted."""
    return f".{name}.asyncckpt-deleting-{uuid.uuid4().hex[:12]}"


def is_leftover(name: str) -> bool:
    """A save or a deletion in progress, or left by a crash."""
    return bool(_LEFTOVER.match(name))


def damaged_name(step: int, when: float, taken: list[str]) -> str:
    """The name a damaged step is set aside under (not one of the names `taken`)."""
    name = f"{step}.damaged-{_dt.datetime.fromtimestamp(when, _dt.UTC):%Y%m%dT%H%M%SZ}"
    return name if name not in taken else f"{name}-{uuid.uuid4().hex[:6]}"


def is_damaged(name: str) -> bool:
    return bool(_DAMAGED.match(name))
