"""Timings and byte counts of saves and restores, by phase.

Each finished save or restore yields one frozen record. It is logged on the `asyncckpt` logger at
debug level, reported to `jax.monitoring` (durations as `/asyncckpt/save/<phase>_duration_secs`,
byte counts as the scalar `/asyncckpt/save/bytes`; the same under `/asyncckpt/restore/`), and kept
as `last_save_stats()` / `last_restore_stats()` by the checkpointer or manager that did the work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import jax

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True, slots=True)
class SaveStats:
    """One committed save, as this process saw it. Times are seconds of wall-clock time."""

    path: str
    step: int | None
    """The manager's step; None for a save by path."""
    created: float
    """When the snapshot was taken (seconds since the epoch): the checkpoint's save time."""
    arrays: int
    bytes: int
    """Array bytes this process wrote (under `jax.distributed`: its own shards)."""
    blocking_s: float
    """Time inside `save()`: what the training loop waited for (both terms below, and checks)."""
    wait_previous_s: float
    """Part of `blocking_s` spent waiting for the previous save to commit."""
    snapshot_s: float
    """Part of `blocking_s` spent copying arrays to host memory (device-to-host)."""
    write_s: float
    """Background: writing documents and chunks (under `jax.distributed`, with the barriers)."""
    commit_s: float
    """Background: the root document, syncing the file system, the atomic rename."""
    retention_s: float
    """Background: the manager's retention after the commit (0 for a save by path)."""
    total_s: float
    """From the call of `save()` until the step was committed and retention done."""
    reused_bytes: int = 0
    """Part of `bytes` not written: chunks whose content the step before already held, linked
    or copied from it (a `CheckpointManager` with `incremental=True`)."""


@dataclass(frozen=True, slots=True)
class RestoreStats:
    """One restore, as this process saw it. Times are seconds of wall-clock time."""

    path: str
    step: int | None
    arrays: int
    bytes: int
    """Array bytes read from storage (only the chunks this process's devices need)."""
    plan_s: float
    """Reading the root document, matching the target, allocating host buffers."""
    read_s: float
    """Reading and checksumming chunks."""
    place_s: float
    """Handing the host buffers to devices (`device_put`)."""
    total_s: float


class Phases:
    """Accumulates named durations: `with phases("read"): ...` adds to `phases["read"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes = 0
        self.arrays = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def __getitem__(self, name: str) -> float:
        return self.seconds.get(name, 0.0)

    def __call__(self, name: str) -> _Timer:
        return _Timer(self, name)


class _Timer:
    def __init__(self, phases: Phases, name: str) -> None:
        self._phases, self._name = phases, name

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._phases.add(self._name, time.perf_counter() - self._t0)


def report(kind: str, stats: SaveStats | RestoreStats) -> None:
    """Log `stats` at debug level and report them to `jax.monitoring` (`kind`: save/restore).
    A failing listener is logged, never raised: the save or restore itself succeeded."""
    fields = dataclasses.asdict(stats)
    try:
        for name, value in fields.items():
            if name.endswith("_s"):
                jax.monitoring.record_event_duration_secs(
                    f"/asyncckpt/{kind}/{name[:-2]}_duration_secs", value
                )
        record_scalar = getattr(jax.monitoring, "record_scalar", None)  # newer JAX only
        if record_scalar is not None:
            record_scalar(f"/asyncckpt/{kind}/bytes", float(stats.bytes))
    except Exception:
        log.warning(
            "asyncckpt: a jax.monitoring listener failed on the %s of %s",
            kind,
            stats.path,
            exc_info=True,
        )
    if log.isEnabledFor(logging.DEBUG):
        times = ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in fields.items() if k.endswith("_s"))
        step = "" if stats.step is None else f"step {stats.step}, "
        log.debug(
            "asyncckpt: %s of %s (%s%d arrays, %.1f MiB): %s",
            kind,
            stats.path,
            step,
            stats.arrays,
            stats.bytes / 2**20,
            times,
        )
