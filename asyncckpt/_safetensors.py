"""The safetensors format: reading files (and sharded sets with a `*.safetensors.index.json`)
straight onto devices, and writing one file streamed from a checkpoint.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
`data_offsets` relative to the end of the header; `__metadata__`: str -> str) and the tensors'
bytes in C order. Restores read, for each shard a process's devices hold, only the byte runs of
that shard (rows, or pieces of rows where a tensor is split by columns) straight into the shard's
buffer, through `Storage.read_runs_into`. The header is untrusted input: every offset, size,
dtype and shape is checked before anything is read or allocated.

The writer is ours, not the `safetensors` package's, so that an export holds at most
`max_inflight_bytes` of the checkpoint in memory instead of the whole model (the package's
`serialize_file` takes every tensor's memory at once).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np

from . import _restore, _tree
from ._executor import Workers
from ._storage import Storage, open_storage
from .errors import CheckpointNotFoundError, CorruptCheckpointError

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the safetensors package's own limit
MAX_INDEX_BYTES = 64 << 20
MAX_NDIM = 64

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


def is_safetensors(path: Any) -> bool:
    """Whether `path` names a safetensors file or index (by its name)."""
    if isinstance(path, Storage):
        return False
    name = os.fspath(path)
    return isinstance(name, str) and name.endswith((SUFFIX, INDEX_SUFFIX))


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor of a safetensors file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte in the file
    place: Storage  # the file's directory
    key: str  # the file's name in it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def path(self) -> str:
        return self.place.path(self.key)


# ---------------------------------------------------------------------------------------------
# Reading headers (untrusted)


def _bad(path: str, msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path} is not a valid safetensors file: {msg}")


def read_header(place: Storage, key: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the `__metadata__` of the safetensors file `key` in `place`."""
    path = place.path(key)
    try:
        size = place.size(key)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no safetensors file at {path}") from None
    if size < 8:
        raise _bad(path, f"it has {size} bytes, fewer than the 8 of the header length")
    length = int.from_bytes(place.get(key, start=0, end=8).tobytes(), "little")
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise _bad(path, f"its header length {length} exceeds the file ({size} bytes) or 100 MiB")
    try:
        header = json.loads(place.get(key, start=8, end=8 + length).tobytes())
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"its header is not JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    base = 8 + length
    tensors: dict[str, Tensor] = {}
    spans = []
    for name, entry in header.items():
        tensor = _tensor(name, entry, base, size, place, key, path)
        tensors[name] = tensor
        spans.append((tensor.start, tensor.start + tensor.nbytes, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise _bad(path, f"the data of tensors {first!r} and {second!r} overlap")
    return tensors, metadata


def _tensor(
    name: str, entry: Any, base: int, size: int, place: Storage, key: str, path: str
) -> Tensor:
    where = f"tensor {name[:200]!r}"
    if not isinstance(entry, dict):
        raise _bad(path, f"{where} is not a JSON object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPES:
        raise _bad(path, f"{where} has dtype {str(code)[:40]!r}; known: {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise _bad(path, f"{where} has shape {str(shape)[:100]}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"{where} has data_offsets {str(offsets)[:100]}")
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(
            path, f"{where} ({code}{shape}) needs {nbytes} bytes, its offsets span {offsets}"
        )
    if base + offsets[1] > size:
        raise _bad(path, f"{where} ends at byte {base + offsets[1]}, after the end of the file")
    return Tensor(name, dtype, tuple(shape), base + offsets[0], place, key)


def open_tensors(path: Any) -> tuple[str, dict[str, Tensor]]:
    """(a description of `path`, its tensors by name): a `.safetensors` file, or the files an
    `*.safetensors.index.json` names (they must lie beside it)."""
    name = os.fspath(path)
    local = open_storage(name).local_path
    if local is not None:
        name = os.path.realpath(local)  # hub caches link each file to a blob: follow them
    parent, key = os.path.split(name.rstrip("/"))
    place = open_storage(parent or ".")
    if not name.endswith(INDEX_SUFFIX):
        return place.path(key), read_header(place, key)[0]
    files = _index(place, key)
    tensors: dict[str, Tensor] = {}
    for file, wanted in files.items():
        file_place, file_key = place, file
        if place.local_path is not None:  # follow a link, as above
            real = os.path.realpath(os.path.join(place.local_path, file))
            file_place, file_key = open_storage(os.path.dirname(real)), os.path.basename(real)
        held, _ = read_header(file_place, file_key)
        for tensor_name in wanted:
            if tensor_name not in held:
                raise CorruptCheckpointError(
                    f"{place.path(key)} puts tensor {tensor_name!r} in {file}, which does not "
                    "hold it"
                )
            tensors[tensor_name] = held[tensor_name]
    return place.path(key), tensors


def _index(place: Storage, key: str) -> dict[str, list[str]]:
    """file name -> the tensors the index puts in it."""
    path = place.path(key)
    try:
        raw = place.read_small(key, MAX_INDEX_BYTES)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no safetensors index at {path}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path} is not JSON ({str(e)[:200]})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{path} has no weight_map object")
    files: dict[str, list[str]] = {}
    for tensor_name, file in weight_map.items():
        if (
            not isinstance(file, str)
            or not file
            or "/" in file
            or "\\" in file
            or file in (".", "..")
        ):
            raise CorruptCheckpointError(
                f"{path} puts {tensor_name[:200]!r} in {str(file)[:200]!r}: files must be plain "
                "names in the index's directory"
            )
        files.setdefault(file, []).append(tensor_name)
    return files


# ---------------------------------------------------------------------------------------------
# Restoring onto a target


def restore(
    path: Any,
    target: Any,
    *,
    names: Callable[[str], str | None] | Mapping[str, str] | None,
    strict: bool,
    workers: Workers,
    max_inflight_bytes: int,
) -> Any:
    """See `asyncckpt.load_safetensors`."""
    where, tensors = open_tensors(path)
    if target is None:
        return _read_all(tensors, workers, max_inflight_bytes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    matched: list[tuple[int, Tensor, Any]] = []
    missing, shapes = [], []
    out: list[Any] = [None] * len(leaves)
    for i, (keypath, leaf) in enumerate(leaves):
        if _tree.is_code_leaf(leaf):
            out[i] = leaf
            continue
        leaf = _restore.on_devices(leaf, keypath, f"from {where}")
        tensor = _find(tensors, keypath, names)
        if tensor is None:
            missing.append(_tree.keystr(keypath))
            continue
        shape = () if _tree.is_python_scalar(leaf) else tuple(getattr(leaf, "shape", ()))
        if shape != tensor.shape:
            shapes.append(
                f"{_tree.keystr(keypath)}: target {shape}, {tensor.name!r} {tensor.shape}"
            )
            continue
        dtype = np.asarray(leaf).dtype if _tree.is_python_scalar(leaf) else np.dtype(leaf.dtype)
        _restore.check_cast(tensor.dtype, dtype, f"{tensor.name!r} of {tensor.path}")
        matched.append((i, tensor, leaf))
    used = {t.name for _, t, _ in matched}
    extra = sorted(set(tensors) - used) if strict else []
    if missing or shapes or extra:
        raise _tree.mismatch(
            f"the target tree does not match the tensors of {where}:",
            [
                ("in the target but in no tensor (pass `names=` to map them)", missing),
                ("tensors not in the target (pass `strict=False` to skip them)", extra),
                ("shape differs", shapes),
            ],
        )
    for group in _restore.groups_by_size(matched, lambda m: m[1].nbytes, max_inflight_bytes):
        for (i, _, _), value in zip(group, _read_group(group, workers)):
            out[i] = value
    return jax.tree_util.tree_unflatten(treedef, out)


def _find(
    tensors: dict[str, Tensor],
    keypath: tuple[Any, ...],
    names: Callable[[str], str | None] | Mapping[str, str] | None,
) -> Tensor | None:
    """The tensor for the target leaf at `keypath`: by `names` (given the leaf's variable name
    `a/b/c`), else `a.b.c` (Hugging Face's style), else `a/b/c` (what `export` writes)."""
    parts = [_tree.key_part(k) for k in keypath]
    variable = "/".join(parts)
    if names is not None:
        name = names.get(variable) if isinstance(names, Mapping) else names(variable)
        return tensors.get(name) if name is not None else None
    return tensors.get(".".join(parts)) or tensors.get(variable)


def _shard_regions(leaf: Any, shape: tuple[int, ...]) -> tuple[Any, list[tuple[slice, ...]]]:
    """(the sharding, or None for a host value; the distinct regions this process needs)."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = leaf.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        keys = dict.fromkeys(
            _restore.index_key(index, shape)
            for index in sharding.addressable_devices_indices_map(shape).values()
            if index is not None
        )
        return sharding, [tuple(slice(a, b) for a, b in key) for key in keys]
    return None, [tuple(slice(0, n) for n in shape)]


EXACT_RUN_BYTES = 16 << 10  # shorter pieces of rows are read as whole rows (see _read_group)
BLOCK_TASK_BYTES = 8 << 20  # a block of whole rows is read in tasks of about this size


def _read_group(group: list[tuple[int, Tensor, Any]], workers: Workers) -> list[Any]:
    """Read and place the tensors of `group`. A region whose contiguous runs are long (a row
    split, or pieces of rows of at least EXACT_RUN_BYTES) is read run by run straight into its
    buffer. Shorter pieces (a column split of an ordinary matrix: 512 bytes of each 4 KiB row
    for 8 devices) would cost a request each, hundreds of thousands per tensor; the page cache
    reads whole pages anyway, so those tensors are read as one block of the rows this process
    needs, in large sequential reads, and each region is copied out of it."""
    plans = []
    tasks: list[tuple[int, Callable[[], None]]] = []
    blocks = []
    for _, tensor, leaf in group:
        sharding, regions = _shard_regions(leaf, tensor.shape)
        bufs = {}
        for region in regions:
            buf = _restore.aligned_empty(tuple(s.stop - s.start for s in region), tensor.dtype)
            bufs[_restore.index_key(region, tensor.shape)] = buf
        runs = [byte_runs(tensor.shape, tensor.dtype.itemsize, r) for r in regions]
        short = any(length < EXACT_RUN_BYTES and len(offsets) > 1 for offsets, length in runs)
        if short:
            first = min(r[0].start for r in regions)
            last = max(r[0].stop for r in regions)
            block = _restore.aligned_empty((last - first, *tensor.shape[1:]), tensor.dtype)
            blocks.append((block, first, regions, bufs, tensor.shape))
            row_bytes = math.prod(tensor.shape[1:]) * tensor.dtype.itemsize
            step = max(1, BLOCK_TASK_BYTES // max(1, row_bytes))
            for a in range(first, last, step):
                b = min(last, a + step)
                rows = (slice(a, b), *(slice(0, n) for n in tensor.shape[1:]))
                tasks.append(
                    ((b - a) * row_bytes, _reader(tensor, rows, block[a - first : b - first]))
                )
        else:
            for region in regions:
                buf = bufs[_restore.index_key(region, tensor.shape)]
                tasks.append((buf.nbytes, _reader(tensor, region, buf)))
        plans.append((tensor, leaf, sharding, bufs))
    local = all(t.place.local_path is not None for _, t, _ in group)
    workers.run_reads(tasks, network=not local)
    for block, first, regions, bufs, shape in blocks:
        for region in regions:
            within = (slice(region[0].start - first, region[0].stop - first), *region[1:])
            np.copyto(bufs[_restore.index_key(region, shape)], block[within])
    del blocks
    values: list[Any] = []
    for tensor, leaf, sharding, bufs in plans:
        dtype = np.asarray(leaf).dtype if _tree.is_python_scalar(leaf) else np.dtype(leaf.dtype)
        if dtype != tensor.dtype:
            bufs = {k: b.astype(dtype) for k, b in bufs.items()}
        if sharding is not None:
            values.append(_restore.from_shards(tensor.shape, sharding, dtype, bufs))
        else:
            (value,) = bufs.values()
            if _tree.is_python_scalar(leaf):
                value = type(leaf)(value.item())
            elif isinstance(leaf, np.generic):
                value = value[()]
            values.append(value)
    return values


def _reader(tensor: Tensor, region: tuple[slice, ...], out: np.ndarray) -> Callable[[], None]:
    def read() -> None:
        runs = byte_runs(tensor.shape, tensor.dtype.itemsize, region)
        flat = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        length = runs[1]
        buffers = [
            (tensor.start + int(offset), flat[j * length : (j + 1) * length])
            for j, offset in enumerate(runs[0])
        ]
        tensor.place.read_runs_into(tensor.key, buffers, f"reading tensor {tensor.name!r}")

    return read


def byte_runs(
    shape: tuple[int, ...], itemsize: int, region: tuple[slice, ...]
) -> tuple[np.ndarray, int]:
    """The contiguous byte runs of `region` of a C-order array: (their offsets, in C order of
    the region, and their common length). The runs fill a C-order buffer of the region in
    order."""
    k = len(shape) - 1
    while k >= 0 and region[k].start == 0 and region[k].stop == shape[k]:
        k -= 1  # dimensions after k are whole
    if k < 0 or math.prod(shape) == 0:
        return np.zeros(1, np.int64), math.prod(shape) * itemsize
    strides = [math.prod(shape[j + 1 :]) * itemsize for j in range(len(shape))]
    length = (region[k].stop - region[k].start) * strides[k]
    offsets = np.array(region[k].start * strides[k], np.int64)
    for j in range(k - 1, -1, -1):
        rows = np.arange(region[j].start, region[j].stop, dtype=np.int64) * strides[j]
        offsets = np.add.outer(rows, offsets)
    return offsets.reshape(-1), length


def _read_all(tensors: dict[str, Tensor], workers: Workers, limit: int) -> dict[str, np.ndarray]:
    """Every tensor as a numpy array (no target): read as for a numpy target of its dtype."""
    matched = [(i, t, np.empty(0, t.dtype)) for i, t in enumerate(tensors.values())]
    out: dict[str, np.ndarray] = {}
    for group in _restore.groups_by_size(matched, lambda m: m[1].nbytes, limit):
        for (_, tensor, _), value in zip(group, _read_group(group, workers)):
            out[tensor.name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Writing one file, streamed


def header_for(
    entries: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included, padded to 8 bytes) for `entries` and each
    tensor's absolute offset. Tensors are laid out largest item size first, then by name, so each
    one starts at a multiple of its item size (what the `safetensors` package does too)."""
    order = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
    doc: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    position = 0
    relative = {}
    for name, dtype, shape in order:
        if dtype not in CODES:
            raise TypeError(f"{name!r} has dtype {dtype}, which safetensors does not hold")
        nbytes = math.prod(shape) * dtype.itemsize
        doc[name] = {
            "dtype": CODES[dtype],
            "shape": list(shape),
            "data_offsets": [position, position + nbytes],
        }
        relative[name] = position
        position += nbytes
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {n: base + p for n, p in relative.items()}
