"""Writing a snapshot as a Zarr v3 checkpoint and committing it (runs on the job thread).

Everything is written where the destination's storage says (`Storage.begin`: a temporary sibling
directory, or the destination prefix marked uncommitted), the root `zarr.json` last; then the
storage makes it durable and visible in one step (`Storage.commit`). A failure in any phase
discards what was written; nothing partial is ever committed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import xxhash

from . import _format, _tree
from ._distributed import Coordinator
from ._executor import Workers, batches, weighed_batches
from ._format import ArraySpec
from ._snapshot import HostArray, Snapshot
from ._storage import Storage, open_storage
from ._telemetry import Phases
from .errors import CheckpointError, CheckpointWriteError

log = logging.getLogger("asyncckpt")


def begin_write(
    dest: Storage, replace: bool, spare: Storage | None = None, specs: list[ArraySpec] | None = None
) -> tuple[Storage, bool]:
    """Where the save writes (`Storage.begin`, which refuses what it must not replace); with
    `spare` (a step taken out of the listing), over its files where the storage can
    (`_begin_in`), the files of the arrays `specs` do not name removed first. And whether the
    directories and documents of `specs` are there already, as this save would write them:
    `spare` held the same arrays, written in this format (the usual case: the same tree saved
    again, the step that retention deleted written over), so only chunks need writing."""
    try:
        if spare is not None:
            begun = _begin_in(dest, spare, replace, specs or [])
            if begun is not None:
                return begun
        return dest.begin(replace=replace), False
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointWriteError(e.errno, f"cannot save to {dest.url}: {e.strerror}") from e


def _begin_in(
    dest: Storage, spare: Storage, replace: bool, specs: list[ArraySpec]
) -> tuple[Storage, bool] | None:
    """`Storage.begin_in`, after learning which files `spare` holds (`_recall`), then without
    those the new checkpoint does not write, so that no file of the new one is a directory of
    the old, or the reverse; and whether its documents are the new one's (`begin_write`).
    None, `spare` removed, where that cannot be done."""
    written: _Written | None = None
    staged: Storage | None = None
    try:
        if dest.recycles:
            written = _recall(spare)
            staged = dest.begin_in(spare, replace=replace)
    except (CheckpointError, OSError) as e:
        log.debug("asyncckpt: not writing over %s: %s", spare.url, e)
        staged = None
    if staged is None or written is None:
        with contextlib.suppress(OSError):
            spare.remove()
        return None
    same = written.specs == specs  # (the same tree, the usual case: nothing to remove)
    try:
        if not same:
            old_files, old_dirs = _step_files(written.specs)
            new_files, new_dirs = _step_files(specs)
            staged.remove_stale(old_files - new_files, old_dirs - new_dirs)
    except BaseException:
        dest.discard(staged)
        raise
    return staged, same and written.format_version == _format.FORMAT_VERSION


@dataclass(frozen=True, slots=True)
class _Written:
    """What a committed checkpoint holds: its arrays and their chunk hashes (None: its root
    document has none), in the format of `format_version`; and, where this process wrote it
    after a step before, for each array the number of saves in a row, up to this one, in which
    it changed whole (`Reuse.changed_runs`; empty: not known)."""

    specs: list[ArraySpec]
    hashes: dict[str, list[str]] | None
    format_version: int = _format.FORMAT_VERSION
    changed: Mapping[str, int] = field(default_factory=dict)


# the checkpoints this process committed last, by the hash of their root document's bytes
_WRITTEN: dict[str, _Written] = {}
_WRITTEN_MAX = 8
_WRITTEN_LOCK = threading.Lock()


def _remember(root: bytes, written: _Written) -> None:
    """What the checkpoint whose root document is `root` holds, for the next save that reuses
    its chunks (`Reuse.of`) or writes over its files once it is deleted (`_recall`): parsing its
    4000 array documents back costs ~25 us each, a tenth of a small save's CPU time."""
    with _WRITTEN_LOCK:
        _WRITTEN[xxhash.xxh3_128_hexdigest(root)] = written
        while len(_WRITTEN) > _WRITTEN_MAX:
            del _WRITTEN[next(iter(_WRITTEN))]


def _read_written(place: Storage, *, forget: bool = False) -> _Written:
    """What the committed checkpoint at `place` holds: as remembered where its root document
    is byte for byte one this process wrote (`forget`: its files are about to be written
    over), else parsed from that document."""
    raw = place.read_small(_format.DOC, _format.MAX_ROOT_DOC_BYTES)
    key = xxhash.xxh3_128_hexdigest(raw)
    with _WRITTEN_LOCK:
        written = _WRITTEN.pop(key, None) if forget else _WRITTEN.get(key)
    if written is not None:
        return written
    info = _format.parse_root_doc(raw, f"checkpoint {place.url}")
    return _Written(list(info.arrays.values()), info.hashes, info.format_version)


def _recall(spare: Storage) -> _Written:
    """What the deleted checkpoint `spare` holds."""
    return _read_written(spare, forget=True)


def _step_files(specs: Iterable[ArraySpec]) -> tuple[set[str], set[str]]:
    """The files and directories of a checkpoint of the arrays `specs`, without its root
    document (docs/FORMAT.md)."""
    specs = list(specs)
    names = [s.name for s in specs]
    dirs = set(names).union(_format.group_names(names))
    files = {f"{d}/{_format.DOC}" for d in dirs}
    files.update(s.chunk_key(c) for s in specs for c in s.chunk_coords())
    return files, dirs


_INLINE_CHUNK_BYTES = 4 << 20  # chunks up to this size are written with their array's document

GUESS_CHANGED_AFTER = 2
"""An array that changed whole in this many saves in a row is taken to change in the next too
(`Reuse.worth_hashing_first`): one that changes every other save (gradient accumulation, saves
every step) keeps having its unchanged steps' chunks linked."""


@dataclass(frozen=True, slots=True)
class Reuse:
    """The step before, whose chunks a save links or copies (`Storage.reuse_chunk`) where the
    new chunk's content hash is the same, instead of writing them again."""

    place: Storage
    specs: dict[str, ArraySpec]
    hashes: dict[str, list[str]]
    changed: Mapping[str, int] = field(default_factory=dict)
    """For each array, the saves in a row up to the step before in which it changed whole
    (`_Written.changed`)."""

    @staticmethod
    def of(previous: Storage | None) -> Reuse | None:
        """What `previous` offers: nothing when it is gone, damaged or has no hashes."""
        if previous is None:
            return None
        try:
            written = _read_written(previous)
        except (CheckpointError, OSError) as e:
            log.debug("asyncckpt: not reusing %s: %s", previous.url, e)
            return None
        if written.hashes is None:
            return None
        specs = {s.name: s for s in written.specs}
        return Reuse(previous, specs, written.hashes, written.changed)

    def holds(self, spec: ArraySpec) -> bool:
        """Whether the step before holds this array in the same layout: only then can a chunk's
        content be there already (`has`)."""
        return self.specs.get(spec.name) == spec

    def worth_hashing_first(self, spec: ArraySpec) -> bool:
        """Whether to hash the chunks of `spec` before writing them, to find those of the same
        content as in the step before: where it `holds` the array, unless the array changed
        whole in the last `GUESS_CHANGED_AFTER` saves (training's parameters and optimizer
        state, save after save). Then a chunk is hashed as it is written, in the checksums'
        pass (`Storage.write_chunk`), a pass over its bytes fewer; one that turns out the same
        is written again, and the save after that hashes its array first."""
        return self.holds(spec) and self.changed.get(spec.name, 0) < GUESS_CHANGED_AFTER

    def changed_runs(self, specs: list[ArraySpec], hashes: dict[str, list[str]]) -> dict[str, int]:
        """For each array of `specs` that the step before holds, the saves in a row, up to
        the one whose chunks' new hashes are `hashes`, in which it changed whole."""
        return {
            s.name: (
                0
                if any(map(str.__eq__, hashes[s.name], self.hashes[s.name]))
                else self.changed.get(s.name, 0) + 1
            )
            for s in specs
            if self.holds(s)
        }

    def has(self, spec: ArraySpec, coords: tuple[int, ...], digest: str) -> bool:
        """Whether the step before holds this chunk's content in the same layout."""
        if not self.holds(spec):
            return False
        index = int(np.ravel_multi_index(coords, spec.grid)) if spec.grid else 0
        return self.hashes[spec.name][index] == digest


def _write_groups(staged: Storage, groups: list[str]) -> None:
    for group in groups:
        staged.make_dirs([group])
        staged.write(f"{group}/{_format.DOC}", _format.GROUP_DOC)


def _write_arrays(
    staged: Storage, arrays: list[HostArray], reuse: Reuse | None, documents: bool
) -> None:
    """Each array's directory and document (if `documents`), and its chunks if they are
    small."""
    for array in arrays:
        if documents:
            name = array.spec.name
            with _context(array, staged.path(name)):
                staged.make_dirs([name], parents=False)  # its parent group exists already
                staged.write(f"{name}/{_format.DOC}", _format.array_doc(array.spec))
        _write_chunks(staged, [(array, c, d) for c, d in array.chunks if _inline(d)], reuse)


def _inline(data: np.ndarray) -> bool:
    return data.nbytes <= _INLINE_CHUNK_BYTES


_SERIAL_BYTES = 64 << 10
"""Arrays whose inline chunks hold at most this many bytes are written on one thread: for files
that small the GIL, not the disk, bounds a save (4000 leaves of 16 KiB: 0.33 CPU s and 0.39 s
to commit on one thread, 0.76 CPU s and 0.72 s on two); llm's arrays of 0.1-1.5 MiB chunks
commit faster on two (0.52 s against 0.55 s)."""
_SERIAL_PARTS = 64  # tasks of the one-thread phases: ~5 ms each for 4000 small leaves


def _write_chunks(
    staged: Storage,
    chunks: list[tuple[HostArray, tuple[int, ...], np.ndarray]],
    reuse: Reuse | None,
) -> None:
    """Write each chunk and keep its content hash; where the step before may hold the same
    content (`Reuse.worth_hashing_first`), hash the chunk first, and link or copy it from there
    instead when it does. (One `try` for all: thousands of small chunks a save.)"""
    array, key = None, ""
    try:
        for array, coords, data in chunks:
            key = array.spec.chunk_key(coords)
            view = _format.bytes_view(data)
            digest = None
            if reuse is not None and reuse.worth_hashing_first(array.spec):
                digest = _format.chunk_hash(view)
                if reuse.has(array.spec, coords, digest) and staged.reuse_chunk(
                    key, reuse.place, key
                ):
                    array.hashes[coords] = digest
                    array.reused.add(coords)
                    continue
            band = _format.band_nbytes(array.spec) if array.spec.band_rows is not None else None
            array.hashes[coords] = staged.write_chunk(key, view, band, digest)
    except OSError as e:
        if array is None or isinstance(e, CheckpointError):
            raise
        raise _write_error(e, array, staged.path(key)) from e


def _contents_here(snap: Snapshot) -> dict[str, Any]:
    """This process's part of `_format.Contents`, as JSON: its chunks' hashes and new bytes."""
    return {
        "hashes": {
            a.spec.name: {_format.chunk_id(c): h for c, h in a.hashes.items()} for a in snap.arrays
        },
        "new_bytes": _new_bytes(snap),
    }


def _new_bytes(snap: Snapshot) -> int:
    """The chunk bytes this process wrote (not linked or copied from the step before)."""
    return sum(d.nbytes for a in snap.arrays for c, d in a.chunks if c not in a.reused)


def _contents(snap: Snapshot, parts: list[dict[str, Any]] | None = None) -> _format.Contents:
    """Every chunk's hash, from the parts of all processes (`_contents_here`), or (None) from
    the snapshot of the one process that wrote every chunk."""
    found: dict[str, dict[str, str]] = {}
    for part in parts or []:
        for name, table in part["hashes"].items():
            found.setdefault(name, {}).update(table)
    hashes = {}
    for array in snap.arrays:
        coords = array.spec.chunk_coords()
        if parts is None:
            listed = [array.hashes.get(c) for c in coords]
        else:
            table = found.get(array.spec.name, {})
            listed = [table.get(_format.chunk_id(c)) for c in coords]
        if None in listed:  # a chunk nobody wrote: a bug, never a checkpoint
            raise CheckpointWriteError(f"no process wrote every chunk of {array.spec.name!r}")
        hashes[array.spec.name] = cast(list[str], listed)
    if parts is None:
        return _format.Contents(hashes, _new_bytes(snap))
    return _format.Contents(hashes, sum(int(p["new_bytes"]) for p in parts))


@contextlib.contextmanager
def _context(array: HostArray, path: str) -> Iterator[None]:
    """Name the variable and file in any OSError raised inside."""
    try:
        yield
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise _write_error(e, array, path) from e


def _write_error(e: OSError, array: HostArray, path: str) -> CheckpointWriteError:
    return CheckpointWriteError(
        e.errno, f"while writing variable {array.spec.name!r} to {path}: {e.strerror}"
    )


def _write_tree(
    staged: Storage, snap: Snapshot, workers: Workers, *, documents: bool, reuse: Reuse | None
) -> None:
    """Write the group and array documents (if `documents`) and this process's chunks.

    Phases, each spread over the I/O threads: group directories; array directories, documents
    and small chunks (one task touches one directory at a time, few barriers for thousands of
    small leaves); large chunks. Without `documents` the directories and documents exist
    already (another process made them, or the deleted step written over holds them as they
    would be written: `begin_write`) and only chunks are written. In an object store the same
    phases run on the network pool, with many more requests in flight.
    """
    net = staged.network
    parts = workers.parts(net, background=True)
    # on a file system, documents and small chunks are Python's work more than the kernel's:
    # one thread writes them (`lanes`), in tasks small enough to show when it stalls
    lanes, serial_parts = (None, parts) if net else (1, _SERIAL_PARTS)
    phases: list[tuple[list[Callable[[], None]], list[int], int | None]] = []
    if documents:
        groups = batches(
            _format.group_names([a.spec.name for a in snap.arrays]),
            lambda g: 1,
            parts=serial_parts,
            min_cost=32,
        )
        phases.append(
            (
                [functools.partial(_write_groups, staged, g) for g in groups],
                [_FILE_COST * len(g) for g in groups],
                lanes,
            )
        )
    small: list[tuple[HostArray, int]] = []  # (array, its document and small chunks' cost)
    large: list[tuple[HostArray, int]] = []
    for array in snap.arrays:
        inline = [d.nbytes for _, d in array.chunks if _inline(d)]
        if documents or inline:
            cost = _FILE_COST * (documents + len(inline)) + sum(inline)
            (small if sum(inline) <= _SERIAL_BYTES else large).append((array, cost))
    for arrays, n, lane in ((small, serial_parts, lanes), (large, parts, None)):
        some, costs = weighed_batches(
            arrays, lambda a: a[1], parts=n, min_cost=1 if net else 8 * _FILE_COST
        )
        tasks: list[Callable[[], None]] = [
            functools.partial(_write_arrays, staged, [a for a, _ in g], reuse, documents)
            for g in some
        ]
        phases.append((tasks, costs, lane))
    rest = [(a, c, d) for a in snap.arrays for c, d in a.chunks if not _inline(d)]
    chunks, costs = weighed_batches(rest, _chunk_cost, parts=parts, min_cost=1)
    tasks = [functools.partial(_write_chunks, staged, g, reuse) for g in chunks]
    phases.append((tasks, costs, None))
    workers.expect(sum(sum(costs) for _, costs, _ in phases))
    for phase, weights, lane in phases:
        workers.run_all(phase, background=True, network=net, lanes=lane, costs=weights)


def _chunk_cost(chunk: tuple[HostArray, tuple[int, ...], np.ndarray]) -> int:
    return chunk[2].nbytes + _FILE_COST


_FILE_COST = 128 << 10
"""What writing a file costs beyond its bytes, in bytes' worth of CPU time (a save of 4000 small
leaves spends ~20-40 us per file, a large save ~0.35 s per GB): the weights of tasks when they are
split over threads and when the pacing thread paces a save (`Workers.submit_save`)."""


def _commit(
    staged: Storage,
    snap: Snapshot,
    dest: Storage,
    replace: bool,
    fields: _format.RootFields,
    contents: _format.Contents,
    tree: dict[str, Any] | None = None,
    reuse: Reuse | None = None,
) -> None:
    """The root document (written last), durable, then visible (`Storage.commit`). `tree`: the
    description to write instead of the snapshot's (with every process's iterator states).
    `reuse`: the step before, whose chunks the save reused."""
    tree = snap.tree if tree is None else tree
    root = _format.root_doc(
        [a.spec for a in snap.arrays], tree, fields, created=snap.created, contents=contents
    )
    staged.write(_format.DOC, root)
    staged.sync()
    dest.commit(staged, replace=replace)
    specs = [a.spec for a in snap.arrays]
    changed = {} if reuse is None else reuse.changed_runs(specs, contents.hashes)
    _remember(root, _Written(specs, contents.hashes, changed=changed))


def _as_write_error(e: BaseException, dest: Storage, *, uncommitted: bool = False) -> BaseException:
    """`e` as the error of a failed save; `uncommitted`: it failed before the commit, so say
    that nothing was committed."""
    if not isinstance(e, OSError) or (
        isinstance(e, CheckpointError) and not (uncommitted and isinstance(e, CheckpointWriteError))
    ):
        return e
    error = CheckpointWriteError(
        e.errno,
        f"saving the checkpoint {dest.url} failed, nothing was committed: "
        f"{e.strerror if isinstance(e, CheckpointWriteError) else e}",
    )
    error.__cause__ = e
    return error


def write_snapshot(
    snap: Snapshot,
    dest: Storage,
    workers: Workers,
    *,
    replace: bool,
    fields: _format.RootFields,
    coord: Coordinator | None = None,
    phases: Phases | None = None,
    previous: Storage | None = None,
    spare: Storage | None = None,
) -> None:
    """Write `snap` where `dest` says, make it durable and commit it as `dest`. With `coord`:
    see `_write_together`. `phases` receives the time spent in `write` and `commit`.
    `previous`: a committed checkpoint whose chunks of the same content are reused (`Reuse`).
    `spare`: a deleted step whose files to write over (`begin_write`); it is used or removed."""
    phases = phases if phases is not None else Phases()
    if coord is not None:
        return _write_together(snap, dest, workers, replace, fields, coord, phases, previous, spare)
    staged = None
    try:
        with phases("write"):
            reuse = Reuse.of(previous)
            staged, in_place = begin_write(dest, replace, spare, [a.spec for a in snap.arrays])
            _write_tree(staged, snap, workers, documents=not in_place, reuse=reuse)
        with phases("commit"):
            _commit(staged, snap, dest, replace, fields, _contents(snap), reuse=reuse)
    except BaseException as e:
        if staged is not None:
            dest.discard(staged)
        raise _as_write_error(e, dest, uncommitted=True) from None


def _write_together(
    snap: Snapshot,
    dest: Storage,
    workers: Workers,
    replace: bool,
    fields: _format.RootFields,
    coord: Coordinator,
    phases: Phases,
    previous: Storage | None,
    spare: Storage | None,
) -> None:
    """The multi-process save, in three barriers.

    1. `layout`: process 0 has begun the checkpoint and written every document and its own
    chunks. 2. `written`: every other process has added its chunks and synced them. 3. `done`:
    process 0 has written the root document and committed. A process that fails still goes to
    the next barrier and reports its failure in the key-value store, so the others stop at once
    instead of at the deadline; a process that never arrives is named when the deadline
    passes. Nothing is committed unless every process wrote its part.
    """
    leader = coord.process == 0
    what = f"saving {dest.url} from {coord.count} processes"
    staged: Storage | None = None
    error: BaseException | None = None
    t_write = time.perf_counter()
    reuse = Reuse.of(previous)  # each process reuses its own chunks
    if leader:
        try:
            staged, in_place = begin_write(dest, replace, spare, [a.spec for a in snap.arrays])
            _write_tree(staged, snap, workers, documents=not in_place, reuse=reuse)
        except BaseException as e:
            error = e
    try:
        if leader:
            coord.put(
                "layout",
                {
                    "staged": staged.url if staged is not None else None,
                    "dest": dest.url,
                    "ok": error is None,
                },
            )
        coord.barrier("layout", f"{what}, nothing was committed")
        layout = coord.get("layout")
        if not leader and layout["dest"] != dest.url:
            error = CheckpointError(
                f"{what}: process 0 saves to {layout['dest']} but process "
                f"{coord.process} to {dest.url}; every process must save "
                "the same paths in the same order"
            )
        elif not leader and layout["ok"]:
            try:
                theirs = open_storage(layout["staged"])
                _write_tree(theirs, snap, workers, documents=False, reuse=reuse)
                theirs.sync()
            except BaseException as e:
                error = e
        states = _tree.state_nodes(snap.tree)  # data iterators: each process has its own
        if states:
            coord.put(f"states/{coord.process}", states)
        if error is None:
            coord.put(f"contents/{coord.process}", _contents_here(snap))
        coord.put(f"written/{coord.process}", None if error is None else str(error))
        coord.barrier("written", f"{what}, nothing was committed")
        failed = {p: m for p, m in sorted(coord.gather("written").items()) if m is not None}
        if failed:
            if error is not None:
                raise error
            p, message = next(iter(failed.items()))
            raise CheckpointWriteError(
                f"{what}: process {p} failed, so nothing was committed: {message}"
            )
        phases.add("write", time.perf_counter() - t_write)
        if leader and staged is not None:
            try:
                with phases("commit"):
                    tree = None
                    if states:
                        gathered = coord.gather("states")
                        per_process = [gathered[p] for p in range(coord.count)]
                        tree = _tree.with_process_states(snap.tree, per_process)
                    gathered_contents = coord.gather("contents")
                    parts = [gathered_contents[p] for p in range(coord.count)]
                    contents = _contents(snap, parts)
                    _commit(staged, snap, dest, replace, fields, contents, tree, reuse)
            except BaseException as e:
                error = e
            coord.put("done", None if error is None else str(error))
        coord.barrier("done", what)
        if not leader and (message := coord.get("done")) is not None:
            raise CheckpointWriteError(f"{what}: process 0 failed to commit: {message}")
        if error is not None:
            raise error
    except BaseException as e:
        if leader and staged is not None:
            dest.discard(staged)  # never a committed checkpoint
        raise _as_write_error(e, dest) from None


def _on_host(chunk: tuple[tuple[int, ...], Any]) -> tuple[tuple[int, ...], np.ndarray]:
    """A chunk of `HostArray.extra` in host memory: shards received from peers are asyncckpt's
    own device buffers of shape (1, *chunk), read only now (off the caller's thread)."""
    coords, data = chunk
    return (coords, data if isinstance(data, np.ndarray) else np.asarray(data)[0])


def write_local_part(
    snap: Snapshot,
    dest: Storage,
    workers: Workers,
    *,
    replace: bool,
    fields: _format.RootFields,
    coord: Coordinator | None,
    phases: Phases,
    offer: Callable[[], None] | None = None,
) -> None:
    """Write this process's part of a node-local step into `dest` (a directory of this host
    only): every chunk it holds, replicas included (`HostArray.extra`), after `offer()` (this
    process's shards offered to the peers that keep copies of them: `LocalTier.replicate`).

    Each process writes and syncs its part, then (with `coord`) the processes learn from each
    other which chunks each holds; only then does each write its root document, naming every
    holder, and commit its part. So a committed part always describes a step that every process
    wrote in full; a process that fails or dies before that barrier leaves no committed part
    anywhere (its debris is a temporary directory, removed by the next manager)."""
    what = f"saving the node-local part {dest.url}"
    staged = None
    local = Snapshot([], snap.tree, snap.created, None)
    try:
        error: Exception | None = None
        with phases("write"):
            try:  # a failure here (a peer's copies that never came) reaches every process
                if offer is not None:
                    offer()
                local = Snapshot(
                    [
                        HostArray(a.spec, a.chunks + [_on_host(c) for c in a.extra])
                        for a in snap.arrays
                    ],
                    snap.tree,
                    snap.created,
                    None,
                )
                staged, _ = begin_write(dest, replace)
                _write_tree(staged, local, workers, documents=True, reuse=None)
                staged.sync()
            except Exception as e:
                error = e
        mine = {
            a.spec.name: [_format.chunk_id(c) for c, _ in a.chunks]
            for a in local.arrays
            if a.chunks
        }
        held, process, processes = [mine], 0, 1
        tree = local.tree
        if coord is not None:  # every process's part is durable before any is committed
            coord.put(f"held/{coord.process}", mine)
            # data iterators: every part holds every process's state, so that a process
            # whose part is gone restores its own state from a peer's part
            states = _tree.state_nodes(local.tree)
            if states:
                coord.put(f"states/{coord.process}", states)
            error = coord.agree("local-written", error, f"{what}, nothing was committed")
            if error is None:
                gathered = coord.gather("held")
                held = [gathered[p] for p in range(coord.count)]
                process, processes = coord.process, coord.count
                if states:
                    gathered = coord.gather("states")
                    per_process = [gathered[p] for p in range(coord.count)]
                    tree = _tree.with_process_states(local.tree, per_process)
        if error is not None:
            raise error
        assert staged is not None
        with phases("commit"):
            part = _format.LocalPart(process, processes, held)
            root = _format.root_doc(
                [a.spec for a in local.arrays],
                tree,
                fields,
                created=local.created,
                local_part=part,
            )
            staged.write(_format.DOC, root)
            staged.sync()
            dest.commit(staged, replace=replace)
    except BaseException as e:
        if staged is not None:
            dest.discard(staged)
        raise _as_write_error(e, dest, uncommitted=True) from None
