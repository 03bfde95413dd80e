"""`CheckpointManager`: numbered steps in one directory, retention, preemption saves.

Orchestration only: whether to save, snapshot -> background write -> retention, which steps exist.
It stands on an `Engine` (threads, host memory, the saves in order), like `AsyncCheckpointer`,
and on the storage of its directory. The steps on disk are the truth; the manager's list is a
cache of them that only this writer changes (the directory lock keeps other writers out).

Threads: the caller's thread snapshots and asks; the job thread writes each save and then runs
the retention job submitted right after it (so retention always sees its step committed), as
well as deletions and setting damaged steps aside; the clean-up thread removes the files of
deleted steps. Everything they share (`_infos`, `_saving`, `_jobs`, `_cleanups`,
`_last_save`) is changed under `_mutex`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal, cast

import jax

from . import _directory, _distributed, _format, _restore, _telemetry
from ._engine import (
    DEFAULT_BACKGROUND_NICE,
    DEFAULT_BARRIER_TIMEOUT_S,
    DEFAULT_DURABLE_WITHIN_S,
    DEFAULT_MAX_INFLIGHT_BYTES,
    Engine,
)
from ._executor import UNSET, Priority, _Unset
from ._local import LocalTier
from ._preemption import PreemptionWatch
from ._retention import (
    KeepBest,
    RetentionPolicy,
    StepInfo,
    check_count,
    policies_from,
    steps_to_delete,
)
from ._storage import Storage, open_storage
from ._telemetry import RestoreStats, SaveStats
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ClosedError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ReadOnlyError,
    StepNotFoundError,
    TreeMismatchError,
)

log = logging.getLogger("asyncckpt")


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    step = int(step.__index__())
    if not 0 <= step < 10**19:
        raise ValueError(f"step must be between 0 and 10**19 - 1, got {step}")
    return step


def _steps_text(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[:20]))
    return shown + (f", ... ({len(steps)} in all, latest {steps[-1]})" if len(steps) > 20 else "")


class CheckpointManager:
    """Saves numbered steps of a training run into `directory` and keeps the ones worth keeping.

    ```python
    with ac.CheckpointManager("/ckpt/run1", max_to_keep=3, save_interval_steps=1000) as mgr:
        start = mgr.latest_step()
        state = mgr.restore(start, target=abstract_state) if start is not None else init()
        for step in range((start or 0) + 1, num_steps + 1):
            state, loss = train_step(state)
            mgr.save(step, state, metrics={"loss": loss})   # skipped off-interval; async
            if mgr.reached_preemption(step):
                break                                       # the save above was forced
    ```

    Each step is an ordinary checkpoint (`<directory>/<step>`), readable with `asyncckpt.restore`,
    zarr-python or TensorStore. A step exists once committed; `save()` returns after the host
    copy, and at most one save writes at a time (the next `save()` waits for it).

    Retention: `max_to_keep`, `keep_best` (with `best_metric` and `best_mode`) bound the number of
    steps; `keep_every_n_hours` and `keep_every_n_steps` protect some from deletion. A step kept
    by any policy stays, and so does the newest one. Policies can also be given as objects
    (`retention=[ac.KeepLastN(3), ...]`). Retention runs on the job thread, as the job after each
    save, over the steps on disk; deleted steps leave the listing at once and their files are
    removed in the background.

    Args:
        directory: where the steps live (created if missing).
        save_interval_steps: `should_save(step)` is true for steps divisible by this (and for the
            first step saved into an empty directory).
        save_on_preemption: catch SIGTERM (a previous Python handler is still called, the process
            is not terminated); then `reached_preemption()` is true and the next `save` is forced.
        read_only: open without the writer lock, e.g. to restore while another job trains; the
            step list is re-read on every query. `save` and `delete` then raise.
        incremental: a chunk whose content (its xxh3-128 hash) is the same as in the step saved
            before is not written again: it is hard-linked from that step on disk, copied
            server-side in an object store. Every step stays a whole checkpoint of its own, and
            deleting any step never changes another. False writes everything.
        reuse_deleted_files: on a local or mounted file system, the files of the step that
            retention deleted last are kept (under a hidden name, out of the listing) until the
            next save, which writes over them instead of creating as many new files, then
            removes what it did not write: for trees of thousands of small arrays that is about
            3x less kernel time a file, and no removal in the background. A file another step
            links (`incremental`) or that any process holds open or mapped (a restored array)
            is never written over: it is replaced by a new one. The same holds for a step
            `delete()` deleted. At most one deleted step waits like this; `close()` removes it.
            False removes every deleted step at once.
        max_workers, reuse_host_memory, max_inflight_bytes, map_files, read_once,
            barrier_timeout_s, background_nice, durable_within_s: as for `AsyncCheckpointer`.
        local_directory: a node-local tier (docs/MULTITIER.md): a path on each host, never
            shared, where each process saves every shard its devices hold, every
            `local_save_interval_steps` steps, keeping `local_max_to_keep` of them; a shard that
            fewer than `local_replicas` processes hold is also copied to the next processes'
            local tiers (through JAX collectives, at save time). `restore()` and
            `latest_step()` consider it first; `local_steps()` lists what can be restored from
            it now.

    Under `jax.distributed`, create the manager and call `save`, `delete` and `restore` in every
    process alike (after `jax.distributed.initialize`); the directory must be on storage every
    process sees. Each process writes its own shards; process 0 commits, holds the lock and
    applies retention.
    """

    def __init__(
        self,
        directory: Any,
        *,
        max_to_keep: int | None = None,
        keep_every_n_hours: float | None = None,
        keep_every_n_steps: int | None = None,
        best_metric: str | Callable[[Mapping[str, Any]], Any] | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int | None = None,
        retention: Sequence[RetentionPolicy] = (),
        save_interval_steps: int = 1,
        save_on_preemption: bool = True,
        read_only: bool = False,
        incremental: bool = True,
        reuse_deleted_files: bool = True,
        max_workers: int | None = None,
        reuse_host_memory: bool = True,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        map_files: bool = True,
        read_once: bool | None = None,
        barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
        background_nice: Priority = DEFAULT_BACKGROUND_NICE,
        durable_within_s: float | None = DEFAULT_DURABLE_WITHIN_S,
        urgent_after_s: float | None | _Unset = UNSET,
        local_directory: Any = None,
        local_save_interval_steps: int = 1,
        local_max_to_keep: int = 2,
        local_replicas: int = 2,
    ) -> None:
        self._dir: Storage = open_storage(directory)
        self._policies = policies_from(
            max_to_keep,
            keep_every_n_hours,
            keep_every_n_steps,
            best_metric,
            best_mode,
            keep_best,
            retention,
        )
        self._best = KeepBest(1, best_metric, best_mode) if best_metric is not None else None
        check_count(save_interval_steps, "save_interval_steps")
        check_count(local_save_interval_steps, "local_save_interval_steps")
        check_count(local_max_to_keep, "local_max_to_keep")
        check_count(local_replicas, "local_replicas")
        if read_only and local_directory is not None:
            raise ValueError(
                "read_only=True with local_directory: a reader restores from the persistent "
                "tier only; open the manager without local_directory"
            )
        self._interval = save_interval_steps
        self._read_only = read_only
        self._incremental = incremental
        self._reuse_deleted = reuse_deleted_files and self._dir.recycles
        self._barrier_timeout_s = barrier_timeout_s
        # under jax.distributed every process saves its shards; process 0 alone holds the lock,
        # cleans up and applies retention, the others re-read the step list from disk
        self._leader = not _distributed.is_multi_process() or jax.process_index() == 0
        self._mutex = threading.Lock()
        self._infos: dict[int, StepInfo | None] = {}  # None: not read from disk yet
        # a step, its save and the job recording it: in flight until recorded or failed
        self._saving: tuple[int, Future[str], Future[None]] | None = None
        self._jobs: list[Future[None]] = []  # retention jobs not yet checked
        self._cleanups: list[Future[None]] = []  # file removals not yet checked
        self._spare: tuple[int, Storage] | None = None  # a deleted step's files, to write over
        self._last_save: SaveStats | None = None
        self._lock = None
        if not read_only and self._leader:
            self._lock = _directory.lock(self._dir)
            try:
                self._remove_leftovers()
            except BaseException:
                if self._lock is not None:
                    self._lock.release()
                raise
        elif read_only and self._dir.has_directories and self._dir.kind() != "directory":
            raise CheckpointNotFoundError(
                f"no checkpoint directory at {self._dir.url} (read_only=True does not create it)"
            )
        self._engine = Engine(
            owner=f"this CheckpointManager of {self._dir.url}",
            max_workers=max_workers,
            reuse_host_memory=reuse_host_memory,
            max_inflight_bytes=max_inflight_bytes,
            map_files=map_files,
            read_once=read_once,
            barrier_timeout_s=barrier_timeout_s,
            background_nice=background_nice,
            durable_within_s=durable_within_s,
            urgent_after_s=urgent_after_s,
            close_at_exit=self.close,
        )
        self._watch = PreemptionWatch(save_on_preemption and not read_only)
        self._local: LocalTier | None = None
        try:
            if local_directory is not None:
                self._local = LocalTier(
                    local_directory,
                    max_to_keep=local_max_to_keep,
                    interval=local_save_interval_steps,
                    replicas=local_replicas,
                    barrier_timeout_s=barrier_timeout_s,
                )
            self.reload()
        except BaseException:
            self.close()
            raise

    @property
    def directory(self) -> str:
        return self._dir.url

    # -- what exists ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the step list from disk (a read-only manager does this on every query)."""
        steps = _directory.committed_steps(self._dir)
        with self._mutex:
            self._infos = {s: self._infos.get(s) for s in steps}

    def _follow(self) -> None:
        """In a writing process other than process 0: list the steps again, after process 0
        changed them (a commit and its retention, a deletion, a step set aside) and every
        process passed the barrier that says so. Between those the list is kept, as process 0
        keeps its own: listing an object store on every `save()` cost each of them ~40 ms of
        blocking."""
        if not self._read_only and not self._leader:
            self.reload()

    def all_steps(self) -> list[int]:
        """The committed steps, ascending. A step being saved appears once it is committed."""
        if self._read_only:
            self.reload()
        with self._mutex:
            return sorted(self._infos)

    def latest_step(self) -> int | None:
        """The highest committed step, or None; with `local_directory`, of either tier."""
        steps = self.all_steps() + self.local_steps()
        return max(steps) if steps else None

    def local_steps(self) -> list[int]:
        """The steps of the node-local tier that can be restored now (every process of this job
        holds its committed part), ascending; [] without `local_directory`."""
        return self._local.steps() if self._local is not None else []

    def step_info(self, step: int) -> StepInfo:
        """Step number, save time (seconds since the epoch) and metrics of a committed step."""
        step = self._existing(step)
        with self._mutex:
            info = self._infos.get(step)
        if info is None:
            info = self._read_info(step)
            with self._mutex:
                if step in self._infos:
                    self._infos[step] = info
        return info

    def metrics(self, step: int) -> Any:
        """The metrics saved with `step` (NaN and infinities come back as floats), or None."""
        return self.step_info(step).metrics

    def metadata(self, step: int) -> Any:
        """The user `metadata` saved with `step`."""
        return _restore.read_root(self._path(self._existing(step))).metadata

    def best_step(self) -> int | None:
        """The committed step with the best finite `best_metric`, or None (no `best_metric`, or
        no step has a finite value of it)."""
        if self._best is None:
            return None
        ranked = self._best.ranked([self.step_info(s) for s in self.all_steps()])
        return ranked[0] if ranked else None

    # -- saving --------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write: on the interval, after preemption, or the first
        save into an empty directory; never for a step at or below the newest saved one, never
        on a read-only manager."""
        step = _check_step(step)
        if self._read_only:
            return False
        return any(self._due(step, self._last_step(self.all_steps())))

    def _due(self, step: int, last: int | None) -> tuple[bool, bool]:
        """Whether `step` is due on the persistent tier and on the local tier, given `last`
        (the newest persistent step, in flight or committed)."""
        local = self._local.steps() if self._local is not None else []
        newest = max([s for s in (last, *local) if s is not None], default=None)
        if newest is not None and step <= newest:
            return False, False
        preempted = self.reached_preemption(step)
        persistent = preempted or last is None or step % self._interval == 0
        due_local = self._local is not None and (preempted or step % self._local.interval == 0)
        return persistent, due_local

    def save(
        self,
        step: int,
        tree: Any,
        *,
        metrics: Any = None,
        metadata: Any = None,
        force: bool = False,
    ) -> bool:
        """Snapshot `tree` as `step` and write it in the background; False if skipped.

        Skipped when `should_save(step)` is false, unless preemption was reached or `force=True`.
        An existing step raises `CheckpointExistsError`; `force=True` replaces it atomically.
        `metrics`: JSON-like numbers for `best_metric` and `metrics(step)` (JAX and numpy scalars
        are fine; NaN and infinities are kept). `metadata`: any JSON value.
        """
        self._check_writable("save")
        step = _check_step(step)
        self._check_background()
        steps = self.all_steps()  # one listing per save (it is a directory scan off process 0)
        if (step in steps or step == self._in_flight()) and not force:
            raise CheckpointExistsError(
                f"step {step} already exists in {self._dir.url}; pass force=True to replace it"
            )
        last = self._last_step(steps)
        persistent, local = (True, self._local is not None) if force else self._due(step, last)
        if not (persistent or local):
            newest = max([s for s in (last, *self.local_steps()) if s is not None], default=None)
            if newest is not None and step < newest:
                log.warning(
                    "asyncckpt: step %d not saved: it is older than step %d, already "
                    "saved in %s (pass force=True to save it anyway)",
                    step,
                    newest,
                    self._dir.url,
                )
            return False
        best = None
        if self._best is not None and isinstance(self._best.metric, str):
            best = (self._best.metric, self._best.mode)
        fields = _format.root_fields(
            metadata,
            _format.StepFields(step, metrics, best),
            f"while saving step {step} to {self._dir.url}",
        )
        previous = functools.partial(self._reuse_source, step) if self._incremental else None
        saved = self._engine.save(
            self._path(step) if persistent else None,
            tree,
            fields=fields,
            force=force,
            previous=previous,
            spare=self._take_spare if self._reuse_deleted else None,
            local=self._local.path(step) if local and self._local is not None else None,
            extra=(
                functools.partial(self._local.replicate, workers=self._engine.workers)
                if local and self._local is not None
                else None
            ),
        )
        retention = self._engine.submit(
            self._after_save, step, saved, fields.decoded_metrics, persistent, local
        )
        with self._mutex:
            self._saving = (step, saved, retention)
            self._jobs.append(retention)
        return True

    def _reuse_source(self, step: int) -> Storage | None:
        """The step whose unchanged chunks the save of `step` reuses: the newest committed one
        other than `step`. Called on the job thread when that save writes, so the save before
        it is committed and recorded by then."""
        others = [s for s in self.all_steps() if s != step]
        return self._path(max(others)) if others else None

    def _after_save(
        self, step: int, saved: Future[str], metrics: Any, persistent: bool, local: bool
    ) -> None:
        """The job after the save of `step`, on the job thread of every process: once the step
        is committed, record it and apply retention to the steps on disk (process 0; a step
        deleted by something else is gone), then let the others list the steps again. A local
        step is recorded and the local tier's retention applied by every process."""
        if saved.exception() is not None:
            return  # the save's own future raises it
        stats = self._engine.last_save
        assert stats is not None and stats.step == step
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            if local and self._local is not None:
                self._local.committed(step)
            if self._leader and persistent:
                self._apply_retention(step, stats.created, metrics)
        except BaseException as e:
            error = e
        if _distributed.is_multi_process() and persistent:
            _distributed.Coordinator(
                f"retention {self._dir.url} {step}", self._barrier_timeout_s
            ).barrier("retained", f"retention after step {step}")
            try:
                self._follow()
            except OSError as e:
                error = error or e
        retention_s = time.perf_counter() - t0
        stats = dataclasses.replace(
            stats, retention_s=retention_s, total_s=stats.total_s + retention_s
        )
        with self._mutex:
            self._last_save = stats
        _telemetry.report("save", stats)
        if error is not None:
            raise error

    def _apply_retention(self, step: int, created: float, metrics: Any) -> None:
        try:
            self.reload()
            with self._mutex:
                self._infos[step] = StepInfo(step, created, metrics)
            infos = [self.step_info(s) for s in self._committed()]
            for old in steps_to_delete(infos, self._policies, protect=[step]):
                self._delete_now(old, keep_files=self._reuse_deleted)
        except OSError as e:
            raise CheckpointWriteError(
                e.errno,
                f"step {step} was committed to {self._dir.url}, but retention could not "
                f"delete an old step: {e}",
            ) from e

    # -- deleting ------------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Delete a committed step: it leaves the listing at once (one rename). As with
        retention, on a local or mounted file system its files then wait under a hidden name
        for the next save to write over (`reuse_deleted_files`; the step deleted before is
        removed then), and `close()` removes them if no save comes; otherwise they are removed
        in the background (`wait_until_finished` waits for that). The saves this manager has
        in flight are waited for first."""
        self._check_writable("delete")
        step = _check_step(step)
        self._settle()
        self._existing(step)
        coord = None
        if _distributed.is_multi_process():  # everyone checked the step before it goes
            coord = _distributed.Coordinator(
                f"delete {self._dir.url} {step}", self._barrier_timeout_s
            )
            coord.barrier("checked", f"deleting step {step} of {self._dir.url}")
        deleted = True
        if self._leader:
            deleted = self._engine.wait_for(
                self._engine.submit(
                    functools.partial(self._delete_now, keep_files=self._reuse_deleted), step
                )
            )
        if coord is not None:  # the others list the step until process 0 has renamed it
            coord.barrier("deleted", f"deleting step {step} of {self._dir.url}")
            self._follow()
        if not deleted:
            self._existing(step)  # it was gone already: raises StepNotFoundError

    def _delete_now(self, step: int, *, keep_files: bool = False) -> bool:
        """Take `step` out of the listing, durably; remove its files on the clean-up thread, or
        (`keep_files`) keep them for the next save to write over (`reuse_deleted_files`), in
        place of the step kept so before, which goes. False if the step was gone already
        (removed by something else: it is dropped)."""
        with self._mutex:
            if step not in self._infos:
                return False
        try:
            trash = _directory.start_delete(self._dir, step)
        except FileNotFoundError:
            log.warning(
                "asyncckpt: step %d of %s was removed by something other than this "
                "manager; it is no longer listed",
                step,
                self._dir.url,
            )
            with self._mutex:
                self._infos.pop(step, None)
            return False
        log.debug("asyncckpt: deleting step %d of %s", step, self._dir.url)
        drop: tuple[int, Storage] | None = (step, trash)
        with self._mutex:
            self._infos.pop(step, None)
            if keep_files:
                drop, self._spare = self._spare, (step, trash)
        if drop is not None:
            self._remove_files(drop[1], drop[0])
        return True

    def _remove_files(self, place: Storage, step: int) -> None:
        cleanup = self._engine.submit_cleanup(_directory.remove, place, step)
        with self._mutex:
            self._cleanups.append(cleanup)

    def _take_spare(self) -> Storage | None:
        """The files of a deleted step for the save that writes now (job thread), or None."""
        spare = self._pop_spare()
        return spare[1] if spare is not None else None

    def _pop_spare(self) -> tuple[int, Storage] | None:
        with self._mutex:
            spare, self._spare = self._spare, None
        return spare

    def _set_aside(self, step: int) -> Storage:
        """Move the damaged `step` out of the listing, kept whole for inspection (job thread)."""
        moved = _directory.set_aside(self._dir, step)
        with self._mutex:
            self._infos.pop(step, None)
        return moved

    def _remove_leftovers(self) -> None:
        for place in _directory.leftovers(self._dir):
            log.info("asyncckpt: removing %s, left by an interrupted save or deletion", place.url)
            _directory.remove(place, None)

    # -- restoring -----------------------------------------------------------------------------

    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        *,
        strict: bool = True,
        fall_back: bool = False,
    ) -> Any:
        """Restore `step` (default: the latest committed step); `target` and `strict` as for
        `asyncckpt.restore`. The saves this manager has in flight are waited for first.

        A damaged step raises `CorruptCheckpointError` / `IncompleteCheckpointError` naming it
        and the earlier steps. With `fall_back=True` a warning names the damaged step instead,
        it is set aside (a writer moves it to `<step>.damaged-<time>`, out of the listing), and
        the newest earlier step that restores cleanly is returned."""
        self._engine.check_open()
        self._settle()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(
                    f"{self._dir.url} holds no committed step yet; start from scratch, or check "
                    "the directory (steps are folders named by their number)"
                )
        step = _check_step(step)
        if step in self.local_steps():
            restored, why = self._restore_local(step, target, strict)
            if why is None:
                return restored
            persistent = self.all_steps()
            older = [s for s in persistent if s <= step]
            if not older:
                raise CheckpointNotFoundError(
                    f"step {step} cannot be restored from the local tier ({why}), and "
                    f"{self._dir.url} holds no step at or before it; persistent steps: "
                    f"{_steps_text(persistent)}"
                )
            log.warning(
                "asyncckpt: restoring step %d from the persistent tier %s instead of local "
                "step %d: %s",
                older[-1],
                self._dir.url,
                step,
                why,
            )
            step = older[-1]
        self._existing(step)
        while True:
            try:
                return self._engine.restore(self._path(step), target, strict=strict, step=step)
            except (CorruptCheckpointError, IncompleteCheckpointError) as e:
                step = self._fall_back(step, e, fall_back)

    def _restore_local(self, step: int, target: Any, strict: bool) -> tuple[Any, str | None]:
        """Restore `step` from this job's local tier: (tree, None), or (None, why not) when the
        chunks some process's devices need are in no surviving part, or damaged (all processes
        agree). Chunks a process's own part lacks come from its peers' (`LocalTier.fetch`)."""
        assert self._local is not None
        try:  # a collective call: every process alike
            place = self._local.fetch(step, target, self._engine.workers)
        except (CheckpointError, OSError) as e:
            return None, str(e)
        value, error, fatal = None, cast(Exception | None, None), cast(Exception | None, None)
        try:
            value = self._engine.restore(
                place, target, strict=strict, step=step, local_key=f"local read {step}"
            )
        except TreeMismatchError as e:  # the target's fault: no other tier does better
            fatal = e
        except CheckpointError as e:  # damaged, or changed while read (after every read)
            error = e
        except Exception as e:  # e.g. a data iterator refusing its state: raised everywhere
            fatal = e
        if _distributed.is_multi_process():  # all restore the local step, or none does
            what = f"restoring local step {step}"
            coord = _distributed.Coordinator(f"local restore {step}", self._barrier_timeout_s)
            anyone = coord.agree("fatal", fatal, what)  # no process waits for one that raised
            if anyone is not None:
                raise fatal if fatal is not None else anyone
            error = coord.agree("restored", error, what)
        elif fatal is not None:
            raise fatal
        if error is not None:
            return None, str(error)
        log.info("asyncckpt: restored step %d from the local tier %s", step, self._local.dir.url)
        return value, None

    def _fall_back(self, step: int, error: CheckpointError, fall_back: bool) -> int:
        """The step to restore instead of the damaged `step`, or raise."""
        earlier = [s for s in self.all_steps() if s < step]
        if not fall_back or not earlier:
            hint = (
                f"earlier steps: {_steps_text(earlier)}; restore one with "
                "`restore(step=...)`, or pass fall_back=True"
                if earlier
                else "there is no earlier step"
            )
            raise type(error)(
                f"step {step} of {self._dir.url} is damaged ({hint}): {error}"
            ) from error
        coord = None
        what = f"setting aside step {step} of {self._dir.url}"
        if not self._read_only and _distributed.is_multi_process():
            coord = _distributed.Coordinator(
                f"set aside {self._dir.url} {step}", self._barrier_timeout_s
            )
            coord.barrier("damaged", what)  # every process is done reading the step
        kept = ""
        if not self._read_only and self._leader:  # it must stop being the latest step
            moved = self._engine.wait_for(self._engine.submit(self._set_aside, step))
            kept = f"; it is kept for inspection as {moved.name}"
        if coord is not None:
            coord.barrier("moved", what)  # the others list the steps after it was moved
            self._follow()
        log.warning(
            "asyncckpt: step %d of %s is damaged, restoring step %d instead (fall_back=True)%s: %s",
            step,
            self._dir.url,
            earlier[-1],
            kept,
            error,
        )
        return earlier[-1]

    def last_save_stats(self) -> SaveStats | None:
        """Timings by phase (blocking, snapshot, write, commit, retention) and bytes of the last
        committed save; None before the first. Also logged at debug level and reported as
        `jax.monitoring` events (`/asyncckpt/save/...`) once its retention has run."""
        with self._mutex:
            return self._last_save

    def last_restore_stats(self) -> RestoreStats | None:
        """Timings by phase (plan, read, place) and bytes of the last restore; None before the
        first."""
        return self._engine.last_restore

    # -- preemption ----------------------------------------------------------------------------

    def reached_preemption(self, step: int) -> bool:
        """True once SIGTERM was received (or `notify_preemption()` called): save now and exit.

        Call it every step. Under `jax.distributed` it is JAX's preemption sync point: true at
        the same step in every process, after any of them received SIGTERM."""
        return self._watch.reached(_check_step(step))

    def notify_preemption(self) -> None:
        """Act as if SIGTERM had been received (for schedulers that warn another way)."""
        self._watch.notify()

    # -- lifecycle -----------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Block until the last save is committed and retention (file removal included) is done;
        raise the first background failure. (The files of a deleted step that the next save
        writes over stay: `reuse_deleted_files`.)"""
        self._engine.wait_until_finished()
        while job := self._take(self._jobs, done_only=False):
            self._engine.wait_for(job)
        while cleanup := self._take(self._cleanups, done_only=False):
            cleanup.result()

    def check_for_errors(self) -> None:
        """Raise the first failure of a finished background save, retention or deletion."""
        self._engine.check_for_errors()
        self._check_background()

    def _check_background(self) -> None:
        for futures in (self._jobs, self._cleanups):
            while done := self._take(futures, done_only=True):
                done.result()

    def _take(self, futures: list[Future[Any]], *, done_only: bool) -> Future[Any] | None:
        """Take the oldest (finished, with `done_only`) future off one of the manager's lists."""
        with self._mutex:
            for i, future in enumerate(futures):
                if future.done() or not done_only:
                    return futures.pop(i)
        return None

    def close(self) -> None:
        """Wait for the work in flight, then release the threads, host memory, lock and handler."""
        if self._engine.closed:
            return
        try:
            self.wait_until_finished()
            if (spare := self._pop_spare()) is not None:
                self._remove_files(spare[1], spare[0])
                self.wait_until_finished()
        finally:
            self._engine.close()
            self._watch.close()
            if self._lock is not None:
                self._lock.release()
            if self._local is not None:
                self._local.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self._dir.url!r}, steps={_steps_text(self.all_steps())})"

    # -- helpers -------------------------------------------------------------------------------

    def _path(self, step: int) -> Storage:
        return _directory.step_storage(self._dir, step)

    def _committed(self) -> list[int]:
        with self._mutex:
            return sorted(self._infos)

    def _in_flight(self) -> int | None:
        """The step being saved, until it is recorded (the job after its save) or its save
        failed: a failure is raised to the caller as soon as the save fails, maybe before the
        job after it ran, and the failed step may then be saved again at once."""
        with self._mutex:
            saving = self._saving
        if saving is None:
            return None
        step, saved, recorded = saving
        if recorded.done() or (saved.done() and (saved.cancelled() or saved.exception())):
            return None
        return step

    def _settle(self) -> None:
        """Wait until the saves made so far are committed and recorded (their retention jobs
        done), so that the step list is current; failures are left for the next `save`,
        `wait_until_finished` or `check_for_errors`."""
        with self._mutex:
            jobs = list(self._jobs)
        for job in jobs:
            self._engine.wait_done(job)

    def _last_step(self, steps: list[int]) -> int | None:
        """The newest of the committed `steps` and the step in flight."""
        pending = self._in_flight()
        candidates = steps + ([pending] if pending is not None else [])
        return max(candidates) if candidates else None

    def _existing(self, step: int) -> int:
        step = _check_step(step)
        steps = self.all_steps()
        if step not in steps:
            raise StepNotFoundError(
                f"step {step} is not in {self._dir.url}; committed steps: {_steps_text(steps)}"
            )
        return step

    def _read_info(self, step: int) -> StepInfo:
        try:
            root = _restore.read_root(self._path(step))
        except CheckpointError as e:
            log.warning(
                "asyncckpt: cannot read step %d for retention (treated as having no "
                "time or metrics): %s",
                step,
                e,
            )
            return StepInfo(step, math.nan, None)
        return StepInfo(step, root.created, root.metrics)

    def _check_writable(self, what: str) -> None:
        if self._engine.closed:
            raise ClosedError(
                f"this CheckpointManager of {self._dir.url} is closed; open a new one"
            )
        if self._read_only:
            raise ReadOnlyError(
                f"cannot {what}: this CheckpointManager of {self._dir.url} was "
                "opened with read_only=True"
            )
