"""Retention policies are pure functions of the step list: property tests."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt._retention import steps_to_delete

HOUR = 3600.0

metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.none(), st.integers(-5, 5)
)


@st.composite
def histories(draw, max_size=30):
    """Increasing steps with non-decreasing save times and an optional `loss` metric."""
    gaps = draw(st.lists(st.integers(1, 7), min_size=1, max_size=max_size))
    hours = draw(st.lists(st.floats(0, 3), min_size=len(gaps), max_size=len(gaps)))
    losses = draw(st.lists(metric_values, min_size=len(gaps), max_size=len(gaps)))
    infos, step, t = [], 0, 1.7e9
    for gap, h, loss in zip(gaps, hours, losses):
        step += gap
        t += h * HOUR
        infos.append(ac.StepInfo(step, t, None if loss is None else {"loss": loss}))
    return infos


policies = st.lists(
    st.one_of(
        st.builds(ac.KeepLastN, st.integers(1, 5)),
        st.builds(ac.KeepEveryNSteps, st.integers(1, 10)),
        st.builds(ac.KeepEveryNHours, st.floats(0.5, 5)),
        st.builds(ac.KeepBest, st.integers(1, 4), st.just("loss"), st.sampled_from(["min", "max"])),
    ),
    min_size=1,
    max_size=4,
)


@given(histories())
def test_keep_last_n_keeps_the_highest_steps(infos):
    for n in (1, 3, 100):
        kept = ac.KeepLastN(n).keep(infos)
        assert kept == {i.step for i in infos[-n:]}


@given(histories(), st.integers(1, 10))
def test_keep_every_n_steps_keeps_exactly_the_multiples(infos, n):
    assert ac.KeepEveryNSteps(n).keep(infos) == {i.step for i in infos if i.step % n == 0}


@given(histories(), st.floats(0.5, 5))
def test_keep_every_n_hours_spacing_and_coverage(infos, hours):
    kept = sorted(ac.KeepEveryNHours(hours).keep(infos))
    times = {i.step: i.time for i in infos}
    assert kept[0] == infos[0].step
    for a, b in zip(kept, kept[1:]):  # kept steps are at least `hours` apart ...
        assert times[b] - times[a] >= hours * HOUR
    for info in infos:  # ... and every step is within `hours` after the last kept one before it
        anchor = max(k for k in kept if k <= info.step)
        assert info.step == anchor or info.time - times[anchor] < hours * HOUR


@given(histories(), st.integers(1, 4), st.sampled_from(["min", "max"]))
def test_keep_best_keeps_the_best_finite_values(infos, k, mode):
    policy = ac.KeepBest(k, "loss", mode)
    kept = policy.keep(infos)
    value = {i.step: (i.metrics or {}).get("loss") for i in infos}
    finite = {s for s, v in value.items() if v is not None and math.isfinite(v)}
    assert kept <= finite  # NaN, infinities and missing values never win
    assert len(kept) == min(k, len(finite))
    sign = 1 if mode == "min" else -1
    for s in kept:
        for other in finite - kept:
            assert sign * value[s] <= sign * value[other]


@given(histories(), policies)
def test_incremental_retention_never_loses_a_step_a_policy_keeps(infos, pols):
    """Steps arrive one at a time and retention runs after each, as in the manager. At the end,
    every step that some policy keeps over the *whole* history is still there, and so is the
    newest; deletion happens only with a limiting policy."""
    alive: list[ac.StepInfo] = []
    for info in infos:
        alive.append(info)
        doomed = set(steps_to_delete(alive, pols, protect=[info.step]))
        assert info.step not in doomed
        alive = [i for i in alive if i.step not in doomed]
    steps = {i.step for i in alive}
    assert infos[-1].step in steps
    for policy in pols:
        assert policy.keep(infos) <= steps, policy
    if not any(p.limits for p in pols):
        assert steps == {i.step for i in infos}
    elif all(isinstance(p, ac.KeepLastN) for p in pols):
        assert len(steps) == min(len(infos), max(p.n for p in pols))


def test_protective_policies_alone_delete_nothing():
    infos = [ac.StepInfo(s, 1.7e9 + s, None) for s in range(1, 20)]
    assert steps_to_delete(infos, [ac.KeepEveryNSteps(5), ac.KeepEveryNHours(1)]) == []
    assert steps_to_delete(infos, []) == []
    assert steps_to_delete(infos, [ac.KeepLastN(2), ac.KeepEveryNSteps(5)]) == [
        s for s in range(1, 18) if s % 5
    ]


def test_keep_best_with_a_function_and_ties_go_to_the_newer_step():
    infos = [ac.StepInfo(s, 0.0, {"acc": a}) for s, a in [(1, 0.5), (2, 0.9), (3, 0.9), (4, 0.1)]]
    assert ac.KeepBest(1, "acc", "max").keep(infos) == {3}
    assert ac.KeepBest(2, lambda m: -m["acc"]).keep(infos) == {2, 3}


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: ac.KeepLastN(0), "max_to_keep"),
        (lambda: ac.KeepLastN(True), "max_to_keep"),
        (lambda: ac.KeepEveryNSteps(0), "keep_every_n_steps"),
        (lambda: ac.KeepEveryNHours(-1), "keep_every_n_hours"),
        (lambda: ac.KeepEveryNHours(float("nan")), "keep_every_n_hours"),
        (lambda: ac.KeepBest(0, "loss"), "keep_best"),
        (lambda: ac.KeepBest(1, "loss", "smallest"), "best_mode"),
        (lambda: ac.KeepBest(1, 3), "best_metric"),
    ],
)
def test_bad_policy_arguments_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
