"""Per-save and per-restore statistics: from the manager, the debug log and jax.monitoring."""

import logging

import jax
import jax.monitoring
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac


@pytest.fixture
def events():
    """Every jax.monitoring duration and scalar event whose name starts with /asyncckpt/."""
    seen = []

    def on_duration(name, seconds, **_):
        if name.startswith("/asyncckpt/"):
            seen.append((name, seconds))

    def on_scalar(name, value, **_):
        if name.startswith("/asyncckpt/"):
            seen.append((name, value))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_scalar_listener(on_scalar)
    yield seen
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_scalar_listener(on_scalar)


def tree(mesh):
    return {
        "w": jax.device_put(np.ones((64, 32), np.float32), NamedSharding(mesh, P("x", "y"))),
        "b": np.arange(10, dtype=np.int64),
    }


def test_manager_save_and_restore_stats(tmp_path, mesh, events, caplog):
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    state = tree(mesh)
    with ac.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        assert mgr.last_save_stats() is None and mgr.last_restore_stats() is None
        mgr.save(1, state)
        mgr.save(2, state)  # waits for step 1, then retention deletes it after step 2 commits
        mgr.wait_until_finished()
        stats = mgr.last_save_stats()
        assert (stats.path, stats.step, stats.arrays) == (str(tmp_path / "2"), 2, 2)
        assert stats.bytes == 64 * 32 * 4 + 10 * 8
        phases = [
            stats.wait_previous_s,
            stats.snapshot_s,
            stats.write_s,
            stats.commit_s,
            stats.retention_s,
        ]
        assert all(p >= 0 for p in phases)
        assert stats.wait_previous_s + stats.snapshot_s <= stats.blocking_s
        assert (
            stats.blocking_s + stats.write_s + stats.commit_s + stats.retention_s <= stats.total_s
        )
        assert stats.retention_s > 0  # step 1 was deleted

        mgr.restore(2, state)
        r = mgr.last_restore_stats()
        assert (r.path, r.step, r.arrays, r.bytes) == (str(tmp_path / "2"), 2, 2, stats.bytes)
        assert r.plan_s + r.read_s + r.place_s <= r.total_s

    names = {name for name, _ in events}
    for phase in ("blocking", "wait_previous", "snapshot", "write", "commit", "retention", "total"):
        assert f"/asyncckpt/save/{phase}_duration_secs" in names
    for phase in ("plan", "read", "place", "total"):
        assert f"/asyncckpt/restore/{phase}_duration_secs" in names
    assert ("/asyncckpt/save/bytes", float(stats.bytes)) in events
    assert ("/asyncckpt/restore/bytes", float(stats.bytes)) in events
    logged = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"asyncckpt: save of {tmp_path / '2'} (step 2, 2 arrays") for m in logged
    )
    assert any(
        m.startswith(f"asyncckpt: restore of {tmp_path / '2'} (step 2, 2 arrays") for m in logged
    )


def test_checkpointer_stats_and_failed_save(tmp_path, mesh):
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save(tmp_path / "a", tree(mesh)).result()
        first = ckptr.last_save_stats()
        assert first.step is None and first.retention_s == 0.0
        (tmp_path / "b").write_text("a file in the way")
        with pytest.raises(ac.CheckpointExistsError):
            ckptr.save(tmp_path / "b", tree(mesh))
        assert ckptr.last_save_stats() is first  # a failed save leaves no statistics
        ckptr.restore(tmp_path / "a")
        assert ckptr.last_restore_stats().bytes == first.bytes


def test_a_failing_listener_does_not_fail_the_save(tmp_path, mesh, caplog):
    def broken(name, seconds, **_):
        if name.startswith("/asyncckpt/"):
            raise RuntimeError("listener bug")

    jax.monitoring.register_event_duration_secs_listener(broken)
    try:
        ac.save(tmp_path / "a", tree(mesh))
    finally:
        jax.monitoring.unregister_event_duration_listener(broken)
    assert ac.restore(tmp_path / "a")["b"].tolist() == list(range(10))
    assert "a jax.monitoring listener failed on the save of" in caplog.text
