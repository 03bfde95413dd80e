"""Read once per job (docs/DISTRIBUTED.md): under `jax.distributed`, a chunk that the devices
of several processes need is read from storage by one of them and sent to the others through
JAX collectives (`_collectives.move`), so that a restore reads each byte of a checkpoint once
however many replicas the target sharding has.

Chunks that one process alone needs, and banded chunks of which the processes need disjoint
bands, are read by their processes as before. Every process computes the same plan from the
target shardings (no exchange): each shared chunk is read by the process that needs it with
the fewest bytes to read so far. Only arrays whose target sharding has devices in every
process take part, so that every process is in the transfers.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import numpy as np

from . import _collectives, _format
from ._executor import Workers
from ._format import ArraySpec
from ._storage import Storage
from ._storage.overlay import Overlay

Region = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=1024)
def regions_by_process(
    sharding: jax.sharding.Sharding, shape: tuple[int, ...]
) -> dict[int, frozenset[Region]]:
    """The distinct regions of an array of `shape` that each process's devices hold."""
    out: dict[int, set[Region]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        process = _process_of(device)
        out.setdefault(process, set()).add(_format.index_region(index, shape))
    return {p: frozenset(r) for p, r in out.items()}


def spans_every_process(sharding: jax.sharding.Sharding | None) -> bool:
    """Whether `sharding` has devices in every process of the job (all of them restore it)."""
    if sharding is None or sharding.is_fully_addressable:
        return False
    return len({_process_of(d) for d in sharding.device_set}) == jax.process_count()


def _process_of(device: jax.Device) -> int:
    return device.process_index


@dataclass(frozen=True, slots=True)
class Shared:
    """An array restored onto a sharding that spans every process. `whole`: each process
    reads all of it whatever its devices hold (PRNG key data)."""

    spec: ArraySpec
    sharding: jax.sharding.Sharding
    whole: bool

    def bands(self) -> dict[tuple[int, ...], dict[int, set[int]]]:
        """For each chunk some device needs: the bands of it each process needs (band 0 for
        a chunk without bands)."""
        spec, shape = self.spec, tuple(self.spec.shape)
        full = tuple((0, n) for n in shape)
        if self.whole:
            by_process = {_process_of(d): frozenset([full]) for d in self.sharding.device_set}
        else:
            by_process = regions_by_process(self.sharding, shape)
        out: dict[tuple[int, ...], dict[int, set[int]]] = {}
        for process, regions in by_process.items():
            for region in regions:
                ranges = [
                    range(a // c, -(-b // c)) if b > a else range(0)
                    for (a, b), c in zip(region, spec.chunk_shape, strict=True)
                ]
                for coords in itertools.product(*ranges):
                    bands = out.setdefault(coords, {}).setdefault(process, set())
                    if spec.band_rows is None:
                        bands.add(0)
                        continue
                    top = coords[0] * spec.chunk_shape[0]
                    lo = max(region[0][0], top) - top
                    hi = min(region[0][1], top + spec.chunk_shape[0]) - top
                    bands.update(range(lo // spec.band_rows, -(-hi // spec.band_rows)))
        return out


def plan(items: list[Shared]) -> tuple[dict[str, int], list[_collectives.Move]]:
    """Who reads each shared chunk (keys `chunk id@name`) and the transfers to the other
    processes that need it. Deterministic: every process computes the same."""
    load: Counter[int] = Counter()
    readers: dict[str, int] = {}
    moves: list[_collectives.Move] = []
    for item in items:
        spec = item.spec
        if spec.nbytes == 0:
            continue
        for coords, bands in sorted(item.bands().items()):
            if len(bands) < 2:
                continue
            if spec.band_rows is not None:
                counts = Counter(b for wanted in bands.values() for b in wanted)
                if max(counts.values()) < 2:
                    continue  # disjoint bands: each process reads its own
            needers = sorted(bands)
            reader = min(needers, key=lambda p: (load[p], p))
            load[reader] += spec.chunk_nbytes
            key = f"{_format.chunk_id(coords)}@{spec.name}"
            readers[key] = reader
            moves.extend(_collectives.Move(reader, p, key) for p in needers if p != reader)
    return readers, moves


ReadChunk = Callable[[Storage, ArraySpec, str, str], np.ndarray]
"""`read(storage, spec, chunk key, where)`: the chunk's data as uint8, checksums verified
(`_restore.read_whole_chunk`)."""


def exchange(
    source: Storage,
    specs: Mapping[str, ArraySpec],
    moves: list[_collectives.Move],
    read: ReadChunk,
    workers: Workers,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Exception | None]:
    """Carry out `moves` (keys `chunk id@variable name`, variables of `specs`): this process
    first reads from `source`, on `workers`, the chunks it sends, then every process takes part
    in the collective transfers. Returns the chunks this process read and those it received,
    both by chunk key, and the first read failure: a chunk that cannot be read is sent as zeros
    (the other processes wait in the transfers regardless), and the caller makes every process
    raise."""
    me = jax.process_index()

    def locate(key: str) -> tuple[ArraySpec, str]:
        chunk_id, _, name = key.partition("@")
        spec = specs[name]
        return spec, spec.chunk_key(_format.chunk_id_coords(chunk_id))

    read_here: dict[str, np.ndarray] = {}
    failures: list[Exception] = []

    def read_one(key: str) -> None:
        spec, file = locate(key)
        where = f"while reading {spec.name!r} from {source.url} for another process"
        try:
            read_here[key] = read(source, spec, file, where)
        except Exception as e:  # noqa: BLE001 - every process must still join the transfers
            failures.append(e)

    mine = sorted({m.key for m in moves if m.src == me})
    workers.run_reads(
        [(locate(k)[0].chunk_nbytes, functools.partial(read_one, k)) for k in mine],
        network=source.network,
    )
    received: dict[str, np.ndarray] = {}

    def size(key: str) -> int:
        return locate(key)[0].chunk_nbytes

    def send(key: str) -> np.ndarray:
        data = read_here.get(key)
        return data if data is not None else np.zeros(size(key), np.uint8)

    def receive(key: str, data: np.ndarray) -> None:
        received[locate(key)[1]] = data

    _collectives.move(moves, size, send, receive)
    own = {locate(k)[1]: data for k, data in read_here.items()}
    return own, received, failures[0] if failures else None


def share(
    ckpt: Storage, items: list[Shared], read: ReadChunk, workers: Workers
) -> tuple[Storage, int, Exception | None]:
    """Read the shared chunks of `items` this process is the reader of, send them to the other
    processes that need them, and receive those the others read (`exchange`). A collective
    call, every process alike. Returns the checkpoint as this process's restore reads it
    (those chunks from memory), the bytes this process read, and the first read failure."""
    readers, moves = plan(items)
    if not readers:
        return ckpt, 0, None
    specs = {item.spec.name: item.spec for item in items}
    own, received, failure = exchange(ckpt, specs, moves, read, workers)
    nbytes = sum(d.nbytes for d in own.values())
    return Overlay(ckpt, ckpt.url, {**own, **received}), nbytes, failure
