"""The node-local tier of a `CheckpointManager` (docs/MULTITIER.md): frequent steps on each
host's own storage, one part per process, every replica that process holds.

A local step is a directory per process, `<local_directory>/<step>`, on storage that only that
host sees. Each part is an ordinary Zarr v3 group of the whole tree's documents holding only the
chunks of that process's shards (`_save.write_local_part`); its root document's `local_part`
names which process holds which chunks, written once every part was durable. A step can be
restored when every process of this job holds its committed part, or when the parts that
survive hold every chunk of the missing ones; which steps those are is agreed among the
processes when the manager opens and kept current as saves commit and retention deletes (so
asking is no collective call).

At save time, a chunk that fewer than `local_replicas` processes hold (fully sharded state) is
sent to the next processes in ring order through JAX collectives and kept in their parts
(`replicate`). At restore time, the chunks a process's devices need that its part lacks (all of
them on a replaced host, some on another mesh) come from the parts that hold them, through JAX
collectives, and are restored from memory (`fetch`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import jax

from . import (
    _collectives,
    _directory,
    _distributed,
    _format,
    _readonce,
    _restore,
    _snapshot,
    _transfer,
    _tree,
)
from ._executor import Workers
from ._format import RootInfo
from ._storage import Storage, WriterLock, open_storage
from ._storage.overlay import Overlay
from .errors import CheckpointError

log = logging.getLogger("asyncckpt")


def _process() -> tuple[int, int]:
    if _distributed.is_multi_process():
        return jax.process_index(), jax.process_count()
    return 0, 1


class LocalTier:
    """This process's local directory and the local steps the whole job can restore."""

    def __init__(
        self,
        directory: Any,
        *,
        max_to_keep: int,
        interval: int,
        replicas: int,
        barrier_timeout_s: float,
    ) -> None:
        self.dir: Storage = open_storage(directory)
        if self.dir.network:
            raise ValueError(
                f"local_directory must be storage of this host (a path, e.g. on NVMe or a RAM "
                f"disk), not {self.dir.url}; the persistent tier is the manager's directory"
            )
        self.max_to_keep = max_to_keep
        self.interval = interval
        self.replicas = replicas
        self._timeout_s = barrier_timeout_s
        self._mutex = threading.Lock()
        self._lock: WriterLock | None = _directory.lock(self.dir)
        try:
            for place in _directory.leftovers(self.dir):
                log.info("asyncckpt: removing %s, left by an interrupted local save", place.url)
                _directory.remove(place, None)
            self._holders: dict[int, list[int]] = {}  # step -> processes with a usable part
            self._steps = self._agree(self._own_parts())
        except BaseException:
            self.close()
            raise

    # -- what exists ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """The local steps every process of this job holds its committed part of, ascending."""
        with self._mutex:
            return list(self._steps)

    def path(self, step: int) -> Storage:
        return _directory.step_storage(self.dir, step)

    def _own_parts(self) -> list[int]:
        """The committed parts in this host's directory that this process wrote in a job of
        this many processes."""
        process, count = _process()
        steps = []
        for step in _directory.committed_steps(self.dir):
            try:
                part = _restore.read_root(self.path(step)).local_part
            except (CheckpointError, OSError) as e:
                log.warning("asyncckpt: local step %d unreadable, not used: %s", step, e)
                continue
            if part is None or part.processes != count or part.process != process:
                log.info(
                    "asyncckpt: local step %d in %s was written by another process or job "
                    "size; not used",
                    step,
                    self.dir.url,
                )
                continue
            steps.append(step)
        return steps

    def _agree(self, mine: list[int]) -> list[int]:
        """The steps the job can restore from the local tier: every process holds its part, or
        the parts that survive hold every chunk (what the missing parts held is sent from them
        by `fetch`). One exchange through the key-value store, and one more when parts are
        missing."""
        if not _distributed.is_multi_process():
            self._holders = {s: [0] for s in mine}
            return sorted(mine)
        coord = _distributed.Coordinator("local tier steps", self._timeout_s)
        coord.put(f"parts/{coord.process}", mine)
        coord.barrier("parts", "listing the local steps of every process")
        holders: dict[int, list[int]] = {}
        for process, steps in sorted(coord.gather("parts").items()):
            for step in steps:
                holders.setdefault(step, []).append(process)
        partial = sorted(s for s, h in holders.items() if len(h) < coord.count)
        for step in partial:  # the first holder decides whether the others' parts suffice
            if holders[step][0] == coord.process:
                coord.put(f"covered/{step}", self._uncovered(step, holders[step]))
        if partial:
            coord.barrier("covered", "checking which local steps the surviving parts hold")
        usable = []
        for step, held_by in sorted(holders.items()):
            if step in partial:
                lost = coord.get(f"covered/{step}")
                if lost is not None:
                    log.warning(
                        "asyncckpt: local step %d cannot be restored from the local tier: "
                        "processes %s lack their part, and no surviving part holds %s",
                        step,
                        sorted(set(range(coord.count)) - set(held_by)),
                        lost,
                    )
                    continue
            usable.append(step)
            self._holders[step] = held_by
        return usable

    def _uncovered(self, step: int, holders: list[int]) -> str | None:
        """None if the parts of `holders` hold every chunk of `step`; else the first one that
        no part holds (read from this process's part, which names every part's chunks)."""
        info = _restore.read_root(self.path(step))
        part = info.local_part
        assert part is not None
        for name, spec in sorted(info.arrays.items()):
            if spec.nbytes == 0:
                continue
            held = set().union(*(part.held[p].get(name, []) for p in holders))
            for coords in spec.chunk_coords():
                if _format.chunk_id(coords) not in held:
                    return f"chunk {coords} of {name!r} ({spec.chunk_key(coords)})"
        return None

    def fetch(self, step: int, target: Any, workers: Workers) -> Storage:
        """The place this process restores local `step` from onto `target`: its own part, or,
        where its part lacks chunks its devices need (a replaced host lacks them all, another
        mesh some), a view of it that also holds those chunks, received from the processes
        whose parts hold them through JAX collectives (kept in host memory, not written: the
        next local save writes a whole part again). A collective call, every process alike;
        raises in every process alike when a needed chunk is in no surviving part or a transfer
        fails (the caller then restores the persistent tier). What a process sends it reads
        on `workers`."""
        process, count = _process()
        own = self.path(step)
        with self._mutex:
            held_by = list(self._holders.get(step, range(count)))
        if count == 1:
            info = _restore.read_root(own)
            alone = _lacking(info, 0, target)
            if alone:
                name, key = next((n, k) for n, keys in sorted(alone.items()) for k in keys)
                raise CheckpointError(
                    f"process 0's local part {own.url} lacks {_chunk_text(info, name, key)}"
                )
            return own
        coord = _distributed.Coordinator(f"local fetch {step}", self._timeout_s)
        raw, info = self._root_doc(step, held_by, coord)
        error: Exception | None = None
        lacking: dict[str, list[str]] = {}
        try:
            lacking = _lacking(info, process if process in held_by else None, target)
        except Exception as e:  # noqa: BLE001 - told to every process at the agreement
            error = error or e
        coord.put(f"need/{process}", lacking)
        coord.barrier("need", f"listing the chunks of local step {step} each process lacks")
        needs = {int(p): n for p, n in coord.gather("need").items()}
        plan = _plan_fetch(info, needs, held_by)
        if isinstance(plan, str):  # every process found the same chunk nobody holds
            raise CheckpointError(f"no surviving part of local step {step} holds {plan}")
        if not plan:
            error = coord.agree("fetched", error, f"restoring local step {step}")
            if error is not None:
                raise error
            return own
        t0 = time.perf_counter()
        _, received, failed = _readonce.exchange(  # every process takes part
            own, info.arrays, plan, _restore.read_whole_chunk, workers
        )
        error = error or failed
        error = coord.agree("fetched", error, f"receiving chunks of local step {step} from peers")
        if error is not None:
            raise error
        if not received and process in held_by:
            return own
        log.info(
            "asyncckpt: received %.1f MiB of local step %d that %s lacks from peers in %.2f s",
            sum(r.nbytes for r in received.values()) / (1 << 20),
            step,
            own.url if process in held_by else "this host (its part is gone)",
            time.perf_counter() - t0,
        )
        doc = _format.with_local_process(raw, process)
        return Overlay(own if process in held_by else None, own.url, received, doc)

    def _root_doc(
        self, step: int, held_by: list[int], coord: _distributed.Coordinator
    ) -> tuple[bytes, RootInfo]:
        """The root document of `step` (bytes, parsed): this process's own, or, when some
        process lacks its part, the first holder's, sent to every process (the documents differ
        only in the process they name). Raises in every process if it cannot be read."""
        process, count = _process()
        source = held_by[0]
        everyone = len(held_by) == count
        raw, error = b"", cast(Exception | None, None)
        if everyone or process == source:
            try:
                raw = self.path(step).read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES)
                _format.parse_root_doc(raw, f"local step {step} of process {process}")
            except (CheckpointError, OSError) as e:
                error = e
        error = coord.agree("doc", error, f"reading the root documents of local step {step}")
        if error is not None:
            raise error
        if not everyone:
            raw = _collectives.broadcast_bytes(raw, is_source=process == source)
        return raw, _format.parse_root_doc(raw, f"local step {step} of process {source}")

    # -- saving --------------------------------------------------------------------------------

    def replicate(
        self, tree: Any, workers: Workers
    ) -> tuple[dict[str, _collectives.Received], Callable[[], None] | None]:
        """Give every chunk of `tree` at least `replicas` holders among the processes (all of
        them, if fewer): a shard that fewer processes hold (fully sharded state) is sent from
        its first holder to the next processes in ring order. Returns the shards this process
        receives, by variable name (`_collectives.Received`), for its local part (asyncckpt's
        own buffers, read to the host later by the writer, off the caller's thread), and what
        the writer does first (None, or offering this process's shards: `_transfer`).

        A collective call, made inside every process's `save()` on the caller's thread before
        the snapshot, in the same order relative to the training steps in every process. On
        accelerators the transfers go device to device through JAX collectives, dispatched,
        not waited for (`_collectives.replicate`): they run beside the training steps that
        follow, as a step's own collectives would. On CPU devices the shards are offered to
        JAX's transfer server and the receivers pull them on their writer threads
        (`_transfer.replicate`; its threads get `workers`' background priority). Where every
        shard has enough holders (data parallelism, one process) nothing is sent."""
        _, count = _process()
        want = min(self.replicas, count)
        if want <= 1:
            return {}, None
        names, arrays = [], []
        for keypath, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not isinstance(value, jax.Array) or value.sharding.is_fully_addressable:
                continue  # every process holds it whole (and writes it to its part)
            names.append(_tree.variable_name(keypath))
            arrays.append(_snapshot.data_of(value))
        if _transfer.usable(arrays):  # CPU devices: not waited for inside save()
            # a receiver gives up on a silent peer before the others' barrier deadline (the
            # same timeout, started a little later), so that they learn why
            got, offer = _transfer.replicate(arrays, want, 0.75 * self._timeout_s, workers.adopt)
        else:
            got, offer = _collectives.replicate(arrays, want), None
        return {name: chunks for name, chunks in zip(names, got, strict=True) if chunks}, offer

    # -- after a local save --------------------------------------------------------------------

    def committed(self, step: int) -> None:
        """Record `step` (committed by every process) and delete the parts beyond
        `max_to_keep` from this host (job thread)."""
        with self._mutex:
            self._steps = sorted(set(self._steps) | {step})[-self.max_to_keep :]
            keep = set(self._steps)
        for s in _directory.committed_steps(self.dir):
            if s in keep or s > step:
                continue
            try:
                trash = _directory.start_delete(self.dir, s)
            except FileNotFoundError:
                continue
            _directory.remove(trash, s)

    # -- restoring -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _lacking(info: RootInfo, process: int | None, target: Any) -> dict[str, list[str]]:
    """The chunk ids, by variable, that this process's devices need to restore `target` and
    the part of `process` (None: this process lost its part) does not hold."""
    part = info.local_part
    assert part is not None
    held = part.held[process] if process is not None else {}
    if target is None:
        wanted = [(name, None) for name in info.arrays]
    else:
        leaves = jax.tree_util.tree_flatten_with_path(target)[0]
        wanted = [(_tree.variable_name(kp), v) for kp, v in leaves]
    lacking = {}
    for name, leaf in wanted:
        spec = info.arrays.get(name)
        if spec is None or spec.nbytes == 0:
            continue  # the restore says what is wrong with a variable it lacks
        have = set(held.get(name, []))
        ids = sorted(_format.chunk_id(c) for c in _needed(spec, leaf))
        if ids := [i for i in ids if i not in have]:
            lacking[name] = ids
    return lacking


def _plan_fetch(
    info: RootInfo, needs: dict[int, dict[str, list[str]]], held_by: list[int]
) -> list[_collectives.Move] | str:
    """The transfers that give each process the chunks it lacks (keys `chunk id@name`): each
    from the process holding it that has the fewest bytes to send so far (deterministic).
    A string instead names the first chunk no part in `held_by` holds."""
    part = info.local_part
    assert part is not None
    sending = dict.fromkeys(held_by, 0)
    plan: list[_collectives.Move] = []
    for dst, lacking in sorted(needs.items()):
        for name, ids in sorted(lacking.items()):
            spec = info.arrays[name]
            for key in ids:
                holders = [q for q in held_by if q != dst and key in part.held[q].get(name, [])]
                if not holders:
                    return _chunk_text(info, name, key)
                src = min(holders, key=lambda q: (sending[q], q))
                sending[src] += spec.chunk_nbytes
                plan.append(_collectives.Move(src, dst, f"{key}@{name}"))
    return plan


def _chunk_text(info: RootInfo, name: str, key: str) -> str:
    coords = _format.chunk_id_coords(key)
    return f"chunk {coords} of {name!r} ({info.arrays[name].chunk_key(coords)})"


def _needed(spec: _format.ArraySpec, leaf: Any) -> set[tuple[int, ...]]:
    """The chunks of `spec` that this process's devices need for the target `leaf`."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding) or not hasattr(
        sharding, "addressable_devices_indices_map"
    ):
        return set(spec.chunk_coords())
    shape = tuple(spec.shape)
    if tuple(getattr(leaf, "shape", shape)) != shape:
        return set(spec.chunk_coords())  # reshaped (e.g. PRNG key data): read it all
    needed: set[tuple[int, ...]] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        if index is None:
            return set(spec.chunk_coords())
        region = _format.index_region(index, shape)
        ranges = [
            range(a // c, -(-b // c)) if b > a else range(0)
            for (a, b), c in zip(region, spec.chunk_shape, strict=True)
        ]
        needed.update(itertools.product(*ranges))
    return needed
