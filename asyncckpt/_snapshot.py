"""Device -> host: the only save-side code that touches the caller's arrays.

`take_snapshot` plans one chunk per replica-0 addressable shard, starts every device-to-host copy,
then copies each chunk into a private host arena. When it returns the caller may donate, mutate or
delete its arrays.

Arrays on CPU devices are not copied: their buffers already are host memory, and a jax.Array is
immutable. The snapshot holds read-only numpy views of them instead. XLA's CPU client keeps a
buffer alive while such a view exists, and when the caller donates a buffer that has one, it copies
the buffer rather than reusing it (tests/test_async.py checks both). So on CPU `save` blocks only
until the arrays are computed and holds no second copy of them; a training step that donates its
state while a save is being written pays one copy of that state instead.

Arenas are anonymous `mmap`s reused from one save to the next (`ArenaPool`): first-touch page
faults cost far more than the copy itself on many machines (measured ~1 GB/s fresh vs ~10 GB/s
reused here), so a steady training loop pays them only once.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np

from . import _dtypes, _format
from ._executor import Workers, batches
from ._format import ArraySpec
from ._tree import (
    Leaf,
    flatten,
    is_array_leaf,
    is_stateful_leaf,
    keystr,
    paused_gc,
    with_states,
)
from .errors import DeletedArrayError

_ALIGN = 64
# Large chunks start on a page: LocalStorage writes them around the page cache (O_DIRECT), which
# wants aligned memory (_storage/direct.py).
_PAGE, _PAGE_ALIGNED_FROM = 4096, 1 << 20
_COPY_SPLIT = 32 << 20  # copies larger than this are split across threads


def _place(used: int, n: int) -> int:
    """Where a slice of `n` bytes starts in an arena of which `used` bytes are taken."""
    align = _PAGE if n >= _PAGE_ALIGNED_FROM else _ALIGN
    return -(-used // align) * align


class Arena:
    """A block of anonymous memory handed out in aligned slices (bump allocation)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(nbytes, 1)
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._map = mmap.mmap(-1, self.nbytes, flags=flags) if flags else mmap.mmap(-1, self.nbytes)
        self._buf = np.frombuffer(self._map, np.uint8)
        self._used = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = math.prod(shape) * dtype.itemsize
        start = _place(self._used, n)
        self._used = start + n
        return self._buf[start : start + n].view(dtype).reshape(shape)

    @staticmethod
    def size_for(sizes: Iterable[int]) -> int:
        """The bytes an arena needs to hand out slices of `sizes`, in that order."""
        used = 0
        for n in sizes:
            used = _place(used, n) + n
        return used

    def reset(self) -> None:
        self._used = 0


class ArenaPool:
    """Keeps the arena of the last finished save for the next one (at most one is kept)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._free: Arena | None = None

    def acquire(self, nbytes: int) -> Arena:
        arena, self._free = self._free, None  # atomic swap under the GIL
        if arena is not None and nbytes <= arena.nbytes <= 2 * nbytes + (64 << 20):
            arena.reset()
            return arena
        return Arena(nbytes)

    def release(self, arena: Arena) -> None:
        if self.enabled:
            self._free = arena

    def clear(self) -> None:
        self._free = None


@dataclass(slots=True)
class HostArray:
    """The host buffers of the chunks of one array variable that this process writes. (Not
    frozen: one is made per array of every save, and a frozen one costs three times as much.)"""

    spec: ArraySpec
    chunks: list[tuple[tuple[int, ...], np.ndarray]]
    """(chunk coordinates, C-contiguous host buffer), replica-0 addressable shards only."""
    extra: list[tuple[tuple[int, ...], Any]] = field(default_factory=list)
    """With `every_replica`: the chunks of the other distinct shards this process holds (whose
    replica 0 is another process's), for a node-local tier, which keeps every replica; and the
    shards peers sent it (`LocalTier.replicate`: single-device arrays of shape (1, *chunk))."""
    hashes: dict[tuple[int, ...], str] = field(default_factory=dict)
    """Filled by the writer threads: each chunk's `_format.chunk_hash`."""
    reused: set[tuple[int, ...]] = field(default_factory=set)
    """Filled by the writer threads: the chunks linked or copied from the step before."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a save writes, in host memory that the caller cannot change."""

    arrays: list[HostArray]
    tree: dict[str, Any]
    created: float
    arena: Arena | None


@functools.lru_cache(maxsize=4096)
def _chunk_shape(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The chunk shape of an array of `shape` sharded by `sharding` (`_format.chunk_shape`)."""
    return _format.chunk_shape(shape, sharding.devices_indices_map(shape).values())


def _stored_dtype(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


class _Piece(NamedTuple):
    """One chunk to copy: from `source[source_index]` into a new arena buffer. (A tuple: one is
    made per chunk of every save, thousands for a tree of small leaves, at a third of a frozen
    dataclass's cost.)"""

    array: int
    coords: tuple[int, ...]
    source: Any  # a single-device jax.Array or a numpy array
    source_index: tuple[slice, ...]
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class _Template:
    """A piece to copy, independent of the values: from shard `source` of the leaf's sources."""

    coords: tuple[int, ...]
    source: int
    source_index: tuple[slice, ...]
    primary: bool  # from a replica-0 shard: written to the persistent tier


def data_of(value: Any) -> Any:
    """The array whose bytes are stored: key data for typed PRNG keys, numpy for host values."""
    if isinstance(value, jax.Array):
        # key types are extended dtypes, never numpy's (issubdtype costs 14 us a leaf)
        if not isinstance(value.dtype, np.dtype) and jax.dtypes.issubdtype(
            value.dtype, jax.dtypes.prng_key
        ):
            return jax.random.key_data(value)
        return value
    return np.asarray(value)


def _whole_copy(data: Any) -> bool:
    """Stored as one chunk copied from any local replica (host values, replicated arrays)."""
    return not isinstance(data, jax.Array) or (
        data.sharding.is_fully_replicated and data.sharding.is_fully_addressable
    )


def _sources(data: Any) -> list[tuple[Any, tuple[slice, ...], bool]]:
    """(single-device array or host array, its index in the global array, replica 0 or not) to
    copy from: one per distinct index among this process's shards (replica 0 where held)."""
    if _whole_copy(data):
        return [(data, (), True)]
    found: dict[Any, tuple[Any, tuple[slice, ...], bool]] = {}
    for s in data.addressable_shards:
        key = _format.index_region(s.index, data.shape)
        if key not in found or (s.replica_id == 0 and not found[key][2]):
            found[key] = (s.data, s.index, s.replica_id == 0)
    return list(found.values())


def _plan_leaf(leaf: Leaf) -> tuple[ArraySpec, list[_Template]]:
    value = leaf.value
    prng_impl = None
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        prng_impl = str(jax.random.key_impl(value))
    data = data_of(value)
    dtype = _stored_dtype(np.dtype(data.dtype))
    if not _dtypes.is_supported(dtype):
        _dtypes.zarr_name(dtype, where=keystr(leaf.keypath))  # raises, naming the leaf
    shape = tuple(data.shape)
    whole = _format.chunk_shape(shape, None)
    chunk = whole if _whole_copy(data) else _chunk_shape(data.sharding, shape)
    spec = ArraySpec(
        leaf.name, shape, dtype, chunk, prng_impl, _format.band_rows_for(chunk, dtype.itemsize)
    )
    if spec.nbytes == 0:
        return spec, []
    sources = _sources(data)
    if chunk == whole:
        return spec, [
            _Template((0,) * len(shape), k, (), primary)
            for k, (_, _, primary) in enumerate(sources)
        ]
    templates = []
    for k, (_, index, primary) in enumerate(sources):
        starts = [s.start or 0 for s in index]
        stops = [size if s.stop is None else s.stop for s, size in zip(index, shape)]
        ranges = [range(a // c, -(-b // c)) for a, b, c in zip(starts, stops, chunk)]
        for coords in np.ndindex(*[len(r) for r in ranges]):
            cc = tuple(r[j] for r, j in zip(ranges, coords))
            sub = tuple(slice(c * n - a, c * n - a + n) for c, n, a in zip(cc, chunk, starts))
            templates.append(_Template(cc, k, sub, primary))
    return spec, templates


@dataclass(frozen=True, slots=True)
class _LeafPlan:
    position: int  # in the flattened leaves
    templates: list[_Template]
    local: bool  # held whole by this process (written by process 0 only)
    whole: bool  # one chunk from any local replica (no shard list to ask for)
    prng: bool
    device_copy: bool  # the data lives on an accelerator: start its copy to host first
    host_view: bool  # a jax.Array on CPU devices: its chunks are views of its buffers
    view_coords: tuple[int, ...] | None  # one chunk, a view of the whole value (below)


@dataclass(frozen=True, slots=True)
class _TreePlan:
    """What a save of a tree of this structure, these shapes, dtypes and shardings writes."""

    tree: dict[str, Any]  # the JSON description
    arrays: list[ArraySpec]
    leaves: list[_LeafPlan]
    stateful: bool  # it has leaves whose state goes into the description at each save


_PLANS: dict[Any, _TreePlan] = {}
_MAX_PLANS = 8
_SHARDINGS: dict[Any, Any] = {}  # one object of each sharding a save's leaves had
_MAX_SHARDINGS = 1024  # then it starts again (keys compare their shardings by `==` meanwhile)


def _signature(value: Any, shardings: dict[int, Any]) -> Any:
    """What the plan of a leaf depends on. `shardings`: by id, the one object of each sharding
    that this save's keys hold (`_SHARDINGS`), so that a key compares its thousands of equal
    shardings by identity: a new step's arrays carry new sharding objects, and their `==` is
    Python's (5 ms a 4000-leaf save)."""
    if isinstance(value, jax.Array):
        sharding = value.sharding
        same = shardings.get(id(sharding))
        if same is None:
            same = shardings[id(sharding)] = _SHARDINGS.setdefault(sharding, sharding)
        return (jax.Array, value.shape, value.dtype, same)
    if isinstance(value, (np.ndarray, np.generic)):
        return (type(value), value.shape, value.dtype)
    if is_stateful_leaf(value):  # its state is read at each save (`with_states`)
        return (type(value), "state")
    return (type(value), repr(value))  # python scalars are stored in the tree description


def _plan_tree(tree: Any) -> tuple[_TreePlan, list[Any]]:
    """The plan for `tree` and its leaves (JAX's flatten order). A training loop saves the same
    structure every time: the plan is cached by tree structure and leaf signatures, so a save
    of thousands of leaves does not walk keypaths and shardings again (~70 ms per 4000 leaves)."""
    values, treedef = jax.tree_util.tree_flatten(tree)
    try:
        if len(_SHARDINGS) > _MAX_SHARDINGS:
            _SHARDINGS.clear()
        shardings: dict[int, Any] = {}
        key: Any = (treedef, tuple([_signature(v, shardings) for v in values]))
        plan = _PLANS.get(key)
    except TypeError:  # something unhashable: plan without the cache
        key, plan = None, None
    if plan is not None:
        return plan, values
    leaves, description = flatten(tree)
    arrays: list[ArraySpec] = []
    per_leaf = []
    for pos, leaf in enumerate(leaves):
        if is_array_leaf(leaf.value):
            spec, templates = _plan_leaf(leaf)
            arrays.append(spec)
            value = leaf.value
            is_jax = isinstance(value, jax.Array)
            on_cpu = is_jax and all(d.platform == "cpu" for d in value.sharding.device_set)
            whole = _whole_copy(data_of(value))
            prng = spec.prng_impl is not None
            # the common leaf of a CPU job's tree: stored as one chunk, a view of its buffer
            single = whole and on_cpu and not prng and len(templates) == 1
            per_leaf.append(
                _LeafPlan(
                    pos,
                    templates,
                    _is_local(value),
                    whole,
                    prng,
                    is_jax and not on_cpu,
                    on_cpu,
                    templates[0].coords if single else None,
                )
            )
    plan = _TreePlan(description, arrays, per_leaf, any(map(is_stateful_leaf, values)))
    if key is not None and [id(leaf.value) for leaf in leaves] == [id(v) for v in values]:
        while len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan, [leaf.value for leaf in leaves]


def _is_local(value: Any) -> bool:
    """A value held whole by the process (not a global array spanning processes)."""
    return not isinstance(value, jax.Array) or value.sharding.is_fully_addressable


def _host_view(source: Any, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray | None:
    """`source[index]` as a read-only view of a CPU array's buffer, or None when it must be
    copied (not C-contiguous, another dtype). np.asarray waits for the array to be computed."""
    view = np.asarray(source)
    view = view[index] if index else view
    return view if view.flags.c_contiguous and view.dtype == dtype else None


def _copy(piece: _Piece, dest: np.ndarray) -> None:
    src = np.asarray(piece.source)  # device -> host (already started), or a numpy view
    src = src[piece.source_index] if piece.source_index else src
    np.copyto(dest, src, casting="no" if src.dtype == dest.dtype else "equiv")


def _copy_tasks(planned: list[tuple[_Piece, np.ndarray]], parts: int) -> list[Any]:
    """Group the copies into tasks of similar size; split very large copies by rows."""
    units: list[tuple[_Piece, np.ndarray]] = []
    for piece, dest in planned:
        if dest.ndim and dest.shape[0] > 1 and dest.nbytes > _COPY_SPLIT:
            rows = max(1, dest.shape[0] * _COPY_SPLIT // dest.nbytes)
            idx = piece.source_index or tuple(slice(0, n) for n in dest.shape)
            for r in range(0, dest.shape[0], rows):
                stop = idx[0].start + min(r + rows, dest.shape[0])
                sub = (slice(idx[0].start + r, stop), *idx[1:])
                part = _Piece(piece.array, piece.coords, piece.source, sub, (), 0)
                units.append((part, dest[r : r + rows]))
        else:
            units.append((piece, dest))
    groups = batches(units, lambda u: u[1].nbytes + 4096, parts=parts, min_cost=1 << 20)
    return [functools.partial(_copy_group, g) for g in groups]


def _copy_group(group: list[tuple[_Piece, np.ndarray]]) -> None:
    for piece, dest in group:
        _copy(piece, dest)


def take_snapshot(
    tree: Any,
    workers: Workers,
    pool: ArenaPool,
    *,
    process_index: int = 0,
    every_replica: bool = False,
) -> Snapshot:
    """Copy every leaf of `tree` that this process writes into private host memory.

    Under `jax.distributed` a process writes the replica-0 shards of its addressable devices;
    values every process holds whole (numpy arrays, single-device arrays) are process 0's.
    `every_replica`: also copy, into `HostArray.extra`, one copy of every other distinct shard
    this process holds (the node-local tier keeps every replica)."""
    try:
        with paused_gc():
            return _take_snapshot(tree, workers, pool, process_index, every_replica)
    except RuntimeError as e:  # JAX's "Array has been deleted", which names no leaf
        deleted = [
            keystr(kp)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(v, jax.Array) and v.is_deleted()
        ]
        if not deleted:
            raise
        raise DeletedArrayError(
            f"cannot save {', '.join(deleted[:10])}{' ...' if len(deleted) > 10 else ''}: "
            "deleted or donated (e.g. by a jax.jit with donate_argnums) before save() copied "
            "it. Save the state before the call that donates it, or save that call's outputs"
        ) from e


def _take_snapshot(
    tree: Any, workers: Workers, pool: ArenaPool, process_index: int, every_replica: bool
) -> Snapshot:
    plan, values = _plan_tree(tree)
    pieces: list[_Piece] = []  # to copy into the arena
    views: list[tuple[_Piece, np.ndarray]] = []
    to_host: list[Any] = []
    extra: set[tuple[int, tuple[int, ...]]] = set()  # (array, coords) of HostArray.extra
    arrays = plan.arrays
    host = [HostArray(a, []) for a in arrays]
    for i, leaf in enumerate(plan.leaves):
        not_ours = process_index != 0 and leaf.local  # process 0 writes what all hold whole
        if leaf.view_coords is not None and not not_ours:
            # a whole leaf on CPU devices (most leaves of a CPU job's tree): its one chunk is a
            # view of its buffer, taken here without a piece, for 4000 leaves a third of the
            # loop's time
            whole = _host_view(values[leaf.position], (), arrays[i].dtype)
            if whole is not None:
                host[i].chunks.append((leaf.view_coords, whole))
                continue
        if not_ours and not every_replica:
            continue
        spec = arrays[i]
        data = values[leaf.position]
        if leaf.prng:
            data = jax.random.key_data(data)
        elif not isinstance(data, (jax.Array, np.ndarray)):
            data = np.asarray(data)  # numpy scalars
        sources = [(data, (), True)] if leaf.whole else _sources(data)
        templates = leaf.templates
        if not (every_replica or leaf.whole):  # a whole value's one source is replica 0
            templates = [t for t in templates if t.primary]
            sources = [src if src[2] else (None, (), False) for src in sources]
        if leaf.device_copy:
            to_host.extend(src for src, _, _ in sources if src is not None)
        for t in templates:
            if not_ours or not t.primary:
                extra.add((i, t.coords))
            piece = _Piece(
                i,
                t.coords,
                sources[t.source][0],
                t.source_index,
                spec.chunk_shape,
                spec.chunk_nbytes,
            )
            view = (
                _host_view(piece.source, piece.source_index, spec.dtype) if leaf.host_view else None
            )
            if view is None:
                pieces.append(piece)
            else:
                views.append((piece, view))
    for source in to_host:  # start every device -> host transfer before waiting on any
        source.copy_to_host_async()
    total = Arena.size_for(p.nbytes for p in pieces)
    arena = pool.acquire(total) if pieces else None
    planned = [(p, arena.take(p.shape, arrays[p.array].dtype)) for p in pieces] if arena else []
    workers.run_all(_copy_tasks(planned, parts=min(workers.size, os.cpu_count() or 1)))
    for p, dest in views + planned:
        held = host[p.array]
        into = held.extra if extra and (p.array, p.coords) in extra else held.chunks
        into.append((p.coords, dest))
    description = plan.tree
    if plan.stateful:
        description = with_states(plan.tree, jax.tree_util.tree_leaves(tree))
    return Snapshot(host, description, time.time(), arena)
