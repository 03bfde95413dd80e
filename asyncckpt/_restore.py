"""Reading a committed checkpoint back: the variable table, read plans, device placement.

For every leaf of the target the plan asks the target sharding which slice each addressable device
needs, reads only the chunks overlapping those slices (a chunk that is exactly one slice is read
straight into its buffer, or mapped), then places each leaf with one
`jax.make_array_from_callback` (leaves held whole with one batched put, `put_whole`). Arrays are
read and placed in groups of at most `max_inflight_bytes` of host buffers; under `jax.distributed`
the processes agree that all of them read their shards before placing arrays that span them.
Every byte comes through the checkpoint's `Storage`.
"""

from __future__ import annotations

import errno
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar, cast

import jax
import numpy as np

from . import _directory, _distributed, _format, _libc, _readonce, _tree
from ._distributed import Coordinator
from ._executor import Read, Workers
from ._format import ArraySpec, RootInfo
from ._storage import Storage
from ._storage.overlay import Overlay
from ._telemetry import Phases
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    TreeMismatchError,
)

T = TypeVar("T")

_ALIGN = 64  # XLA:CPU aliases (does not copy) host buffers aligned to 64 bytes


def read_root(ckpt: Storage) -> RootInfo:
    """The parsed root document of the committed checkpoint `ckpt`."""
    try:
        raw = ckpt.read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES)
    except FileNotFoundError:
        raise _not_committed(ckpt) from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{ckpt.url} is a file, not a checkpoint directory") from None
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointReadError(
            e.errno, f"cannot read {ckpt.path(_format.DOC)}: {e.strerror}"
        ) from e
    return _format.parse_root_doc(raw, f"checkpoint {ckpt.url}")


def _not_committed(ckpt: Storage) -> CheckpointError:
    """The error for a place without a root document: nothing there, a file, a manager
    directory, an interrupted save, or something else."""
    try:
        kind = ckpt.kind()
        steps = _directory.committed_steps(ckpt) if kind == "directory" else []
        names = ckpt.list_dir() if kind == "directory" else []
        partial = _format.UNCOMMITTED in names or any(
            ckpt.exists(f"{n}/{_format.DOC}") for n in names[:64]
        )
    except OSError as e:
        return CheckpointReadError(e.errno, f"cannot read {ckpt.url}: {e.strerror}")
    url = ckpt.url
    if kind == "missing":
        return CheckpointNotFoundError(
            f"no checkpoint at {url}: the path does not exist (nothing is stored there)"
        )
    if kind == "file":
        return CheckpointNotFoundError(f"{url} is a file, not a checkpoint directory")
    if steps:
        shown = ", ".join(map(str, steps[-10:]))
        latest = _directory.step_storage(ckpt, steps[-1]).url
        return CheckpointNotFoundError(
            f"{url} is a CheckpointManager directory, not a checkpoint: it holds steps "
            f"{'... ' if len(steps) > 10 else ''}{shown}. Restore one of them, e.g. the latest "
            f"with `asyncckpt.restore({latest!r})` or `asyncckpt.CheckpointManager({url!r}, "
            "read_only=True).restore()`"
        )
    if partial:
        return IncompleteCheckpointError(
            f"{url} is an incomplete checkpoint: its root zarr.json (written last, at commit) "
            "is missing, so the save that wrote it never finished. Restore another checkpoint."
        )
    return CheckpointNotFoundError(f"{url} is not a checkpoint: it has no zarr.json")


_SMALL_PAGES_FROM = 2 << 20


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array at a 64-byte aligned address, on small pages.

    numpy asks for transparent huge pages above 4 MiB; on this project's machine filling those
    cost 0.6 to 1.7 s of kernel time per GiB from one process to the next, small pages 0.8-0.9 s
    every time, so buffers of 2 MiB and more refuse them. They come from numpy's allocator, not
    a mapping of their own, so that a second restore reuses the memory a first one freed."""
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    if n >= _SMALL_PAGES_FROM:
        _libc.refuse_huge_pages(raw)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + n].view(dtype).reshape(shape)


def read_whole_chunk(ckpt: Storage, spec: ArraySpec, key: str, where: str) -> np.ndarray:
    """The data of the chunk file `key` of `spec`, every checksum verified, as uint8 (a new
    64-byte aligned buffer of `spec.chunk_nbytes`)."""
    buf = aligned_empty(spec.chunk_shape, spec.dtype)
    if spec.band_rows is None:
        _guarded((ckpt, key), where, ckpt.read_chunk_into, key, buf, where)
    else:
        _read_bands(ckpt, key, spec, buf, 0, where)
    return buf.reshape(-1).view(np.uint8)


@dataclass(slots=True)
class _Request:
    """A region of the global array (concrete slices) and the buffer that receives it. `out` is
    None until read when the region is exactly one chunk of a local checkpoint, which may be
    mapped instead of read (`Storage.map_chunk`)."""

    index: tuple[slice, ...]
    out: np.ndarray | None


def _is_chunk(spec: ArraySpec, index: tuple[slice, ...]) -> bool:
    """Whether the concrete region `index` is exactly one chunk of `spec`."""
    return all(s.start % c == 0 and s.stop - s.start == c for s, c in zip(index, spec.chunk_shape))


_MAP_FROM = 256 << 10  # smaller chunks are read: a mapping costs two system calls and a VMA


def _request(spec: ArraySpec, index: tuple[slice, ...], mapping: bool, slabs: _Slabs) -> _Request:
    if mapping and spec.chunk_nbytes >= _MAP_FROM and _is_chunk(spec, index):
        return _Request(index, None)
    return _Request(index, slabs.take(tuple(s.stop - s.start for s in index), spec.dtype))


class _Slabs:
    """Host buffers of a group of arrays: those under `_MAP_FROM` cut from shared allocations of
    `SLAB_BYTES` (each 64-byte aligned), the others `aligned_empty` of their own. One allocation
    a small buffer cost 7-10 us of Python (4000 leaves of 16 KiB: 30-40 ms); an array placed on a
    CPU device keeps its slab (at most `SLAB_BYTES`) alive, as it keeps its own buffer."""

    def __init__(self) -> None:
        self._raw = np.empty(0, np.uint8)
        self._used = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = math.prod(shape) * dtype.itemsize
        if n >= _MAP_FROM:
            return aligned_empty(shape, dtype)
        if self._used + n > self._raw.size:
            self._raw, self._used = aligned_empty((SLAB_BYTES,), np.dtype(np.uint8)), 0
        out = np.ndarray(shape, dtype, self._raw, self._used)
        self._used += -(-n // _ALIGN) * _ALIGN
        return out


SLAB_BYTES = 4 << 20


def _concrete(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = []
    for x, y in zip(a, b):
        lo, hi = max(x.start, y.start), min(x.stop, y.stop)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return tuple(out)


def _shift(region: tuple[slice, ...], origin: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, origin))


def _chunk_tasks(
    ckpt: Storage, spec: ArraySpec, requests: list[_Request], where: str, seen: set[str]
) -> list[Read]:
    """One read per chunk that some request needs; chunks nobody needs are never read.
    `seen`: what `check_no_links` found already in this restore."""
    ckpt.check_no_links(spec.name, where, seen)
    if spec.chunk_shape == spec.shape and len(requests) == 1:  # one chunk (no empty dimension)
        region = _whole(spec)  # needed whole: most small leaves, without the general search
        if requests[0].index == region:
            return [
                _chunk_read(ckpt, spec, (0,) * len(region), region, [(requests[0], region)], where)
            ]
    tasks = []
    for coords in spec.chunk_coords():
        region = spec.chunk_slices(coords)
        inside = _concrete(region, spec.shape)
        hits = [(r, o) for r in requests if (o := _overlap(inside, r.index)) is not None]
        if hits:
            tasks.append(_chunk_read(ckpt, spec, coords, region, hits, where))
    return tasks


def _chunk_read(
    ckpt: Storage,
    spec: ArraySpec,
    coords: tuple[int, ...],
    region: tuple[slice, ...],
    hits: list[tuple[_Request, tuple[slice, ...]]],
    where: str,
) -> Read:
    key = spec.chunk_key(coords)
    task = functools.partial(_read_chunk, ckpt, key, spec, region, hits, where)
    if type(ckpt) is Overlay and ckpt.in_memory(key):  # costs no I/O (`type`: no ABC check)
        return Read(0, task)
    nbytes = spec.chunk_nbytes
    return Read(nbytes, task, functools.partial(ckpt.prefetch, key, nbytes + _format.CRC_BYTES))


def _read_chunk(
    ckpt: Storage,
    key: str,
    spec: ArraySpec,
    region: tuple[slice, ...],
    hits: list[tuple[_Request, tuple[slice, ...]]],
    where: str,
) -> None:
    place = (ckpt, key)  # named in errors only
    (req, overlap), *rest = hits
    if not rest and overlap == region == req.index:  # the chunk is exactly the requested slice
        band = _format.band_nbytes(spec) if spec.band_rows is not None else None
        if req.out is None:
            mapped = _guarded(place, where, ckpt.map_chunk, key, spec.chunk_nbytes, band, where)
            if mapped is not None:
                req.out = mapped.view(spec.dtype).reshape(spec.chunk_shape)
                return
            req.out = _guarded(place, where, aligned_empty, spec.chunk_shape, spec.dtype)
        if band is None:
            _guarded(place, where, ckpt.read_chunk_into, key, req.out, where)
        else:
            _read_bands(ckpt, key, spec, req.out, 0, where)
        return
    if spec.band_rows is None:
        chunk = np.empty(spec.chunk_shape, spec.dtype)
        _guarded(place, where, ckpt.read_chunk_into, key, chunk, where)
        _scatter(chunk, region, hits)
        return
    # a banded chunk: read only the bands that some request overlaps; those a request holds
    # whole go straight into its buffer, the rest through buffers of at most `_PIECE_BYTES`
    band, start = spec.band_rows, region[0].start
    scattered = []
    for req, o in hits:
        direct = _whole_bands(spec, region, req, o)
        if direct is None:
            scattered.append((req, o))
        else:
            _read_bands(ckpt, key, spec, direct[0], direct[1], where)
    if not scattered:
        return
    spans = sorted(
        ((o[0].start - start) // band, -(-(o[0].stop - start) // band)) for _, o in scattered
    )
    merged = [list(spans[0])]
    for lo, hi in spans[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    step = max(1, _PIECE_BYTES // _format.band_nbytes(spec))
    for lo, hi in merged:
        for first in range(lo, hi, step):
            bands = (first, min(first + step, hi))
            _scatter_bands(ckpt, key, spec, region, bands, scattered, where)


def _scatter_bands(
    ckpt: Storage,
    key: str,
    spec: ArraySpec,
    region: tuple[slice, ...],
    bands: tuple[int, int],
    hits: list[tuple[_Request, tuple[slice, ...]]],
    where: str,
) -> None:
    """Read bands [first, stop) of the chunk at `region` into a buffer of their own and copy
    what each of `hits` overlaps (the buffer is gone before the next one is made)."""
    band, (first, stop) = cast(int, spec.band_rows), bands
    part = np.empty(((stop - first) * band, *spec.chunk_shape[1:]), spec.dtype)
    _read_bands(ckpt, key, spec, part, first, where)
    rows = (slice(region[0].start + first * band, region[0].start + stop * band), *region[1:])
    _scatter(part, rows, [(r, o) for r, whole in hits if (o := _overlap(whole, rows)) is not None])


_PIECE_BYTES = 16 << 20
"""Bands of a chunk that no request holds whole (a slice across columns, or part of a band)
are read into and scattered from a buffer of at most this many bytes (or one band) at a time."""


def _whole_bands(
    spec: ArraySpec, region: tuple[slice, ...], req: _Request, overlap: tuple[slice, ...]
) -> tuple[np.ndarray, int] | None:
    """Where in `req.out` the bands of the chunk at `region` that `req` overlaps can be read
    straight into, and the first of them: when the overlap is whole bands, full width, and the
    request itself is that wide (so its rows are contiguous). Else None."""
    band = cast(int, spec.band_rows)
    lo, hi = overlap[0].start - region[0].start, overlap[0].stop - region[0].start
    full_width = all(
        o == r == c
        for o, r, c in zip(overlap[1:], req.index[1:], _concrete(region, spec.shape)[1:])
    )
    if req.out is None or not full_width or lo % band or hi % band:
        return None
    return req.out[_shift(overlap, req.index)], lo // band


def _scatter(
    data: np.ndarray, origin: tuple[slice, ...], hits: list[tuple[_Request, tuple[slice, ...]]]
) -> None:
    """Copy the part of `data` (the global region `origin`) that each request overlaps."""
    for req, overlap in hits:
        if req.out is None:  # a region that is exactly one chunk: only this task touches it
            req.out = aligned_empty(tuple(s.stop - s.start for s in req.index), data.dtype)
        req.out[_shift(overlap, req.index)] = data[_shift(overlap, origin)]


def _read_bands(
    ckpt: Storage, key: str, spec: ArraySpec, out: np.ndarray, first: int, where: str
) -> None:
    nbands = spec.chunk_shape[0] // spec.band_rows  # type: ignore[operator]
    _guarded(
        (ckpt, key),
        where,
        ckpt.read_bands_into,
        key,
        out,
        first,
        nbands,
        _format.band_nbytes(spec),
        where,
    )


def _guarded(place: tuple[Storage, str], where: str, call: Any, *args: Any) -> Any:
    """`call(*args)`, its OS and allocation failures as checkpoint errors naming the file
    `place` (storage, key)."""
    try:
        return call(*args)
    except CheckpointError:
        raise
    except MemoryError as e:
        path = place[0].path(place[1])
        raise CheckpointReadError(
            errno.ENOMEM, f"{where}: cannot allocate host memory for {path}: {e}"
        ) from None
    except OSError as e:
        path = place[0].path(place[1])
        raise CheckpointReadError(e.errno, f"{where}: cannot read {path}: {e.strerror}") from e


# ---------------------------------------------------------------------------------------------
# Targets


@functools.cache
def _key_shape(impl: str) -> tuple[int, ...]:
    """Trailing shape of the key data of one PRNG key of implementation `impl`."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape


def logical_shape(spec: ArraySpec) -> tuple[int, ...]:
    """The shape the user sees: key arrays drop the trailing key-data dimensions."""
    if spec.prng_impl is None:
        return spec.shape
    return spec.shape[: len(spec.shape) - len(_key_shape(spec.prng_impl))]


def _category(dtype: np.dtype) -> int:
    if dtype == np.bool_:
        return 0
    if dtype.kind in "iu" or dtype.name in ("int2", "int4", "uint2", "uint4"):
        return 1
    if dtype.kind == "c":
        return 3
    return 2  # float, bfloat16, float8 ...


def check_cast(saved: np.dtype, target: np.dtype, where: str) -> None:
    if saved != target and _category(saved) > _category(target):
        raise TreeMismatchError(
            f"{where}: the checkpoint holds {saved}, the target asks for {target}; this cast "
            f"loses the kind of value, so asyncckpt refuses it. Restore as {saved} and cast "
            "yourself if you mean it."
        )


@dataclass(slots=True)  # not frozen: thousands are made a restore, and never changed
class _Plan:
    """How one array variable is restored: nothing allocated yet (`_stage` does that)."""

    spec: ArraySpec
    dtype: np.dtype  # the dtype to return
    sharding: jax.sharding.Sharding | None  # None: return numpy
    regions: Sequence[tuple[slice, ...]]  # one per distinct shard this process's devices hold
    elements: int  # in all of `regions`
    mapping: bool  # a region that is exactly one chunk may be mapped instead of read
    where: str
    shared: _readonce.Shared | None = None  # restored by every process: read once per job

    @property
    def staged_bytes(self) -> int:
        """Host memory its shards take while they are read and placed."""
        return self.elements * self.spec.dtype.itemsize

    @property
    def group_bytes(self) -> int:
        """What it counts for in a group of `max_inflight_bytes`: its `staged_bytes`, or for
        an array every process restores, the most any process stages (so that every process
        makes the same groups: reading them is collective)."""
        shared = self.shared
        if shared is None or shared.whole:
            return self.staged_bytes
        size = self.spec.dtype.itemsize
        regions = _readonce.regions_by_process(shared.sharding, tuple(self.spec.shape))
        return max(
            sum(math.prod(b - a for a, b in r) * size for r in mine) for mine in regions.values()
        )

    @property
    def spans_processes(self) -> bool:
        """Its sharding has devices of other processes (every process restores it together)."""
        return self.sharding is not None and not self.sharding.is_fully_addressable


def _plan(
    spec: ArraySpec, target: Any, where: str, mapping: bool, read_once: bool = False
) -> _Plan:
    """`mapping`: chunks that are exactly one request may be mapped instead of read.
    `read_once`: an array every process restores is read once per job (`_readonce`)."""

    def share(sharding: Any) -> TypeGuard[jax.sharding.Sharding]:
        return read_once and _readonce.spans_every_process(sharding)

    if spec.prng_impl is not None:  # key data is restored whole, then wrapped and placed
        sharding = getattr(target, "sharding", None) if target is not None else None
        shared = _readonce.Shared(spec, sharding, True) if share(sharding) else None
        whole = [_whole(spec)]
        return _Plan(spec, spec.dtype, sharding, whole, math.prod(spec.shape), False, where, shared)
    if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
        dtype = np.dtype(target.dtype)
        check_cast(spec.dtype, dtype, where)
        sharding = target.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        regions, elements = _regions(sharding, spec.shape)
        shared = _readonce.Shared(spec, sharding, False) if share(sharding) else None
        return _Plan(spec, dtype, sharding, regions, elements, mapping, where, shared)
    dtype = np.dtype(target.dtype) if isinstance(target, (np.ndarray, np.generic)) else spec.dtype
    check_cast(spec.dtype, dtype, where)
    if _tree.is_python_scalar(target):  # returned as that python type (`_tree.python_value`)
        check_cast(spec.dtype, np.asarray(target).dtype, where)
    return _Plan(spec, dtype, None, [_whole(spec)], math.prod(spec.shape), mapping, where)


@functools.lru_cache(maxsize=1024)  # thousands of leaves share a few (sharding, shape)
def _regions(
    sharding: jax.sharding.Sharding, shape: tuple[int, ...]
) -> tuple[tuple[tuple[slice, ...], ...], int]:
    """The distinct regions of an array of `shape` that this process's devices hold, and how
    many elements they hold in all."""
    shards = dict.fromkeys(
        index_key(index, shape)
        for index in sharding.addressable_devices_indices_map(shape).values()
        if index is not None
    )
    elements = sum(math.prod(b - a for a, b in key) for key in shards)
    return tuple(tuple(slice(a, b) for a, b in key) for key in shards), elements


def _stage(plan: _Plan, slabs: _Slabs) -> list[_Request]:
    """The host buffers that receive the shards of `plan` (allocated here, from `slabs`)."""
    try:
        return [_request(plan.spec, region, plan.mapping, slabs) for region in plan.regions]
    except (MemoryError, OSError) as e:  # e.g. an absurd shape in a hostile document
        spec = plan.spec
        raise CheckpointReadError(
            errno.ENOMEM,
            f"{plan.where}: cannot allocate host memory for {spec.shape} "
            f"{spec.dtype} ({spec.nbytes} bytes): {e}",
        ) from None


def index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A device's index into the global array, as a hashable ((start, stop), ...)."""
    return _format.index_region(index, shape)


def _whole(spec: ArraySpec) -> tuple[slice, ...]:
    """The region of the entire array."""
    return _whole_region(spec.shape)


@functools.lru_cache(maxsize=1024)  # thousands of leaves share a few shapes
def _whole_region(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _place(plans: list[_Plan], staged: list[list[_Request]]) -> list[Any]:
    """Turn the filled host buffers `staged` of `plans` into the values the caller asked for.

    Each sharded leaf is one `jax.make_array_from_callback` call, which hands all of its shards
    to the runtime at once (CPU devices alias aligned host buffers, no copy): a third of the
    time of one `jax.device_put` per shard on an 8-way sharded train state. Leaves held whole
    go through `put_whole`, whose per-leaf Python cost otherwise dominates restores of
    thousands of small leaves.
    """
    out: list[Any] = [None] * len(plans)
    whole: list[tuple[int, np.ndarray, jax.sharding.Sharding]] = []
    for i, (plan, requests) in enumerate(zip(plans, staged)):
        filled = [(r.index, r.out) for r in requests if r.out is not None]
        if plan.spec.prng_impl is not None:
            key_data = cast(jax.Array, filled[0][1])  # numpy is fine: it is wrapped as is
            keys = jax.random.wrap_key_data(key_data, impl=plan.spec.prng_impl)
            out[i] = jax.device_put(keys, plan.sharding) if plan.sharding is not None else keys
            continue
        if len(filled) == 1 and filled[0][1].shape == plan.spec.shape:  # held whole
            buf = filled[0][1]
            buf = buf if buf.dtype == plan.dtype else buf.astype(plan.dtype)
            if plan.sharding is None:
                out[i] = buf
            else:
                whole.append((i, buf, plan.sharding))
            continue
        bufs = {
            index_key(index, plan.spec.shape): buf
            if buf.dtype == plan.dtype
            else buf.astype(plan.dtype)
            for index, buf in filled
        }
        out[i] = from_shards(
            plan.spec.shape, cast(jax.sharding.Sharding, plan.sharding), plan.dtype, bufs
        )
    if whole:
        placed = put_whole([b for _, b, _ in whole], [s for _, _, s in whole])
        for (i, _, _), value in zip(whole, placed):
            out[i] = value
    return out


def put_whole(bufs: list[np.ndarray], shardings: list[jax.sharding.Sharding]) -> list[jax.Array]:
    """`jax.device_put(bufs, shardings)` of whole host arrays, faster where each device gets the
    whole array.

    `jax.device_put` costs ~35 us of Python a leaf (it abstracts, canonicalises and checks each
    value, making four avals); the runtime's own batched put that it ends in costs ~10 us. A
    leaf on one device, or replicated on every device of its sharding (all of them this
    process's), whose dtype JAX keeps as it is goes straight to that (`_direct_put`: 4000 leaves
    of 16 KiB on one device placed in 0.04 s instead of 0.14 s); the others, and every leaf
    when this JAX lacks it, through `jax.device_put`."""
    out: list[Any] = [None] * len(bufs)
    rest = []
    put = _direct_put()
    kept: dict[np.dtype, bool] = {}  # JAX keeps the dtype as it is (not int64 without x64)
    for i, (buf, sharding) in enumerate(zip(bufs, shardings)):
        dtype = buf.dtype
        if dtype not in kept:
            kept[dtype] = jax.dtypes.canonicalize_dtype(dtype) == dtype
        placed = put(buf, sharding) if put is not None and kept[dtype] else None
        if placed is None:
            rest.append(i)
        else:
            out[i] = placed
    if rest:
        for i, value in zip(
            rest, jax.device_put([bufs[i] for i in rest], [shardings[i] for i in rest])
        ):
            out[i] = value
    return out


_Put = Callable[[np.ndarray, jax.sharding.Sharding], jax.Array | None]


@functools.cache
def _direct_put() -> _Put | None:
    """The runtime's batched put of a host array onto every device of a sharding that gives
    each of them the whole array (None for other shardings), or None where this JAX has no
    such internal: `xla_client.batched_device_put(aval, sharding, xs, devices, committed)`
    itself, or else its Python wrapper `pxla.batched_device_put(aval, sharding, xs, devices)`
    (2 us a leaf more; both the same from JAX 0.10 to 0.12), given the array once for each
    device, as `jax.device_put` gives it. The first result of each is checked against what
    `jax.device_put` gives, on one device and replicated on all of this process's; any
    difference or failure falls back to the next, and from the last to `jax.device_put`, for
    good (replicated leaves alone when only they differ)."""
    try:
        from jax._src import core
        from jax._src.interpreters import pxla
        from jax._src.lib import xla_client
    except Exception:  # an internal that moved: the public way does it all
        return None
    aval = functools.lru_cache(maxsize=1024)(core.ShapedArray)

    def runtime(buf: np.ndarray, sharding: jax.sharding.Sharding, devices: list[Any]) -> Any:
        xs = [buf] * len(devices)
        return xla_client.batched_device_put(
            aval(buf.shape, buf.dtype), sharding, xs, devices, True
        )

    def wrapper(buf: np.ndarray, sharding: jax.sharding.Sharding, devices: list[Any]) -> Any:
        xs = [buf] * len(devices)
        return pxla.batched_device_put(aval(buf.shape, buf.dtype), sharding, xs, devices)

    local = jax.local_devices()
    single = jax.sharding.SingleDeviceSharding(local[0])
    replicated = None
    if len(local) > 1:
        mesh = jax.sharding.Mesh(np.array(local), ("devices",))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for impl in (runtime, wrapper):
        put = _whole_put(impl, True)
        if _puts_as_jax_does(put, single):
            both = replicated is not None and _puts_as_jax_does(put, replicated)
            return _whole_put(impl, both)
    return None


def _whole_put(impl: Callable[..., Any], replicated: bool) -> _Put:
    """`impl` for shardings that put the whole array on each of their devices: one device, or
    (`replicated`) every device replicated, all of them this process's."""

    @functools.lru_cache(maxsize=1024)  # a restore's thousands of leaves share a few shardings
    def devices(sharding: jax.sharding.Sharding) -> list[Any] | None:
        if type(sharding) is jax.sharding.SingleDeviceSharding:
            return [next(iter(sharding.device_set))]
        if not (replicated and sharding.is_fully_replicated and sharding.is_fully_addressable):
            return None
        assignment = getattr(sharding, "_addressable_device_assignment", None)
        return list(assignment) if assignment is not None else None

    def put(buf: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array | None:
        where = devices(sharding)
        return impl(buf, sharding, where) if where is not None else None

    return put


def _puts_as_jax_does(put: _Put, sharding: jax.sharding.Sharding) -> bool:
    """Whether `put` puts a probe array onto `sharding` as `jax.device_put` does: the same
    type, shape, dtype, sharding, committed and weak type, shards on the same devices, bytes."""
    probe = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = jax.device_put(probe, sharding)
    try:
        got = put(probe, sharding)
        return (
            isinstance(got, jax.Array)
            and (got.shape, got.dtype, got.sharding, got.committed, got.weak_type)
            == (want.shape, want.dtype, want.sharding, want.committed, want.weak_type)
            and [(s.device, s.index) for s in got.addressable_shards]
            == [(s.device, s.index) for s in want.addressable_shards]
            and all(np.array_equal(np.asarray(s.data), probe) for s in got.addressable_shards)
        )
    except Exception:  # an internal that changed
        return False


def from_shards(
    shape: tuple[int, ...],
    sharding: jax.sharding.Sharding,
    dtype: np.dtype,
    bufs: dict[tuple[tuple[int, int], ...], np.ndarray],
) -> jax.Array:
    def shard(index: tuple[slice, ...] | None) -> np.ndarray:
        return bufs[index_key(index or (), shape)]

    return jax.make_array_from_callback(shape, sharding, shard, dtype=dtype)


def groups_by_size(items: Sequence[T], size: Callable[[T], int], limit: int) -> list[list[T]]:
    """Consecutive items whose sizes add up to at most `limit` bytes (an item larger than that
    on its own): how restores and exports bound the host memory they hold at once."""
    groups: list[list[T]] = []
    total = 0
    for item in items:
        if not groups or total + size(item) > limit:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size(item)
    return groups


def read_arrays(
    ckpt: Storage,
    items: list[tuple[ArraySpec, Any]],
    workers: Workers,
    *,
    max_inflight_bytes: int,
    map_files: bool = True,
    phases: Phases | None = None,
    coordinate: Callable[[], Coordinator] | None = None,
    read_once: bool = False,
) -> list[Any]:
    """Restore `(spec, target leaf or None)` pairs.

    They are read and placed in groups, in order, so that the shards read but not yet placed
    take at most `max_inflight_bytes` of host memory (or one array's shards, if more); on
    accelerators a group's host buffers are freed once it is placed. `map_files`: a local chunk
    that is exactly one shard is mapped copy-on-write, not read.

    `coordinate` (under `jax.distributed`): makes the coordinator of this restore, the first
    time a group holds arrays that span processes (a restore of those is one that every process
    makes alike). Before placing such a group the processes agree that all of them read their
    shards: a process that found damage (each reads only its own shards) would otherwise raise
    while the others wait in placement for it for ever; this way all of them raise.
    `read_once` (with `coordinate`): a chunk of an array every process restores that several
    processes' devices need is read by one of them and sent to the others (`_readonce`); the
    groups are then the same in every process.
    """
    mapping = map_files and not ckpt.network
    phases = phases if phases is not None else Phases()
    phases.arrays += len(items)
    seen: set[str] = set()
    with phases("plan"):
        once = read_once and coordinate is not None
        plans = [
            _plan(spec, target, f"while restoring {spec.name!r} from {ckpt.url}", mapping, once)
            for spec, target in items
        ]
    results: list[Any] = [None] * len(items)
    coord = None
    try:
        for number, group in enumerate(
            groups_by_size(range(len(plans)), lambda i: plans[i].group_bytes, max_inflight_bytes)
        ):
            members = [plans[i] for i in group]
            error: Exception | None = None
            staged: list[list[_Request]] = []
            source = ckpt
            try:
                if shared := [p.shared for p in members if p.shared is not None]:
                    with phases("read"):
                        source, nbytes, error = _readonce.share(
                            ckpt, shared, read_whole_chunk, workers
                        )
                    phases.bytes += nbytes
                if error is None:
                    staged = _read_group(source, members, workers, phases, seen)
            except Exception as e:
                error = e
            if coordinate is not None and any(p.spans_processes for p in members):
                coord = coord or coordinate()
                error = coord.agree(f"read/{number}", error, f"restoring {ckpt.url}")
            if error is not None:
                try:
                    raise error
                finally:
                    error = None  # (else a cycle, this frame in the error's traceback, that keeps
                    # the storage, its prefetched files and the buffers read until a collection)
            with phases("place"):
                for i, value in zip(group, _place(members, staged)):
                    results[i] = value
            del staged  # placed: on accelerators the host buffers go now, before the next group
        return results
    finally:
        ckpt.drop_prefetched()  # files a failed group prefetched and never read


def _read_group(
    ckpt: Storage, members: list[_Plan], workers: Workers, phases: Phases, seen: set[str]
) -> list[list[_Request]]:
    """Stage the host buffers of `members` and read their chunks into them. Nothing here may
    outlive the call but the buffers returned (the read tasks hold them too)."""
    with phases("plan"):
        slabs = _Slabs()
        staged = [_stage(p, slabs) for p in members]
        tasks = [
            t
            for p, reqs in zip(members, staged)
            for t in _chunk_tasks(ckpt, p.spec, reqs, p.where, seen)
        ]
    with phases("read"):
        workers.run_reads(tasks, network=ckpt.network)
    phases.bytes += sum(t.cost for t in tasks)
    return staged


# ---------------------------------------------------------------------------------------------
# Whole trees


def restore_tree(
    ckpt: Storage,
    target: Any,
    *,
    strict: bool,
    workers: Workers,
    max_inflight_bytes: int,
    map_files: bool = True,
    phases: Phases | None = None,
    barrier_timeout_s: float = 300.0,
    local_key: str | None = None,
    read_once: bool | None = None,
) -> Any:
    """Restore the checkpoint `ckpt` (see `asyncckpt.restore`). `local_key`: `ckpt` is this
    process's part of a node-local step (each process restores from its own directory), and
    the processes coordinate under this name instead of the checkpoint's location (and each
    reads its own part: no `read_once`).

    A checkpoint deleted or replaced while it is read (a manager's retention, `force=True`)
    fails with `CheckpointNotFoundError` instead of a torn result: the checkpoint directory must
    be the same one (same inode) with its root document after every chunk was read."""
    with _tree.paused_gc():  # thousands of leaves
        phases = phases if phases is not None else Phases()
        identity = _identity(ckpt)
        with phases("plan"):
            info = read_root(ckpt)
        if info.local_part is not None and local_key is None:
            raise CheckpointError(
                f"{ckpt.url} is process {info.local_part.process}'s part of a step of a node-local "
                f"tier ({info.local_part.processes} processes), not a whole checkpoint: restore it "
                "with CheckpointManager(..., local_directory=...).restore()"
            )
        try:
            coordinate = None
            if _distributed.is_multi_process():
                call = f"restore {ckpt.url}" if local_key is None else local_key

                def coordinate() -> _distributed.Coordinator:
                    return _distributed.Coordinator(call, barrier_timeout_s)

            read = functools.partial(
                read_arrays,
                ckpt,
                workers=workers,
                max_inflight_bytes=max_inflight_bytes,
                map_files=map_files,
                phases=phases,
                coordinate=coordinate,
                read_once=local_key is None and _reads_once(ckpt, read_once),
            )
            value = _restore_tree(ckpt.url, info, target, strict, read, phases)
        except (IncompleteCheckpointError, CorruptCheckpointError) as e:
            if _changed(ckpt, identity):
                raise _gone(ckpt) from e
            raise
        if _changed(ckpt, identity):
            raise _gone(ckpt)
        return value


def _reads_once(ckpt: Storage, asked: bool | None) -> bool:
    """Whether a restore shares reads among processes (`read_once`; None: where storage is
    slower than the collectives, i.e. not local files read by CPU devices, whose page cache is
    faster than CPU collectives)."""
    if asked is not None:
        return asked
    return ckpt.network or jax.devices()[0].platform != "cpu"


_HEAD_BYTES = 256  # the root document's first bytes hold its save time, to the microsecond


def _identity(ckpt: Storage) -> Any:
    """What tells this checkpoint from one saved in its place: the place's own identity (a
    directory's inode) and the first bytes of its root document (its save time: an object
    store has no inode, and a replacement there is the same prefix)."""
    try:
        head = ckpt.get(_format.DOC, start=0, end=_HEAD_BYTES).tobytes()
    except (OSError, CheckpointError):
        head = None  # read_root reports it
    return ckpt.identity(), head


def _changed(ckpt: Storage, identity: Any) -> bool:
    return _identity(ckpt) != identity or identity[1] is None


def _gone(ckpt: Storage) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"{ckpt.url} was deleted or replaced while it was being restored (by retention, `delete` "
        "or a save with force=True); nothing torn was returned. Restore another step, or this "
        "one again if it was replaced"
    )


def _restore_tree(
    path: str,
    info: RootInfo,
    target: Any,
    strict: bool,
    read: Callable[[list[tuple[ArraySpec, Any]]], list[Any]],
    phases: Phases,
) -> Any:
    """`read`: `read_arrays` of this checkpoint with the restore's options."""
    values = _tree.spec_values(info.tree)
    where = f"at {path}"
    if target is None:
        names = _tree.spec_leaf_names(info.tree)
        missing = [n for n in names if n not in info.arrays]
        if missing:
            raise IncompleteCheckpointError(
                f"checkpoint {path} lists variables without metadata: {missing[:10]}"
            )
        arrays = read([(info.arrays[n], None) for n in names])
        return _tree.unflatten(info.tree, dict(zip(names, arrays)))
    with phases("plan"):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        target_leaves = [
            _tree.Leaf(kp, _tree.variable_name(kp), on_devices(v, kp, where)) for kp, v in leaves
        ]
        state = [leaf for leaf in target_leaves if not _tree.is_code_leaf(leaf.value)]
        saved_shapes: dict[str, tuple[int, ...]] = {n: () for n in values}
        saved_shapes.update({n: logical_shape(s) for n, s in info.arrays.items()})
        _tree.check_match(state, saved_shapes, strict=strict, where=where)
    wanted = [
        (i, leaf)
        for i, leaf in enumerate(target_leaves)
        if leaf.name in info.arrays and not _tree.is_code_leaf(leaf.value)
    ]
    arrays = read([(info.arrays[leaf.name], leaf.value) for _, leaf in wanted])
    out = [
        leaf.value  # code comes from the target
        if _tree.is_code_leaf(leaf.value)
        else _scalar_as(values[leaf.name], leaf.value, f"while restoring {leaf.name!r} {where}")
        if leaf.name in values
        else None
        for leaf in target_leaves
    ]
    for (i, leaf), value in zip(wanted, arrays):
        out[i] = (
            _tree.python_value(value, leaf.value) if _tree.is_python_scalar(leaf.value) else value
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def on_devices(value: Any, keypath: tuple[Any, ...], where: str) -> Any:
    """A target leaf whose sharding is on an `AbstractMesh` (what `jax.eval_shape` and
    `nnx.eval_shape` give under `jax.set_mesh`), moved onto the concrete mesh in context."""
    sharding = getattr(value, "sharding", None)
    if not (
        isinstance(value, jax.ShapeDtypeStruct)
        and isinstance(sharding, jax.sharding.NamedSharding)
        and isinstance(sharding.mesh, jax.sharding.AbstractMesh)
    ):
        return value
    mesh = jax.sharding.get_mesh()
    wanted = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
    if mesh.empty:
        raise TreeMismatchError(
            f"the target leaf {_tree.keystr(keypath)} is sharded over an abstract mesh "
            f"{wanted} (as `eval_shape` makes under `jax.set_mesh`), and no concrete mesh is set: "
            f"restore inside `with jax.set_mesh(mesh):` (restoring {where})"
        )
    have = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if have != wanted:
        raise TreeMismatchError(
            f"the target leaf {_tree.keystr(keypath)} is sharded over an abstract mesh {wanted}, "
            f"but the mesh set by `jax.set_mesh` is {have}: restore under a mesh of the same axes "
            f"(restoring {where})"
        )
    concrete = jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
    return jax.ShapeDtypeStruct(
        value.shape, value.dtype, sharding=concrete, weak_type=value.weak_type
    )


def _scalar_as(value: Any, target: Any, where: str) -> Any:
    """A python scalar saved in the tree description, as the target leaf asks for it: a 0-d
    array of its dtype for an array target (placed on its sharding for a JAX one). A saved state
    goes to the target's `set_state`, and the target is returned."""
    if isinstance(value, _tree.SavedState):
        if not _tree.is_stateful_leaf(target):
            raise TreeMismatchError(
                f"{where}: the checkpoint holds the state of an object with get_state/set_state "
                f"(a data iterator), and the target holds a {type(target).__name__}: pass the "
                "object whose state to set"
            )
        target.set_state(_tree.decode_state(value.spec))
        return target
    if _tree.is_stateful_leaf(target):
        raise TreeMismatchError(
            f"{where}: the target holds a {type(target).__name__} (an object with get_state/"
            f"set_state) and the checkpoint a {type(value).__name__}: save that object itself"
        )
    if (
        not isinstance(target, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic))
        or value is None
        or isinstance(value, str)
    ):
        return value
    dtype = np.dtype(target.dtype)
    check_cast(np.asarray(value).dtype, dtype, where)
    try:
        array = np.asarray(value, dtype)
    except OverflowError:
        raise TreeMismatchError(
            f"{where}: the checkpoint holds {value!r}, which does not fit in the target's {dtype}"
        ) from None
    if isinstance(target, np.ndarray):
        return array
    if isinstance(target, np.generic):
        return array[()]
    return jax.device_put(array, target.sharding or jax.local_devices()[0])
