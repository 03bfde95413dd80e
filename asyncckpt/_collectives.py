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


def _rounds(
    moves: list[Move], devices: tuple[jax.Device, ...]
) -> list[list[tuple[Move, int, int]]]:
    """Group the moves into rounds of one collective permutation each: (move, source device
    index, destination device index), every device sending and receiving at most once a
    round. Deterministic, so every process computes the same rounds."""
    by_process: dict[int, list[int]] = {}
    for i, d in enumerate(devices):
        by_process.setdefault(d.process_index, []).append(i)
    pending = list(moves)
    rounds = []
    while pending:
        sending: set[int] = set()
        receiving: set[int] = set()
        this, later = [], []
        for move in pending:
            src = next((i for i in by_process[move.src] if i not in sending), None)
            dst = next((i for i in by_process[move.dst] if i not in receiving), None)
            if src is None or dst is None:
                later.append(move)
                continue
            sending.add(src)
            receiving.add(dst)
            this.append((move, src, dst))
        rounds.append(this)
        pending = later
    return rounds


def move(
    moves: list[Move],
    nbytes: int,
    read: Callable[[str], np.ndarray],
    write: Callable[[str, np.ndarray], None],
) -> None:
    """Carry out `moves` of buffers of `nbytes` bytes: this process `read(key)`s (uint8, at
    least `nbytes`) what it sends and `write(key, data)`s what it receives."""
    devices = tuple(jax.devices())
    me = jax.process_index()
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    row = _row_bytes(nbytes)
    mine = [i for i, d in enumerate(devices) if d.process_index == me]
    for this in _rounds(moves, devices):
        rows = {i: np.zeros((1, row), np.uint8) for i in mine}
        for m, src, _ in this:
            if m.src == me:
                rows[src][0, :nbytes] = read(m.key)[:nbytes]
        x = jax.make_array_from_single_device_arrays(
            (len(devices), row),
            sharding,
            [jax.device_put(rows[i], devices[i]) for i in mine],
        )
        y = _permute(devices, tuple((src, dst) for _, src, dst in this), 1)(x)
        received = {devices.index(s.device): s.data for s in y.addressable_shards}
        for m, _, dst in this:
            if m.dst == me:
                write(m.key, np.asarray(received[dst])[0])


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


def replicate_shards(data: jax.Array, replicas: int) -> list[tuple[tuple[int, ...], jax.Array]]:
    """Send each shard of the global array `data` that fewer than `replicas` processes hold to
    the next processes in ring order after its first holder, device to device (one `ppermute`
    over all devices per round, each waited for). Returns what this process received: (chunk
    coordinates in the one-chunk-per-shard grid, a single-device array of shape
    (1, *shard shape))."""
    devices = tuple(jax.devices())
    count = jax.process_count()
    me = jax.process_index()
    shape = tuple(data.shape)
    index_map = data.sharding.devices_indices_map(shape)
    regions: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in index_map.items():
        regions.setdefault(_format.index_region(index, shape), []).append(device)
    if data.size == 0:
        return []
    chunk = _format.chunk_shape(shape, index_map.values())  # the grid the snapshot writes
    moves: list[Move] = []
    where: dict[str, tuple[tuple[slice, ...], jax.Device]] = {}
    for region in sorted(regions):
        holders = sorted({d.process_index for d in regions[region]})
        targets = [
            p for p in ((holders[0] + i) % count for i in range(1, count)) if p not in holders
        ]
        targets = targets[: max(0, replicas - len(holders))]
        if not targets:
            continue
        source = next(
            d for d in sorted(regions[region], key=devices.index) if d.process_index == holders[0]
        )
        # one move per chunk of the shard (one, when shards are even)
        ranges = [range(a // c, b // c) for (a, b), c in zip(region, chunk, strict=True)]
        for coords in itertools.product(*ranges):
            key = _format.chunk_id(coords)
            sub = tuple(
                slice(i * c - a, (i + 1) * c - a)
                for i, c, (a, _) in zip(coords, chunk, region, strict=True)
            )
            where[key] = (sub, source)
            moves += [Move(holders[0], p, key) for p in targets]
    if not moves:
        return []
    local = {s.device: s.data for s in data.addressable_shards}
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, P("d", *([None] * len(shape))))
    mine = [i for i, d in enumerate(devices) if d.process_index == me]
    out: list[tuple[tuple[int, ...], jax.Array]] = []
    for this in _rounds(moves, devices):
        rows = {}
        for m, src, _ in this:
            if m.src == me:
                sub, source = where[m.key]
                piece = local[source]
                if tuple(piece.shape) != chunk:  # a shard of several chunks: this one
                    piece = piece[sub]
                rows[src] = jax.device_put(piece.reshape(1, *chunk), devices[src])
        buffers = [
            rows[i] if i in rows else jax.device_put(np.zeros((1, *chunk), data.dtype), devices[i])
            for i in mine
        ]
        x = jax.make_array_from_single_device_arrays((len(devices), *chunk), sharding, buffers)
        y = _permute(devices, tuple((src, dst) for _, src, dst in this), len(shape))(x)
        # Wait for each round: with several collectives in flight XLA:CPU can start them in
        # different orders on different devices, and gloo then waits for ever (seen here, a
        # training loop behind it). One at a time is safe on every backend.
        jax.block_until_ready(y)
        received = {s.device: s.data for s in y.addressable_shards}
        for m, _, dst in this:
            if m.dst == me:
                out.append((_format.chunk_id_coords(m.key), received[devices[dst]]))
    return out
