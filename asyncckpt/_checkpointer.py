"""The public entry points by path: `AsyncCheckpointer`, `save`, `restore`, `list_variables`,
`load_variable`, `read_metadata`. They open the storage of a path and hand the work to an
`Engine` (threads, host memory, ordered saves) or to the restore and format modules."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _format, _restore, _safetensors, _tree
from ._engine import (
    DEFAULT_BACKGROUND_NICE,
    DEFAULT_BARRIER_TIMEOUT_S,
    DEFAULT_DURABLE_WITHIN_S,
    DEFAULT_MAX_INFLIGHT_BYTES,
    Engine,
    check_inflight,
    timed_restore,
)
from ._executor import UNSET, Priority, Workers, _Unset
from ._storage import Storage, open_storage
from ._telemetry import RestoreStats, SaveStats
from .errors import CheckpointReadError, CorruptCheckpointError, VariableNotFoundError

log = logging.getLogger("asyncckpt")


class AsyncCheckpointer:
    """Saves pytrees in the background; `save()` blocks only while it copies arrays to host.

    ```python
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save("/ckpt/step_100", state)   # returns after the host copy
        state = train_step(state)             # donating `state` is fine
    # leaving the block waits for the save to commit and raises any failure
    ```

    Saves run one after another in the order they were made; a new `save()` first waits for the
    previous one to commit (that wait is part of its blocking time). A failure in the background
    is raised by the next `save()`, `wait_until_finished()`, `check_for_errors()` or `close()`.

    Args:
        max_workers: threads for file I/O and host copies (default: 2 per core, 4 to 32).
        reuse_host_memory: keep the host buffers of a finished save for the next one. Saves of
            the same tree then skip first-touch page faults, at the cost of holding one host copy
            of the tree between saves. `close()` frees it.
        max_inflight_bytes: host memory that a restore's shards may take between being read and
            being placed on devices (one array's shards, if they take more).
        map_files: restore each chunk of a local checkpoint that is exactly one device's shard by
            mapping the file's pages copy-on-write instead of copying them into new memory
            (`restore` docs). False reads every chunk into memory of its own.
        read_once: under `jax.distributed`, a chunk that several processes' devices need is
            read from storage by one process and sent to the others through JAX collectives,
            so a job reads each byte once (docs/DISTRIBUTED.md). None (the default): on for
            object stores and accelerator devices, off for files on CPU devices (where reading
            the page cache is faster than CPU collectives).
        barrier_timeout_s: under `jax.distributed`, how long a save waits for the other
            processes at each of its barriers before it fails naming the missing ones.
        background_nice: how much the background writer threads yield the CPU to training:
            "idle" (the default; Linux `SCHED_IDLE`, else niceness 19): they run only on CPU time
            nothing else wants; or a niceness to add, 0 to 19 (0: the caller's priority). A save
            then takes longer only while the CPU is busy, and a caller that has to wait for one
            (the next `save`, `wait_until_finished`, `close`) writes on its own thread too.
        durable_within_s: how soon a save should be durable (default 3 s after `save()`) even
            when a training loop keeps every core busy and leaves the idle-priority writers
            almost no CPU time: one more writer thread, at the caller's priority, writes only
            while the save is behind a straight line from `save()` to 80% of this time, so the
            CPU time the save takes from training is spread over it rather than taken at once
            (where the process may raise priorities, threads holding work the save waits for
            get the caller's priority while it is behind). On an idle CPU a save is done
            sooner, by the idle writers. Smaller: durable sooner under load, training slowed
            more meanwhile; 0: written at the caller's priority from the start; None: only by
            the idle writers (and a caller that waits). `urgent_after_s`, its former name
            (deprecated), is read as `durable_within_s`.
    """

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        reuse_host_memory: bool = True,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        map_files: bool = True,
        read_once: bool | None = None,
        barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
        background_nice: Priority = DEFAULT_BACKGROUND_NICE,
        durable_within_s: float | None = DEFAULT_DURABLE_WITHIN_S,
        urgent_after_s: float | None | _Unset = UNSET,
    ) -> None:
        self._engine = Engine(
            owner="this AsyncCheckpointer",
            max_workers=max_workers,
            reuse_host_memory=reuse_host_memory,
            max_inflight_bytes=max_inflight_bytes,
            map_files=map_files,
            read_once=read_once,
            barrier_timeout_s=barrier_timeout_s,
            background_nice=background_nice,
            durable_within_s=durable_within_s,
            urgent_after_s=urgent_after_s,
        )

    def save(
        self, path: Any, tree: Any, *, metadata: Any = None, force: bool = False
    ) -> Future[str]:
        """Snapshot `tree` to host memory and write it to `path` in the background.

        Returns a future whose result is the committed path. `metadata` (JSON) is stored with
        the checkpoint. An existing checkpoint at `path` is replaced only with `force=True`.
        """
        dest = open_storage(path)
        fields = _format.root_fields(metadata, None, f"while saving {dest.url}")
        return self._engine.save(dest, tree, fields=fields, force=force)

    def restore(self, path: Any, target: Any = None, *, strict: bool = True) -> Any:
        """Like `asyncckpt.restore`, using this checkpointer's threads and options."""
        self._engine.check_open()
        return self._engine.restore(open_storage(path), target, strict=strict)

    def last_save_stats(self) -> SaveStats | None:
        """Timings by phase and bytes of the last committed save (None before the first)."""
        return self._engine.last_save

    def last_restore_stats(self) -> RestoreStats | None:
        """Timings by phase and bytes of the last restore (None before the first)."""
        return self._engine.last_restore

    def check_for_errors(self) -> None:
        """Raise the first failure of a finished background save (once), if any."""
        self._engine.check_for_errors()

    def wait_until_finished(self) -> None:
        """Block until every save made so far has committed; raise the first failure."""
        self._engine.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in flight, stop the threads, free held host memory."""
        self._engine.close()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save(path: Any, tree: Any, *, metadata: Any = None, force: bool = False) -> None:
    """Save `tree` to the directory `path` and return once the checkpoint is committed.

    Leaves: `jax.Array` (any sharding; typed PRNG keys too), numpy arrays and scalars, python
    int/float/bool/str. `metadata`: any JSON value, returned by `read_metadata`.
    """
    dest = open_storage(path)
    save_fields(dest, tree, _format.root_fields(metadata, None, f"while saving {dest.url}"), force)


def save_fields(dest: Storage, tree: Any, fields: _format.RootFields, force: bool) -> None:
    """`save` with the root document's fields already made by `_format.root_fields` (a step
    number and metrics too: `import_orbax` carries them over)."""
    with AsyncCheckpointer(reuse_host_memory=False) as ckptr:
        ckptr._engine.save(dest, tree, fields=fields, force=force)


def restore(
    path: Any,
    target: Any = None,
    *,
    strict: bool = True,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    map_files: bool = True,
    read_once: bool | None = None,
) -> Any:
    """Read the checkpoint at `path`.

    Without `target`: the saved tree, arrays as numpy arrays (typed PRNG keys as jax key arrays).
    With `target` (a pytree of `jax.Array`, `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` or
    numpy arrays): exactly its structure, dtypes and shardings; each process reads only the chunks
    its devices need. `strict=False` lets the target hold a subset of the saved leaves.

    `max_inflight_bytes`: host memory that shards may take between being read and being placed
    on devices: arrays are read and placed in groups of at most that many bytes (a larger array
    alone), so on accelerators a restore needs that much host memory, not the whole tree.
    `map_files` (default True): a chunk of a local checkpoint that is exactly one device's shard
    (the usual resume) is mapped copy-on-write, not copied: its checksums are verified through the
    mapping and the pages stay the page cache's, so a resume neither fills fresh memory nor
    copies. On accelerators the mapping is released once the shard is on the device; CPU arrays
    keep it, and writes to them (donation) copy the pages they touch, never reaching the file.
    asyncckpt never changes a committed file (saves write new files and rename them), but a file
    truncated in place by something else while mapped would end the process with SIGBUS: pass
    False if anything may do that.
    `read_once`: under `jax.distributed`, a chunk that several processes' devices need (a
    replicated target) is read from storage by one of them and sent to the others through JAX
    collectives (docs/DISTRIBUTED.md). None (the default): on for object stores and accelerator
    devices, off for files on CPU devices, where reading the page cache beats CPU collectives.
    """
    check_inflight(max_inflight_bytes)
    if _safetensors.is_safetensors(path):
        return load_safetensors(path, target, strict=strict, max_inflight_bytes=max_inflight_bytes)
    workers = Workers()
    try:
        return timed_restore(
            open_storage(path),
            target,
            strict,
            workers,
            max_inflight_bytes,
            map_files,
            None,
            DEFAULT_BARRIER_TIMEOUT_S,
            read_once=read_once,
        )[0]
    finally:
        workers.close()


def load_safetensors(
    path: Any,
    target: Any = None,
    *,
    names: Callable[[str], str | None] | Mapping[str, str] | None = None,
    strict: bool = True,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
) -> Any:
    """Read a `.safetensors` file, or the files a `*.safetensors.index.json` names (Hugging Face's
    sharded weights), onto the devices and shardings of `target`.

    Each process reads only the byte ranges of the shards its devices hold. A target leaf at the
    keypath `a/b/c` takes the tensor that `names` gives for `"a/b/c"` (a function or a mapping),
    else the tensor `a.b.c` (Hugging Face's names), else `a/b/c` (what `asyncckpt export`
    writes). Shapes must match; dtypes convert as in `restore` (a cast that loses the kind of
    value is refused). `strict=False` lets the files hold tensors the target does not use.
    Without `target`: `{name: numpy array}` of every tensor. The header is checked as untrusted
    input. `ac.restore(path, target)` does the same for a path ending in `.safetensors` or
    `.safetensors.index.json`.
    """
    check_inflight(max_inflight_bytes)
    workers = Workers()
    try:
        return _safetensors.restore(
            path,
            target,
            names=names,
            strict=strict,
            workers=workers,
            max_inflight_bytes=max_inflight_bytes,
        )
    finally:
        workers.close()


@dataclass(frozen=True, slots=True)
class VariableInfo:
    """One array variable of a checkpoint, as `list_variables` describes it."""

    name: str
    """Variable name: the keypath joined by `/` (`params/dense/kernel`)."""
    shape: tuple[int, ...]
    """Global shape as stored (PRNG keys: their key data, with the trailing key dimension)."""
    dtype: np.dtype
    """Stored dtype."""
    nbytes: int
    """Size of the data in bytes."""
    chunk_shape: tuple[int, ...]
    """Shape of each chunk (one per shard at save time)."""
    prng_impl: str | None = None
    """PRNG implementation for typed key arrays, else None."""


def _info(spec: _format.ArraySpec) -> VariableInfo:
    return VariableInfo(
        spec.name, spec.shape, spec.dtype, spec.nbytes, spec.chunk_shape, spec.prng_impl
    )


def list_variables(path: Any) -> dict[str, VariableInfo]:
    """Every array variable of the checkpoint at `path`, in tree order (reads one file)."""
    info = _restore.read_root(open_storage(path))
    order = {name: i for i, name in enumerate(_tree.spec_leaf_names(info.tree))}
    names = sorted(info.arrays, key=lambda n: order.get(n, len(order)))
    return {name: _info(info.arrays[name]) for name in names}


def read_metadata(path: Any) -> Any:
    """The user `metadata` saved with the checkpoint at `path`."""
    return _restore.read_root(open_storage(path)).metadata


def load_variable(path: Any, name: str) -> np.ndarray:
    """Read one variable as a numpy array: its chunks, its own `zarr.json` and the root
    document, which must agree (a restore trusts the root document). With a damaged root
    document the variable is still loaded by its own `zarr.json` (a warning says so): a way
    to salvage data from a checkpoint that no longer restores.

    PRNG key arrays come back as their raw key data (`uint32`).
    """
    ckpt = open_storage(path)
    if not ckpt.exists(_format.DOC):
        _restore.read_root(ckpt)  # raises the precise "not found" / "incomplete" error
    where = f"checkpoint {ckpt.url}"
    _format.check_name(name, where)
    doc_key = f"{name}/{_format.DOC}"
    try:
        raw = ckpt.read_small(doc_key, _format.MAX_ARRAY_DOC_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        known = list(list_variables(ckpt))
        raise VariableNotFoundError(
            f"{where} has no variable {name!r}; it has: {', '.join(known[:30])}"
            + (f" ... ({len(known)} in all)" if len(known) > 30 else "")
        ) from None
    except OSError as e:
        raise CheckpointReadError(e.errno, f"cannot read {ckpt.path(doc_key)}: {e.strerror}") from e
    doc = _format.parse_json(raw, where, ckpt.path(doc_key))
    if isinstance(doc, dict) and doc.get("node_type") == "group":
        under = [n for n in list_variables(ckpt) if n.startswith(name + "/")]
        raise VariableNotFoundError(
            f"{name!r} in {where} is a group, not a variable; the variables under it: "
            f"{', '.join(under[:30])}"
            + (f" ... ({len(under)} in all)" if len(under) > 30 else "")
            + " (load them one by one, or restore the "
            "checkpoint with a target holding just them and strict=False)"
        )
    spec = _format.parse_array_doc(name, doc, where)
    try:
        listed = _restore.read_root(ckpt).arrays.get(name)
    except CorruptCheckpointError as e:  # salvage: the variable's own document is all there is
        log.warning(
            "asyncckpt: the root document of %s is damaged (%s); loading %r by its own "
            "zarr.json alone, unchecked against it",
            where,
            e,
            name,
        )
        listed = spec
    if listed != spec:  # restore trusts the root document: so must this, or say they differ
        said = (
            "does not list it"
            if listed is None
            else f"says shape {listed.shape}, dtype {listed.dtype}, chunks {listed.chunk_shape}"
        )
        raise CorruptCheckpointError(
            f"{ckpt.path(doc_key)} says shape {spec.shape}, dtype {spec.dtype}, chunks "
            f"{spec.chunk_shape}, but the root document of {where} {said}; the checkpoint was "
            "changed after it was saved (run `asyncckpt verify` on it)"
        )
    raw_spec = dataclasses.replace(spec, prng_impl=None)  # key data stays raw uint32
    workers = Workers(max_workers=4)
    try:
        (value,) = _restore.read_arrays(
            ckpt, [(raw_spec, None)], workers, max_inflight_bytes=DEFAULT_MAX_INFLIGHT_BYTES
        )
    finally:
        workers.close()
    return value
