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
(`replicate`). A process that lost its part (a replaced host) gets it rebuilt from the parts that
survive, if they hold every chunk of it, through JAX collectives (`repair`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import jax
import numpy as np

from . import _collectives, _directory, _distributed, _format, _restore, _snapshot, _tree
from ._format import RootInfo
from ._storage import Storage, WriterLock, open_storage
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
        the parts that survive hold every chunk (the missing parts are rebuilt from them by
        `repair`). One exchange through the key-value store, and one more when parts are
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

    def missing_parts(self, step: int) -> list[int]:
        """The processes that lack their part of the usable local `step`."""
        _, count = _process()
        with self._mutex:
            held_by = self._holders.get(step, list(range(count)))
        return sorted(set(range(count)) - set(held_by))

    def repair(self, step: int) -> None:
        """Rebuild the parts of `step` that processes lack (a replaced host) from the parts
        that survive, through JAX collectives; a collective call, every process alike. Each
        chunk a missing part held comes from the first surviving process that holds it, device
        to device; the rebuilt part is committed like a saved one. Raises (in every process)
        if any process fails."""
        process, count = _process()
        with self._mutex:
            held_by = list(self._holders[step])
        missing = sorted(set(range(count)) - set(held_by))
        if not missing:
            return
        coord = _distributed.Coordinator(f"local repair {step}", self._timeout_s)
        t0 = time.perf_counter()
        moved = 0
        source = held_by[0]
        raw = b""
        error: Exception | None = None
        if process == source:
            try:
                raw = self.path(step).read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES)
            except OSError as e:
                error = e
        error = coord.agree("doc", error, f"reading local step {step} of process {source}")
        if error is not None:
            raise error
        raw = _collectives.broadcast_bytes(raw, is_source=process == source)
        info = _format.parse_root_doc(raw, f"local step {step} of process {source}")
        part = info.local_part
        assert part is not None
        dest = self.path(step)
        staged = None
        try:
            if process in missing:
                staged = dest.begin(replace=False)
                names = sorted(info.arrays)
                for group in _format.group_names(names):
                    staged.make_dirs([group])
                    staged.write(f"{group}/{_format.DOC}", _format.GROUP_DOC)
                for name in names:
                    staged.make_dirs([name])
                    staged.write(f"{name}/{_format.DOC}", _format.array_doc(info.arrays[name]))
        except Exception as e:
            error = e
        # every process takes part in every transfer, whatever failed here: the others wait
        # in the collectives for it; failures are told at the agreement below
        for name, spec in sorted(info.arrays.items()):
            moves = []
            for p in missing:
                for key in part.held[p].get(name, []):
                    src = next((q for q in held_by if key in part.held[q].get(name, [])), None)
                    assert src is not None  # `_uncovered` said every chunk is held
                    moves.append(_collectives.Move(src, p, key))
            if moves:
                failed = self._move_chunks(spec, moves, dest, staged if error is None else None)
                error = error or failed
                moved += spec.chunk_nbytes * sum(m.dst == process for m in moves)
        t_moved = time.perf_counter()
        if staged is not None and error is None:
            try:
                staged.write(_format.DOC, _format.with_local_process(raw, process))
                staged.sync()
            except Exception as e:
                error = e
        error = coord.agree("repaired", error, f"rebuilding local step {step} from its peers")
        try:
            if error is not None:
                raise error
            if staged is not None:
                dest.commit(staged, replace=False)
                staged = None
                log.info(
                    "asyncckpt: rebuilt local step %d of %s from peers: %.1f MiB received in "
                    "%.2f s, made durable in %.2f s",
                    step,
                    dest.url,
                    moved / (1 << 20),
                    t_moved - t0,
                    time.perf_counter() - t_moved,
                )
        finally:
            if staged is not None:
                dest.discard(staged)
        coord.barrier("committed", f"rebuilding local step {step} from its peers")
        with self._mutex:
            self._holders[step] = list(range(count))

    def _move_chunks(
        self,
        spec: _format.ArraySpec,
        moves: list[_collectives.Move],
        source: Storage,
        staged: Storage | None,
    ) -> Exception | None:
        """Send the chunks of `moves` from their processes' parts to the processes that lack
        them, which write them into `staged` (None: they are dropped, this process failed
        already). Never raises for a chunk that cannot be read or written: the transfers go on
        (the other processes wait for them) and the first such failure is returned."""
        where = f"while rebuilding {spec.name!r} of local step {source.name}"
        failures: list[Exception] = []

        def read(key: str) -> np.ndarray:
            buf = _restore.aligned_empty(spec.chunk_shape, spec.dtype)
            if not failures:
                try:
                    source.read_chunk_into(spec.chunk_key(_format.chunk_id_coords(key)), buf, where)
                except Exception as e:  # damaged or unreadable: send something, fail later
                    failures.append(e)
            return buf.reshape(-1).view(np.uint8)

        def write(key: str, data: np.ndarray) -> None:
            if staged is None or failures:
                return
            chunk = data[: spec.chunk_nbytes].view(spec.dtype).reshape(spec.chunk_shape)
            band = _format.band_nbytes(spec) if spec.band_rows is not None else None
            try:
                staged.write_chunk(spec.chunk_key(_format.chunk_id_coords(key)), chunk, band)
            except Exception as e:
                failures.append(e)

        _collectives.move(moves, spec.chunk_nbytes, read, write)
        return failures[0] if failures else None

    # -- saving --------------------------------------------------------------------------------

    def replicate(self, tree: Any) -> dict[str, list[tuple[tuple[int, ...], jax.Array]]]:
        """Give every chunk of `tree` at least `replicas` holders among the processes (all of
        them, if fewer): a shard that fewer processes hold (fully sharded state) is sent from
        its first holder to the next processes in ring order, device to device, through JAX
        collectives. Returns the shards this process received, by variable name: (chunk
        coordinates, a single-device array of shape (1, *chunk)), for its local part; they are
        asyncckpt's own buffers, so the writer copies them to the host later, off the caller's
        thread.

        A collective call, made inside every process's `save()` on the caller's thread before
        the snapshot, in the same order relative to the training steps in every process; each
        transfer is finished before the next starts and before `save()` returns, so no
        collective of the training step can be in flight beside one of these. Where every
        shard has enough holders (data parallelism, one process) nothing is sent."""
        _, count = _process()
        want = min(self.replicas, count)
        if want <= 1:
            return {}
        received: dict[str, list[tuple[tuple[int, ...], jax.Array]]] = {}
        for keypath, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not isinstance(value, jax.Array) or value.sharding.is_fully_addressable:
                continue  # every process holds it whole (and writes it to its part)
            data = _snapshot.data_of(value)
            got = _collectives.replicate_shards(data, want)
            if got:
                received[_tree.variable_name(keypath)] = got
        return received

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

    def missing(self, info: RootInfo, target: Any) -> str | None:
        """None if this process's part holds every chunk that this process's devices need to
        restore `target`; else what the first missing chunk is."""
        part = info.local_part
        assert part is not None
        held = part.held[part.process]
        if target is None:
            wanted = [(name, None) for name in info.arrays]
        else:
            leaves = jax.tree_util.tree_flatten_with_path(target)[0]
            wanted = [(_tree.variable_name(kp), v) for kp, v in leaves]
        for name, leaf in wanted:
            spec = info.arrays.get(name)
            if spec is None or spec.nbytes == 0:
                continue
            have = set(held.get(name, []))
            for coords in _needed(spec, leaf):
                if _format.chunk_id(coords) not in have:
                    return f"chunk {coords} of {name!r}"
        return None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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
