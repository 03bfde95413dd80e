"""Moving bytes between the processes of a `jax.distributed` job through JAX collectives (device
to device on accelerators, gloo on CPU): no network of asyncckpt's own.

Every function here is a collective call: every process makes it with the same arguments, in the
same order, from the thread that drives JAX.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import _format


@dataclass(frozen=True, slots=True)
class Move:
    """One buffer (`key`) that process `src` holds and process `dst` needs."""

    src: int
    dst: int
    key: str


def _row_bytes(nbytes: int) -> int:
    """Rows are padded to a power of two (at least 64 bytes), so that a few shapes are
    compiled, not one per array size."""
    return max(64, 1 << max(0, nbytes - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _permute(
    devices: tuple[jax.Device, ...], perm: tuple[tuple[int, int], ...], ndim: int = 1
) -> Callable:
    """A jitted `ppermute` of the rows of a (devices, ...) array, one row per device."""
    mesh = Mesh(np.array(devices), ("d",))
    spec = P("d", *([None] * ndim))

    def body(x: jax.Array) -> jax.Array:
        return jax.lax.ppermute(x, "d", perm)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))


BUNDLE_BYTES = 64 << 20
"""At most this many bytes go from one device to another in one round (more when one buffer is
larger): buffers bound for the same process travel together, so many small ones cost few
rounds, and host memory for a round stays bounded."""


def _bundle_rounds(
    moves: list[Move], size: Callable[[str], int], devices: tuple[jax.Device, ...]
) -> list[list[tuple[int, int, list[Move]]]]:
    """Group the moves into rounds of one collective permutation each: (source device index,
    destination device index, the moves carried, in order), every device sending and receiving
    at most one bundle a round. Deterministic, so every process computes the same rounds."""
    by_process: dict[int, list[int]] = {}
    for i, d in enumerate(devices):
        by_process.setdefault(d.process_index, []).append(i)
    queues: dict[tuple[int, int], list[Move]] = {}
    for m in moves:
        queues.setdefault((m.src, m.dst), []).append(m)
    rounds = []
    while any(queues.values()):
        sending: set[int] = set()
        receiving: set[int] = set()
        this = []
        for (src, dst), queue in sorted(queues.items()):
            while queue:
                a = next((i for i in by_process[src] if i not in sending), None)
                b = next((i for i in by_process[dst] if i not in receiving), None)
                if a is None or b is None:
                    break
                bundle: list[Move] = []
                total = 0
                while queue and (not bundle or total + _slot(size(queue[0].key)) <= BUNDLE_BYTES):
                    total += _slot(size(queue[0].key))
                    bundle.append(queue.pop(0))
                sending.add(a)
                receiving.add(b)
                this.append((a, b, bundle))
        rounds.append(this)
    return rounds


def _slot(nbytes: int) -> int:
    """Bytes a buffer takes in a bundle: each starts 64-byte aligned (a view of any dtype)."""
    return -(-nbytes // 64) * 64


def _round_bytes(nbytes: int) -> int:
    """A round's row length: a power of two up to 1 MiB, then a multiple of 1 MiB, so that few
    shapes are compiled and little padding crosses."""
    return _row_bytes(nbytes) if nbytes <= 1 << 20 else -(-nbytes // (1 << 20)) << 20


def move(
    moves: list[Move],
    size: Callable[[str], int],
    read: Callable[[str], np.ndarray],
    write: Callable[[str, np.ndarray], None],
) -> None:
    """Carry out `moves` of buffers of `size(key)` bytes, bundled (`BUNDLE_BYTES`): this
    process `read(key)`s what it sends (uint8, at least `size(key)` bytes) and
    `write(key, data)`s what it receives (a read-only uint8 view of exactly `size(key)` bytes,
    which stays valid)."""
    devices = tuple(jax.devices())
    me = jax.process_index()
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    mine = [i for i, d in enumerate(devices) if d.process_index == me]
    for this in _bundle_rounds(moves, size, devices):
        row = _round_bytes(max(sum(_slot(size(m.key)) for m in bundle) for _, _, bundle in this))
        rows = {i: np.zeros((1, row), np.uint8) for i in mine}
        for src, _, bundle in this:
            if devices[src].process_index == me:
                offset = 0
                for m in bundle:
                    n = size(m.key)
                    rows[src][0, offset : offset + n] = read(m.key)[:n]
                    offset += _slot(n)
        x = jax.make_array_from_single_device_arrays(
            (len(devices), row),
            sharding,
            [jax.device_put(rows[i], devices[i]) for i in mine],
        )
        y = _permute(devices, tuple((src, dst) for src, dst, _ in this), 1)(x)
        received = {devices.index(s.device): s.data for s in y.addressable_shards}
        for _, dst, bundle in this:
            if devices[dst].process_index == me:
                data = np.asarray(received[dst])[0]
                offset = 0
                for m in bundle:
                    n = size(m.key)
                    write(m.key, data[offset : offset + n])
                    offset += _slot(n)


def broadcast_bytes(data: bytes, *, is_source: bool) -> bytes:
    """`data` of the one process where `is_source`, in every process."""
    from jax.experimental import multihost_utils

    size = multihost_utils.broadcast_one_to_all(
        np.array([len(data)], np.int64), is_source=is_source
    )
    n = int(np.asarray(size)[0])
    buf = np.zeros(n, np.uint8)
    if is_source:
        buf[:] = np.frombuffer(data, np.uint8)
    out = multihost_utils.broadcast_one_to_all(buf, is_source=is_source)
    return np.asarray(out).tobytes()


Received = list[tuple[tuple[int, ...], Any]]
"""Shards a process received: (chunk coordinates, an array-like of shape (1, *chunk) that
`np.asarray` reads to the host, waiting for the transfer)."""


def replicate(arrays: list[jax.Array], replicas: int) -> list[Received]:
    """Send each shard of each global array that fewer than `replicas` processes hold to the
    next processes in ring order after its first holder, device to device. Returns, per array,
    what this process received, in the one-chunk-per-shard grid the snapshot writes.

    Arrays evenly sharded by a `NamedSharding` over a mesh with devices of every process (the
    usual case) go in one program per mesh: one `ppermute` per array and round, dispatched
    without waiting on accelerators, which run a device's programs in dispatch order (the
    received arrays are ready when the transfers are; reading them waits). Its inputs are
    computed first. On CPU devices the program is waited for: XLA:CPU deadlocked with it in
    flight beside a training loop. Other arrays go through `replicate_shards`, one waited-for
    round at a time."""
    out: list[Received] = [[] for _ in arrays]
    by_mesh: dict[Mesh, list[int]] = {}
    for i, data in enumerate(arrays):
        sharding = data.sharding
        mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
        if (
            isinstance(mesh, Mesh)
            and _spans_every_process(mesh)
            and _even_named(data, cast(NamedSharding, sharding))
        ):
            by_mesh.setdefault(mesh, []).append(i)
        else:
            out[i] = replicate_shards(data, replicas)
    for mesh, members in by_mesh.items():
        shardings = {i: cast(NamedSharding, arrays[i].sharding) for i in members}
        plans = [(i, _ring_rounds(arrays[i].shape, shardings[i], replicas)) for i in members]
        plans = [(i, rounds) for i, rounds in plans if rounds]
        if not plans:
            continue
        inputs = [arrays[i] for i, _ in plans]
        jax.block_until_ready(inputs)
        program = _ring_program(
            mesh,
            tuple(shardings[i].spec for i, _ in plans),
            tuple(tuple(tuple((s, d) for s, d, _ in r) for r in rounds) for _, rounds in plans),
        )
        outputs = program(*inputs)
        flat = list(mesh.devices.flat)
        if any(d.platform == "cpu" for d in flat):
            # XLA:CPU: this program in flight beside the training steps that follow deadlocked
            # (every device thread of both processes waiting; benchmarks/multitier.py, after
            # ~20 saves): there, it is finished before save() returns
            jax.block_until_ready(outputs)
        results = iter(outputs)
        for i, rounds in plans:
            for r in rounds:
                result = next(results)
                for _, dst, coords in r:
                    if flat[dst].process_index == jax.process_index():
                        out[i].append((coords, _Row(result, flat[dst])))
    return out


class _Row:
    """What `device` received: its row of a `_ring_program` output, taken out only when read
    (`np.asarray`, on the local writer's thread: finding it costs ~30 us an array)."""

    __slots__ = ("device", "result")

    def __init__(self, result: jax.Array, device: jax.Device) -> None:
        self.result = result
        self.device = device

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        shard = next(s.data for s in self.result.addressable_shards if s.device == self.device)
        return np.asarray(shard, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _spans_every_process(mesh: Mesh) -> bool:
    """Whether every process has devices in `mesh` (so the ring can reach each of them)."""
    return {d.process_index for d in mesh.devices.flat} == set(range(jax.process_count()))


def _even_named(data: jax.Array, sharding: NamedSharding) -> bool:
    """Whether `data` is split by its `sharding` into equal shards (what shard_map takes)."""
    if data.size == 0:
        return False
    mesh = sharding.mesh
    for dim, axes in zip(data.shape, tuple(sharding.spec) + (None,) * data.ndim):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if dim % int(np.prod([mesh.shape[a] for a in names], dtype=np.int64)):
            return False
    return True


@functools.lru_cache(maxsize=1024)
def _ring_rounds(
    shape: tuple[int, ...], sharding: NamedSharding, replicas: int
) -> list[list[tuple[int, int, tuple[int, ...]]]]:
    """The transfers that give every shard of an array `replicas` holding processes, in rounds
    of one permutation each: (source, destination) as indices into the mesh's flattened
    devices, with the chunk coordinates of the shard (`shard_copies`: evenly sharded, each
    shard is one chunk). Deterministic, so every process plans alike; cached, as a training
    loop saves the same shardings again and again."""
    flat = list(sharding.mesh.devices.flat)
    position = {d: k for k, d in enumerate(flat)}
    # (source device, destination process, coords)
    pending = [
        (position[c.device], c.dst, c.coords) for c in shard_copies(shape, sharding, replicas)
    ]
    by_process: dict[int, list[int]] = {}
    for k, d in enumerate(flat):
        by_process.setdefault(d.process_index, []).append(k)
    rounds = []
    while pending:
        sending: set[int] = set()
        receiving: set[int] = set()
        this, later = [], []
        for source, process, coords in pending:
            dst = next((k for k in by_process[process] if k not in receiving), None)
            if source in sending or dst is None:
                later.append((source, process, coords))
                continue
            sending.add(source)
            receiving.add(dst)
            this.append((source, dst, coords))
        rounds.append(this)
        pending = later
    return rounds


@functools.lru_cache(maxsize=64)
def _ring_program(
    mesh: Mesh, specs: tuple[P, ...], perms: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
) -> Callable:
    """One jitted program: for each input and each of its rounds, a `ppermute` over all of the
    mesh's devices (flattened in mesh order). Each output has one row per device: what that
    device received (zeros where it received nothing)."""
    axes = tuple(mesh.axis_names)
    every = P(axes)

    def body(*xs: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(
            jax.lax.ppermute(x, axes, perm)[None]
            for x, rounds in zip(xs, perms, strict=True)
            for perm in rounds
        )

    out_specs = tuple(every for rounds in perms for _ in rounds)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped)


@dataclass(frozen=True, slots=True)
class Copy:
    """One chunk of shape `shape` that process `dst` keeps a copy of: the part `sub` (None: all)
    of the shard on `device` (the first device, in `jax.devices()` order, of the first process
    holding it), at `coords` of the one-chunk-per-shard grid."""

    device: jax.Device
    dst: int
    coords: tuple[int, ...]
    sub: tuple[slice, ...] | None
    shape: tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def shard_copies(
    shape: tuple[int, ...], sharding: jax.sharding.Sharding, replicas: int
) -> tuple[Copy, ...]:
    """The copies that give every shard of an array of `shape` and `sharding` `replicas` holding
    processes: each shard that fewer processes hold goes from its first holder to the next
    processes in ring order. Deterministic (every process plans alike); cached, as a training
    loop saves the same shardings again and again."""
    if 0 in shape:
        return ()
    count = jax.process_count()
    devices = jax.devices()
    index_map = sharding.devices_indices_map(shape)
    regions: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in index_map.items():
        regions.setdefault(_format.index_region(index, shape), []).append(device)
    chunk = _format.chunk_shape(shape, index_map.values())  # the grid the snapshot writes
    copies = []
    for region in sorted(regions):
        holders = sorted({d.process_index for d in regions[region]})
        ring = ((holders[0] + i) % count for i in range(1, count))
        targets = [p for p in ring if p not in holders][: max(0, replicas - len(holders))]
        if not targets:
            continue
        source = min(
            (d for d in regions[region] if d.process_index == holders[0]), key=devices.index
        )
        whole = tuple(b - a for a, b in region) == chunk
        # one copy per chunk of the shard (one, when shards are even)
        ranges = [range(a // c, b // c) for (a, b), c in zip(region, chunk, strict=True)]
        for coords in itertools.product(*ranges):
            sub = tuple(
                slice(i * c - a, (i + 1) * c - a)
                for i, c, (a, _) in zip(coords, chunk, region, strict=True)
            )
            copies += [Copy(source, p, coords, None if whole else sub, chunk) for p in targets]
    return tuple(copies)


def replicate_shards(data: jax.Array, replicas: int) -> list[tuple[tuple[int, ...], jax.Array]]:
    """Send each shard of the global array `data` that fewer than `replicas` processes hold to
    the next processes in ring order after its first holder, device to device (one `ppermute`
    over all devices per round, each waited for). Returns what this process received: (chunk
    coordinates in the one-chunk-per-shard grid, a single-device array of shape
    (1, *shard shape))."""
    copies = shard_copies(tuple(data.shape), data.sharding, replicas)
    if not copies:
        return []
    devices = tuple(jax.devices())
    me = jax.process_index()
    chunk = copies[0].shape
    moves = [Move(c.device.process_index, c.dst, _format.chunk_id(c.coords)) for c in copies]
    where = {_format.chunk_id(c.coords): c for c in copies}
    local = {s.device: s.data for s in data.addressable_shards}
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, P("d", *([None] * len(chunk))))
    mine = [i for i, d in enumerate(devices) if d.process_index == me]
    out: list[tuple[tuple[int, ...], jax.Array]] = []
    one = BUNDLE_BYTES  # every move its own bundle: a round of single chunks
    for this in _bundle_rounds(moves, lambda _: one, devices):
        rows = {}
        for src, _, (m,) in this:
            if m.src == me:
                c = where[m.key]
                piece = local[c.device]
                if c.sub is not None:  # a shard of several chunks: this one
                    piece = piece[c.sub]
                rows[src] = jax.device_put(piece.reshape(1, *chunk), devices[src])
        buffers = [
            rows[i] if i in rows else jax.device_put(np.zeros((1, *chunk), data.dtype), devices[i])
            for i in mine
        ]
        x = jax.make_array_from_single_device_arrays((len(devices), *chunk), sharding, buffers)
        y = _permute(devices, tuple((src, dst) for src, dst, _ in this), len(chunk))(x)
        # Wait for each round: with several collectives in flight XLA:CPU can start them in
        # different orders on different devices, and gloo then waits for ever (seen here, a
        # training loop behind it). One at a time is safe on every backend.
        jax.block_until_ready(y)
        received = {s.device: s.data for s in y.addressable_shards}
        for _, dst, (m,) in this:
            if m.dst == me:
                out.append((_format.chunk_id_coords(m.key), received[devices[dst]]))
    return out
