"""Retention policies: pure functions from the committed steps to the steps worth keeping.

A policy looks at every committed step (number, save time, metrics) and returns the steps it
wants kept. The manager keeps the union over its policies plus the newest step, and deletes the
rest, but only if at least one policy *limits* the count (`KeepLastN`, `KeepBest`); the others
(`KeepEveryNHours`, `KeepEveryNSteps`) only protect steps, as `keep_checkpoint_every_n_hours` did
in `tf.train.Saver`. With no limiting policy nothing is ever deleted.

Every policy here is stable under retention: a step it keeps over the whole history is still kept
after the steps it did not want were deleted along the way (tested with hypothesis).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a retention policy knows of one committed step."""

    step: int
    time: float
    """When the step was saved (seconds since the epoch, from the checkpoint itself)."""
    metrics: Mapping[str, Any] | None = None


class RetentionPolicy(Protocol):
    """Anything with `keep(steps) -> set of step numbers`; `limits` says whether it bounds the
    number of checkpoints (True) or only protects some of them (False)."""

    @property
    def limits(self) -> bool: ...

    def keep(self, steps: Sequence[StepInfo]) -> set[int]: ...


def check_count(value: Any, what: str, zero_hint: str = "") -> None:
    """`value` must be an int >= 1; `zero_hint` says what to write instead of 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        hint = f"; {zero_hint}" if value == 0 and zero_hint else ""
        raise ValueError(f"{what} must be an int >= 1, got {value!r}{hint}")


_ZERO_IS_AMBIGUOUS = (
    "0 is refused because tf.train.Saver reads it as 'keep every step' and Orbax as 'keep none'"
)


def _positive(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class KeepLastN:
    """Keep the `n` highest steps."""

    n: int
    limits: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_count(
            self.n,
            "max_to_keep / KeepLastN.n",
            "to keep every step, leave max_to_keep=None (the default); " + _ZERO_IS_AMBIGUOUS,
        )

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return set(sorted(s.step for s in steps)[-self.n :])


@dataclass(frozen=True, slots=True)
class KeepEveryNSteps:
    """Keep every step divisible by `n` (Orbax's `keep_period`)."""

    n: int
    limits: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_count(self.n, "keep_every_n_steps")

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {s.step for s in steps if s.step % self.n == 0}


@dataclass(frozen=True, slots=True)
class KeepEveryNHours:
    """Keep one step every `hours`: the oldest step, then each first step saved at least `hours`
    after the previous kept one (`keep_checkpoint_every_n_hours` of `tf.train.Saver`). Times come
    from the checkpoints, so a restarted job continues the schedule."""

    hours: float
    limits: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _positive(self.hours, "keep_every_n_hours")

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        kept: set[int] = set()
        anchor = -math.inf
        for s in sorted(steps, key=lambda s: s.step):
            if s.time - anchor >= self.hours * 3600.0:
                kept.add(s.step)
                anchor = s.time
        return kept


def metric_value(
    metrics: Mapping[str, Any] | None, metric: str | Callable[..., Any]
) -> float | None:
    """The finite value of `metric` in `metrics`, or None (missing, not a number, NaN or inf)."""
    if metrics is None:
        return None
    try:
        raw = metric(metrics) if callable(metric) else metrics.get(metric)
        value = None if raw is None or isinstance(raw, (bool, str, bytes)) else float(raw)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class KeepBest:
    """Keep the `k` steps with the best finite value of `metric` (a key of the metrics dict, or a
    function of it); `mode="min"` or `"max"`. Steps without a finite value (missing, NaN, inf)
    are never among the best. Ties go to the newer step."""

    k: int
    metric: str | Callable[[Mapping[str, Any]], Any]
    mode: Literal["min", "max"] = "min"
    limits: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_count(
            self.k,
            "keep_best / KeepBest.k",
            "to rank steps without deleting any, give best_metric and leave "
            "keep_best=None (best_step() still answers); " + _ZERO_IS_AMBIGUOUS,
        )
        if self.mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.mode!r}")
        if not (callable(self.metric) or isinstance(self.metric, str)):
            raise ValueError(
                f"best_metric must be a metric name or a function, got {self.metric!r}"
            )

    def ranked(self, steps: Sequence[StepInfo]) -> list[int]:
        """Steps with a finite metric, best first."""
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [
            (sign * v, -s.step)
            for s in steps
            if (v := metric_value(s.metrics, self.metric)) is not None
        ]
        return [-neg_step for _, neg_step in sorted(scored)]

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return set(self.ranked(steps)[: self.k])


def steps_to_delete(
    steps: Sequence[StepInfo], policies: Sequence[RetentionPolicy], protect: Sequence[int] = ()
) -> list[int]:
    """The steps that no policy keeps, oldest first. The highest step and `protect` always stay;
    nothing is deleted unless some policy limits the count."""
    if not steps or not any(getattr(p, "limits", True) for p in policies):
        return []
    kept = {max(s.step for s in steps), *protect}
    for policy in policies:
        kept |= policy.keep(steps)
    return sorted(s.step for s in steps if s.step not in kept)


def policies_from(
    max_to_keep: int | None,
    keep_every_n_hours: float | None,
    keep_every_n_steps: int | None,
    best_metric: Any,
    best_mode: Any,
    keep_best: int | None,
    retention: Sequence[RetentionPolicy],
) -> list[RetentionPolicy]:
    """The policies a manager's keyword arguments stand for, after `retention`."""
    policies = list(retention)
    if max_to_keep is not None:
        policies.append(KeepLastN(max_to_keep))
    if keep_every_n_hours is not None:
        policies.append(KeepEveryNHours(keep_every_n_hours))
    if keep_every_n_steps is not None:
        policies.append(KeepEveryNSteps(keep_every_n_steps))
    if keep_best is not None:
        if best_metric is None:
            raise ValueError(
                "keep_best needs best_metric: the metric name (or function of the "
                "metrics dict) to rank steps by"
            )
        policies.append(KeepBest(keep_best, best_metric, best_mode))
    elif best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    for p in policies:
        if not callable(getattr(p, "keep", None)):
            raise TypeError(f"retention policy {p!r} has no keep(steps) method")
    return policies
