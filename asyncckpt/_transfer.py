"""Copies of shards to peer processes through JAX's transfer server (`jax.experimental.transfer`,
jaxlib's point-to-point transport between the processes of a job): no program, no collective.

Used for the node-local tier's copies when the devices are CPUs. There a program of collectives
in flight beside the training steps deadlocked XLA:CPU (gloo), so `_collectives.replicate` has to
finish it inside `save()` (~0.45 s for 256 MiB a process). Here `save()` only takes a zero-copy
view of each shard to send (which a later donation cannot reuse: XLA:CPU copies a donated buffer
that has a view); the sender's writer thread offers them (`await_pull`), and the receiving
process pulls them on its writer thread, beside the training steps, waiting at most `timeout_s`
(a peer that never sends fails the local save there, it does not hang it). On accelerators the
collectives stay (device to device, dispatched without waiting, run in dispatch order).

`ASYNCCKPT_PEER_COPIES=collectives` in the environment keeps the collectives on CPU too (the
tests use it to run that path, which accelerators take, on this machine).
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _collectives
from .errors import CheckpointError

ENV = "ASYNCCKPT_PEER_COPIES"


def usable(arrays: list[jax.Array]) -> bool:
    """Whether the copies of `arrays` go through the transfer server: CPU devices, a jaxlib that
    has it, and not turned off by `ASYNCCKPT_PEER_COPIES=collectives`."""
    if os.environ.get(ENV, "") == "collectives" or not _has_transfer():
        return False
    return all(d.platform == "cpu" for a in arrays for d in a.devices())


@functools.cache
def _has_transfer() -> bool:
    try:
        from jax.experimental import transfer
    except ImportError:
        return False
    return hasattr(transfer, "start_transfer_server")


def replicate(
    arrays: list[jax.Array], replicas: int, timeout_s: float, adopt: Callable[[set[int]], None]
) -> tuple[list[_collectives.Received], Callable[[], None] | None]:
    """`_collectives.replicate` through the transfer server. Returns, per array, what this
    process receives ((chunk coordinates, an array-like of shape (1, *chunk) that `np.asarray`
    pulls, waiting at most `timeout_s`)), and `offer`, which offers this process's shards that
    others keep a copy of (None: nothing to send). The views `offer` sends are taken here, so
    that the caller may donate the arrays once this returns; `offer` itself runs later, on the
    writer's thread (~2.5 ms for 64 shards, kept out of `save()`). `adopt` is given the
    server's threads, to run them at the background writers' priority (`Workers.adopt`): the
    copies are background work, and at the caller's priority they slowed a training loop 1.26x
    against 1.0x without copies (benchmarks/multitier.py). A collective call: every process
    makes it, in the same order."""
    me = jax.process_index()
    count = jax.process_count()
    plans = [_collectives.shard_copies(tuple(a.shape), a.sharding, replicas) for a in arrays]
    if not any(plans):
        return [[] for _ in arrays], None
    peers = _peers()
    call = peers.next_call()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    offered: list[tuple[int, np.ndarray, jax.Device]] = []  # (to process, piece, its device)
    incoming: dict[int, list[tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]]] = {}
    for i, (data, plan) in enumerate(zip(arrays, plans, strict=True)):
        local = None
        for c in plan:
            if c.device.process_index == me:
                if local is None:
                    local = {s.device: s.data for s in data.addressable_shards}
                view = np.asarray(local[c.device])  # CPU: the buffer itself
                offered.append((c.dst, view if c.sub is None else view[c.sub], c.device))
            elif c.dst == me:
                incoming.setdefault(c.device.process_index, []).append(
                    (i, c.coords, c.shape, data.dtype)
                )
    out: list[_collectives.Received] = [[] for _ in arrays]
    for src, wanted in sorted(incoming.items()):
        uuid = _uuid(call, src, me, count)
        batch = _Batch(peers, src, uuid, [(s, t) for _, _, s, t in wanted], timeout_s, adopt)
        for k, (i, coords, _, _) in enumerate(wanted):
            out[i].append((coords, _Pulled(batch, k)))

    def offer() -> None:
        # arrays over the views, in one call (~35 us a piece; one call each, 90 us): a view of
        # an XLA buffer is aligned, so they share its memory, and each keeps its view, hence
        # the buffer, alive until pulled; a donation of the saved array then copies it instead
        outgoing: dict[int, list[jax.Array]] = {}
        placed = jax.device_put([piece for _, piece, _ in offered], [d for _, _, d in offered])
        for (dst, _, _), array in zip(offered, placed, strict=True):
            outgoing.setdefault(dst, []).append(array)
        for dst, sent in outgoing.items():
            peers.server(adopt).await_pull(_uuid(call, me, dst, count), sent, timeout=deadline)

    return out, offer if offered else None


def _uuid(call: int, src: int, dst: int, count: int) -> int:
    """The id of what `src` sends `dst` in the `call`-th replication (the same in every
    process)."""
    return (call * count + src) * count + dst


class _Peers:
    """This process's transfer server (started on first use, its address published in the
    coordination service's key-value store) and its connections to the other processes'."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: Any = None
        self._connections: dict[int, Any] = {}
        self._calls = 0
        self.threads: set[int] = set()
        """The server's threads (native ids; Linux): those that appeared while it started."""

    def next_call(self) -> int:
        with self._lock:
            self._calls += 1
            return self._calls

    def server(self, adopt: Callable[[set[int]], None]) -> Any:
        """The server, started on first use (~0.1 s: on a writer's thread, not in `save()`);
        `adopt` is given its threads."""
        with self._lock:
            self._start()
        adopt(self.threads)
        return self._server

    def _start(self) -> None:
        if self._server is None:
            from jax.experimental import transfer

            from . import _distributed

            host = _own_address()
            client = _cpu_device().client
            before = _native_threads()
            self._server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
            self.threads = _native_threads() - before
            _distributed.client().key_value_set(
                f"asyncckpt/transfer/{jax.process_index()}", self._server.address()
            )

    def connection(self, process: int, timeout_s: float, adopt: Callable[[set[int]], None]) -> Any:
        server = self.server(adopt)
        with self._lock:
            if process not in self._connections:
                from . import _distributed

                address = _distributed.client().blocking_key_value_get(
                    f"asyncckpt/transfer/{process}", max(1, int(timeout_s * 1000))
                )
                self._connections[process] = server.connect(address)
            return self._connections[process]


def _cpu_device() -> jax.Device:
    """A CPU device of this process: where the server's client lives and copies arrive."""
    return next(d for d in jax.local_devices() if d.platform == "cpu")


def _native_threads() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: the server's threads keep their priority
        return set()


@functools.cache
def _peers() -> _Peers:
    return _Peers()


def _own_address() -> str:
    """This host's address on the route to the job's coordinator (no packet is sent): where the
    other processes reach its transfer server."""
    from jax._src import distributed  # the coordinator's address has no public handle

    host = (distributed.global_state.coordinator_address or "127.0.0.1:0").rsplit(":", 1)[0]
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), 1, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(address)
        ip = s.getsockname()[0]
    return f"[{ip}]" if ":" in ip else ip


class _Batch:
    """What one peer sends this process in one replication: pulled by the first reader, once."""

    def __init__(
        self,
        peers: _Peers,
        src: int,
        uuid: int,
        specs: list[tuple[tuple[int, ...], np.dtype]],
        timeout_s: float,
        adopt: Callable[[set[int]], None],
    ) -> None:
        self._peers = peers
        self._src = src
        self._uuid = uuid
        self._specs = specs
        self._timeout_s = timeout_s
        self._adopt = adopt
        self._lock = threading.Lock()
        self._arrays: list[np.ndarray] | None = None

    def get(self, k: int) -> np.ndarray:
        with self._lock:
            if self._arrays is None:
                self._arrays = self._pull()
            return self._arrays[k]

    def _pull(self) -> list[np.ndarray]:
        start = time.monotonic()
        try:
            connection = self._peers.connection(self._src, self._timeout_s, self._adopt)
        except jax.errors.JaxRuntimeError as e:  # its server's address never came
            raise self._silent(f"{type(e).__name__}: {str(e)[:300]}") from e
        on = jax.sharding.SingleDeviceSharding(_cpu_device())
        specs = [jax.ShapeDtypeStruct(s, t, sharding=on) for s, t in self._specs]
        pulled = connection.pull(self._uuid, specs)
        for a in pulled:  # a peer that never sends would make np.asarray wait for ever
            while not a.is_ready():
                if time.monotonic() - start > self._timeout_s:
                    raise self._silent(f"transfer {self._uuid} not ready")
                time.sleep(0.002)
        return [np.asarray(a) for a in pulled]

    def _silent(self, detail: str) -> CheckpointError:
        return CheckpointError(
            f"process {self._src} did not send process {jax.process_index()} the copies of its "
            f"shards for the local tier within {self._timeout_s:g} s (3/4 of "
            "barrier_timeout_s): it died, hangs, or gets no CPU time (then raise "
            "barrier_timeout_s). This local step is not committed; the ones before it and the "
            f"persistent tier are unaffected. ({detail})"
        )


class _Pulled:
    """The `k`-th array of a `_Batch`, as (1, *shape) when read."""

    __slots__ = ("batch", "k")

    def __init__(self, batch: _Batch, k: int) -> None:
        self.batch = batch
        self.k = k

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.batch.get(self.k)
        return data[None] if dtype is None else data[None].astype(dtype)
