"""CheckpointManager: steps, interval, retention, reopening, locking, preemption."""

import logging
import math
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import UrlPath, abstract, assert_same, names, read_file, write_file
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac
from asyncckpt import _manager, _snapshot
from asyncckpt._storage import open_storage


def state_at(step, mesh=None):
    w = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8) + step
    if mesh is not None:
        w = jax.device_put(w, NamedSharding(mesh, P("x", "y")))
    return {"w": w, "b": np.full(3, step, np.int64), "step": step}


def saved_steps(directory):
    """The step folders (or prefixes) that exist, committed or not."""
    try:
        return sorted(int(n) for n in names(directory) if n.isdigit())
    except FileNotFoundError:
        return []


def test_save_restore_latest_and_by_step(root, mesh):
    with ac.CheckpointManager(root) as mgr:
        assert mgr.latest_step() is None and mgr.all_steps() == []
        for step in (0, 1, 2):
            assert mgr.save(step, state_at(step, mesh)) is True
        mgr.wait_until_finished()
        assert mgr.all_steps() == [0, 1, 2] and mgr.latest_step() == 2
        target = abstract(state_at(0, mesh))
        latest = mgr.restore(target=target)
        assert latest["step"] == 2 and latest["w"].sharding == target["w"].sharding
        assert_same(latest["w"], state_at(2)["w"])
        assert_same(mgr.restore(1)["b"], state_at(1)["b"])
    # each step is an ordinary checkpoint
    assert_same(ac.restore(root / "1")["w"], state_at(1)["w"])


def test_restore_waits_for_the_step_in_flight(root):
    with ac.CheckpointManager(root) as mgr:
        mgr.save(5, state_at(5))
        assert_same(mgr.restore(5)["w"], state_at(5)["w"])


def test_interval_and_first_step(root):
    with ac.CheckpointManager(root, save_interval_steps=10) as mgr:
        assert mgr.should_save(3)  # the first save into an empty directory
        saved = [s for s in range(3, 35) if mgr.save(s, {"s": s})]
        mgr.wait_until_finished()
        assert saved == [3, 10, 20, 30] and mgr.all_steps() == saved
        assert not mgr.should_save(30) and not mgr.should_save(25) and mgr.should_save(40)
        assert mgr.save(33, {"s": 33}, force=True) is True  # force ignores the interval
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 10, 20, 30, 33]


def test_older_step_is_skipped_with_a_warning(root, caplog):
    with ac.CheckpointManager(root) as mgr:
        mgr.save(10, {"s": 10})
        with caplog.at_level("WARNING", logger="asyncckpt"):
            assert mgr.save(4, {"s": 4}) is False
        assert "step 4 not saved: it is older than step 10" in caplog.text


def test_existing_step_needs_force(root):
    with ac.CheckpointManager(root) as mgr:
        mgr.save(7, {"v": np.zeros(4)})
        with pytest.raises(ac.CheckpointExistsError, match=r"step 7 already exists .*force=True"):
            mgr.save(7, {"v": np.ones(4)})  # still in flight: refused too
        mgr.wait_until_finished()
        with pytest.raises(ac.CheckpointExistsError, match="step 7 already exists"):
            mgr.save(7, {"v": np.ones(4)})
        assert mgr.save(7, {"v": np.ones(4)}, force=True)
        mgr.wait_until_finished()
        assert_same(mgr.restore(7)["v"], np.ones(4))
        assert mgr.all_steps() == [7]


def test_missing_step_lists_the_steps_that_exist(root):
    with ac.CheckpointManager(root) as mgr:
        with pytest.raises(ac.CheckpointNotFoundError, match="holds no committed step yet"):
            mgr.restore()
        for s in (1, 2, 4):
            mgr.save(s, {"s": s})
        mgr.wait_until_finished()
        with pytest.raises(ac.StepNotFoundError, match=r"step 3 is not in .*steps: 1, 2, 4$"):
            mgr.restore(3)
        with pytest.raises(FileNotFoundError):  # the builtin still catches it
            mgr.metrics(3)
        with pytest.raises(ac.StepNotFoundError, match="step 3"):
            mgr.delete(3)


def test_metrics_and_metadata_round_trip_with_non_finite_values(root):
    metrics = {
        "loss": jnp.float32(0.25),
        "acc": np.float64(0.5),
        "nan": float("nan"),
        "inf": -math.inf,
        "n": 3,
        "name": "eval",
        "per_task": [1.0, float("inf")],
    }
    with ac.CheckpointManager(root) as mgr:
        mgr.save(1, {"x": np.zeros(2)}, metrics=metrics, metadata={"config": {"lr": 0.1}})
    with ac.CheckpointManager(root) as mgr:  # reopened: read from disk
        got = mgr.metrics(1)
        assert got["loss"] == 0.25 and got["acc"] == 0.5 and math.isnan(got["nan"])
        assert got["inf"] == -math.inf and got["n"] == 3 and got["name"] == "eval"
        assert got["per_task"] == [1.0, math.inf]
        assert mgr.metadata(1) == {"config": {"lr": 0.1}}
        assert abs(mgr.step_info(1).time - time.time()) < 60


def test_bad_metrics_are_refused_before_anything_is_written(root):
    with ac.CheckpointManager(root) as mgr:
        with pytest.raises(ac.UnsupportedTypeError, match=r"step 1 .*metric 'loss' is a ndarray"):
            mgr.save(1, {"x": np.zeros(2)}, metrics={"loss": np.zeros(3)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [] and saved_steps(root) == []


def test_best_step_ignores_nan_and_keep_best_keeps_best_k_plus_newest(root):
    losses = {1: 0.5, 2: float("nan"), 3: 0.2, 4: 0.9, 5: 0.3, 6: float("nan"), 7: 0.8}
    with ac.CheckpointManager(root, best_metric="loss", keep_best=2) as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"s": step}, metrics={"loss": loss})
            mgr.wait_until_finished()
        assert mgr.best_step() == 3
        assert mgr.all_steps() == [3, 5, 7]  # best two, plus the newest
        assert saved_steps(root) == [3, 5, 7]
    with ac.CheckpointManager(root, best_metric="loss", best_mode="max") as mgr:
        assert mgr.best_step() == 7  # no keep_best: ranking only, nothing deleted


def test_max_to_keep_with_keep_every_n_steps(root):
    with ac.CheckpointManager(root, max_to_keep=2, keep_every_n_steps=5) as mgr:
        for step in range(1, 13):
            mgr.save(step, state_at(step))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [5, 10, 11, 12] == saved_steps(root)
        for step in mgr.all_steps():
            assert_same(mgr.restore(step)["w"], state_at(step)["w"])


def test_keep_every_n_hours_continues_from_saved_times_after_reopen(root, monkeypatch):
    clock = {"now": 1.7e9}
    monkeypatch.setattr(_snapshot.time, "time", lambda: clock["now"])

    def run(steps):
        with ac.CheckpointManager(root, max_to_keep=1, keep_every_n_hours=2) as mgr:
            for step in steps:
                clock["now"] += 3600  # one step an hour
                mgr.save(step, {"s": step})
            mgr.wait_until_finished()
            return mgr.all_steps()

    assert run([1, 2, 3, 4]) == [1, 3, 4]  # hours 1 and 3 kept, plus the newest
    # a new process: the schedule goes on from the times stored in the steps
    assert run([5, 6, 7]) == [1, 3, 5, 7]


def test_retention_deletes_in_the_background_and_never_blocks_save(tmp_path, monkeypatch):
    gate = threading.Event()
    real_remove = _manager._directory.remove

    def slow_remove(path, step):
        gate.wait(30)
        real_remove(path, step)

    monkeypatch.setattr(_manager._directory, "remove", slow_remove)
    # (with reuse_deleted_files, the default, step 3 would write over step 1's files instead)
    mgr = ac.CheckpointManager(tmp_path, max_to_keep=1, reuse_deleted_files=False)
    mgr.save(1, state_at(1))
    mgr.save(2, state_at(2))
    mgr.save(3, state_at(3))  # returns while step 1's files are still being removed
    mgr._settle()  # the saves and their retention are done, not the removal of files
    assert mgr.all_steps() == [3] and saved_steps(tmp_path) == [3]  # out of the listing at once
    assert any(".asyncckpt-deleting-" in n for n in os.listdir(tmp_path))
    gate.set()
    mgr.wait_until_finished()  # waits for the removal too
    assert sorted(os.listdir(tmp_path)) == [".asyncckpt.lock", "3"]
    mgr.close()


def test_a_failed_deletion_is_raised_and_names_the_committed_step(root, monkeypatch):
    def refuse(directory, step):
        raise PermissionError(13, "Permission denied", directory.path(str(step)))

    with ac.CheckpointManager(root, max_to_keep=1) as mgr:
        mgr.save(1, {"s": 1})
        mgr.wait_until_finished()
        monkeypatch.setattr(_manager._directory, "start_delete", refuse)
        mgr.save(2, {"s": 2})
        with pytest.raises(
            ac.CheckpointWriteError, match="step 2 was committed to .*could not delete an old step"
        ):
            mgr.wait_until_finished()
        monkeypatch.undo()
        assert mgr.all_steps() == [1, 2]


def test_explicit_delete(root):
    with ac.CheckpointManager(root) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, {"s": s})
        mgr.delete(2)  # waits for the saves in flight, then removes step 2 from the listing
        assert mgr.all_steps() == [1, 3]
        mgr.wait_until_finished()
        assert saved_steps(root) == [1, 3]  # the files of step 2 are gone too


def test_reopen_lists_steps_and_removes_leftovers(tmp_path):
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"s": 1}, metrics={"loss": 1.5})
    # what a crash leaves behind: a half-written save and a half-done deletion
    (tmp_path / ".2.asyncckpt-tmp-0123456789ab" / "w").mkdir(parents=True)
    (tmp_path / ".2.asyncckpt-tmp-0123456789ab" / "w" / "zarr.json").write_text("{}")
    (tmp_path / ".0.asyncckpt-deleting-ba9876543210").mkdir()
    (tmp_path / "notes.txt").write_text("mine")  # foreign files are left alone
    (tmp_path / "9").mkdir()  # a folder without a tmp_path zarr.json is not a step
    with ac.CheckpointManager(tmp_path, read_only=True) as reader:
        assert reader.all_steps() == [1]  # leftovers are never listed, even before clean-up
    with ac.CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1] and mgr.metrics(1) == {"loss": 1.5}
        assert sorted(os.listdir(tmp_path)) == [".asyncckpt.lock", "1", "9", "notes.txt"]


def test_second_writer_is_refused_and_read_only_follows_the_writer(tmp_path):
    writer = ac.CheckpointManager(tmp_path)
    with pytest.raises(
        ac.CheckpointError, match=rf"another CheckpointManager \(pid {os.getpid()} .*read_only=True"
    ):
        ac.CheckpointManager(tmp_path)
    reader = ac.CheckpointManager(tmp_path, read_only=True)
    assert reader.latest_step() is None
    writer.save(4, {"s": 4})
    writer.wait_until_finished()
    assert reader.latest_step() == 4 and reader.restore()["s"] == 4
    with pytest.raises(ac.CheckpointError, match="read_only=True"):
        reader.save(5, {"s": 5})
    with pytest.raises(ac.CheckpointError, match="read_only=True"):
        reader.delete(4)
    writer.close()
    reader.close()
    with ac.CheckpointManager(tmp_path) as again:  # the lock is released on close
        assert again.all_steps() == [4]
    with pytest.raises(ac.CheckpointNotFoundError, match="read_only=True does not create"):
        ac.CheckpointManager(tmp_path / "missing", read_only=True)


def test_closed_manager_refuses_saves(root):
    mgr = ac.CheckpointManager(root)
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(ac.CheckpointError, match="is closed"):
        mgr.save(1, {})


@pytest.mark.parametrize("job_delay_s", [0.0, 0.3])
def test_background_failure_is_raised_by_the_next_save(root, monkeypatch, job_delay_s):
    """The failed step may be saved again at once, also while the job after its save (on
    another thread) has not run yet: CI once caught that race as 'step 1 already exists'."""
    from asyncckpt._manager import CheckpointManager
    from asyncckpt._storage import Storage

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    after_save, write_chunk = CheckpointManager._after_save, Storage.write_chunk

    def late(self, *args, **kwargs):
        time.sleep(job_delay_s)
        return after_save(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "_after_save", late)
    with ac.CheckpointManager(root) as mgr:
        monkeypatch.setattr(Storage, "write_chunk", broken)
        mgr.save(1, {"x": np.zeros(4)})
        with pytest.raises(ac.CheckpointWriteError, match="No space left"):
            mgr.save(2, {"x": np.zeros(4)})
        monkeypatch.setattr(Storage, "write_chunk", write_chunk)
        assert mgr.save(1, {"x": np.ones(4)})  # the failed step can be saved again
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1]


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"keep_best": 2}, ValueError, "keep_best needs best_metric"),
        ({"best_metric": "loss", "best_mode": "lowest"}, ValueError, "best_mode"),
        ({"save_interval_steps": 0}, ValueError, "save_interval_steps"),
        (
            {"max_to_keep": 0},
            ValueError,
            r"max_to_keep .* got 0; to keep every step, leave "
            r"max_to_keep=None .*'keep every step' and Orbax as 'keep",
        ),
        (
            {"keep_best": 0, "best_metric": "loss"},
            ValueError,
            r"keep_best .* got 0; to rank steps without deleting any, give best_metric and leave "
            r"keep_best=None",
        ),
        (
            {"max_to_keep": -1},
            ValueError,
            r"max_to_keep / KeepLastN.n must be an int >= 1, got -1$",
        ),
        ({"retention": [object()]}, TypeError, "has no keep"),
    ],
)
def test_bad_arguments(root, kwargs, err, match):
    with pytest.raises(err, match=match):
        ac.CheckpointManager(root, **kwargs)
    with ac.CheckpointManager(root) as mgr:  # a refused manager left no lock behind
        for bad in (-1, 1.5, "3", True):
            with pytest.raises((TypeError, ValueError), match="step must"):
                mgr.save(bad, {})


def test_sigterm_is_caught_and_forces_the_next_save(root):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with ac.CheckpointManager(root, save_interval_steps=100) as mgr:
            mgr.save(100, {"s": 100})
            assert not mgr.reached_preemption(101) and not mgr.save(101, {"s": 101})
            os.kill(os.getpid(), signal.SIGTERM)  # the process keeps running
            assert mgr.reached_preemption(102)
            assert calls == [signal.SIGTERM]  # the previous handler was still called
            assert mgr.should_save(102) and mgr.save(102, {"s": 102})  # off-interval, forced
            mgr.wait_until_finished()
            assert mgr.all_steps() == [100, 102]
        handler = signal.getsignal(signal.SIGTERM)
        assert handler is not None and handler.__name__ == "<lambda>"  # ours was removed
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_save_on_preemption_false_leaves_sigterm_alone(root):
    before = signal.getsignal(signal.SIGTERM)
    with ac.CheckpointManager(root, save_on_preemption=False) as mgr:
        assert signal.getsignal(signal.SIGTERM) == before
        mgr.notify_preemption()
        assert mgr.reached_preemption(1)


def run_python(code, timeout=120):
    """Run `code` in a fresh interpreter (signals and forks stay out of the test process)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("order", ["first-in-first-out", "last-in-first-out"])
def test_sigterm_terminates_again_once_every_manager_is_closed(tmp_path, order):
    """Issue 21: two managers closed first-in-first-out left the closed one's handler, which
    swallowed SIGTERM (the process went on and exited 0)."""
    close = "a.close(); b.close()" if order == "first-in-first-out" else "b.close(); a.close()"
    proc = run_python(
        f"""
import os, signal, time
import asyncckpt as ac
a = ac.CheckpointManager({str(tmp_path / "a")!r})
b = ac.CheckpointManager({str(tmp_path / "b")!r})
os.kill(os.getpid(), signal.SIGTERM)  # caught while they are open: both see it
assert a.reached_preemption(1) and b.reached_preemption(1)
{close}
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("survived SIGTERM")
"""
    )
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert "survived" not in proc.stdout


def test_a_forked_worker_inherits_neither_the_lock_nor_the_sigterm_handler(tmp_path):
    """Issue 21: a multiprocessing worker forked while a manager was open kept its lock (the
    next writer was refused) and ran asyncckpt's SIGTERM handler instead of ending."""
    proc = run_python(
        f"""
import multiprocessing, signal, time
import asyncckpt as ac
mgr = ac.CheckpointManager({str(tmp_path / "run")!r})
worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
worker.start()
mgr.close()
with ac.CheckpointManager({str(tmp_path / "run")!r}) as again:  # the lock went with close()
    again.save(1, {{"s": 1}})
worker.terminate()
worker.join(20)
print("worker exit", worker.exitcode)
"""
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"worker exit {-signal.SIGTERM}" in proc.stdout, proc.stdout + proc.stderr


def test_the_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    """The holder is SIGKILLed while a worker it forked lives on: the next writer gets in."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import multiprocessing, time
import asyncckpt as ac
mgr = ac.CheckpointManager({str(tmp_path / "run")!r})
worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
worker.start()
print(worker.pid, flush=True)
time.sleep(60)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait(20)
        with ac.CheckpointManager(tmp_path / "run") as mgr:
            mgr.save(1, {"s": 1})
    finally:
        os.kill(worker, signal.SIGKILL)
        holder.stdout.close()


def _hold_the_lock_unrecorded(directory):
    """Take `directory`'s writer lock the way a manager does, stopped before it records who it
    is: the moment a second writer can lose the race and find no holder (or a dead one's)."""
    import fcntl

    fd = os.open(os.path.join(directory, ".asyncckpt.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _record_holder(fd, pid):
    import json
    import socket

    record = {"pid": pid, "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def test_a_writer_that_loses_the_lock_race_still_names_the_holder(tmp_path):
    """Issue 21: the loser read the lock file before the winner wrote its pid and host into it,
    and was refused naming nobody, or the dead writer that held the lock before."""
    import socket
    import subprocess

    run = tmp_path / "run"
    ac.CheckpointManager(run).close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    fd = _hold_the_lock_unrecorded(run)
    try:
        _record_holder(fd, dead.pid)  # a crashed writer's record, not yet replaced
        timer = threading.Timer(0.3, _record_holder, (fd, os.getpid()))
        timer.start()
        with pytest.raises(
            ac.DirectoryLockedError,
            match=rf"\(pid {os.getpid()} on {socket.gethostname()}, since .*read_only=True",
        ):
            ac.CheckpointManager(run)
    finally:
        timer.cancel()
        timer.join()
        os.close(fd)


def test_a_holder_that_never_records_itself_is_called_unknown(tmp_path):
    run = tmp_path / "run"
    ac.CheckpointManager(run).close()
    fd = _hold_the_lock_unrecorded(run)
    try:
        os.ftruncate(fd, 0)
        lock_file = os.path.join(run, ".asyncckpt.lock")
        with pytest.raises(
            ac.DirectoryLockedError,
            match=rf"pid and host unknown: it has not recorded them in {lock_file} .*"
            rf"`fuser -v {lock_file}` names it.*read_only=True",
        ):
            ac.CheckpointManager(run)
    finally:
        os.close(fd)


def test_a_writer_racing_a_closing_one_gets_the_lock(tmp_path):
    """The holder lets go while the loser waits for its record: the loser takes the lock."""
    run = tmp_path / "run"
    ac.CheckpointManager(run).close()
    fd = _hold_the_lock_unrecorded(run)
    timer = threading.Timer(0.3, os.close, (fd,))
    timer.start()
    with ac.CheckpointManager(run) as mgr:
        mgr.save(1, {"s": 1})
    timer.join()


def _topdir_flag(path):
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, 0x80086601, buf)  # FS_IOC_GETFLAGS
        return bool(int.from_bytes(buf[:4], "little") & 0x00020000)  # FS_TOPDIR_FL
    finally:
        os.close(fd)


def test_writer_marks_its_directory_as_a_top_of_hierarchies(tmp_path):
    """On ext2/3/4 a writing manager sets `chattr +T` on its directory, so each step lands in a
    block group of its own (see _storage.local.spread_subdirectories); a reader changes nothing."""
    probe = tmp_path / "probe"
    probe.mkdir()
    from asyncckpt._storage.local import spread_subdirectories

    if not spread_subdirectories(str(probe)):
        pytest.skip("the file system under tmp_path has no FS_TOPDIR_FL (not ext2/3/4)")
    assert _topdir_flag(probe)
    (tmp_path / "ro").mkdir()
    ac.CheckpointManager(tmp_path / "ro", read_only=True).close()
    assert not _topdir_flag(tmp_path / "ro")
    with ac.CheckpointManager(tmp_path / "rw") as mgr:
        mgr.save(1, {"x": np.ones(3)})
    assert _topdir_flag(tmp_path / "rw")
    with ac.CheckpointManager(tmp_path / "rw", read_only=True) as reader:
        assert reader.all_steps() == [1]


# ------------------------------------------------------------ what outside test suites found


def _damage(path):
    """Flip one byte of a file or object."""
    data = bytearray(read_file(path))
    data[7] ^= 0x40
    write_file(path, bytes(data))


def _remove_step(directory, step):
    """Delete a step the way a user would, behind the manager's back."""
    path = directory / str(step)
    if isinstance(directory, UrlPath):
        open_storage(path).remove()
    else:
        shutil.rmtree(path)


def test_fall_back_moves_the_damaged_step_aside_and_the_run_goes_on(root, caplog):
    with ac.CheckpointManager(root) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.full(8, float(step)), "step": step})
    _damage(root / "3" / "w" / "c.0")
    with ac.CheckpointManager(root) as mgr:
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            back = mgr.restore(fall_back=True)
        assert back["step"] == 2
        moved = [n for n in names(root) if n.startswith("3.damaged-")]
        assert len(moved) == 1 and f"kept for inspection as {moved[0]}" in caplog.text
        # the damaged step is no longer a step: the run saves 3 again, then goes on
        assert mgr.all_steps() == [1, 2] and mgr.latest_step() == 2 and mgr.should_save(3)
        assert mgr.save(3, {"w": np.full(8, 30.0), "step": 3})
        assert mgr.save(4, {"w": np.full(8, 40.0), "step": 4})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2, 3, 4]
        assert_same(mgr.restore(3)["w"], np.full(8, 30.0))
    with ac.CheckpointManager(root, max_to_keep=1) as mgr:  # never listed, counted or deleted
        assert mgr.all_steps() == [1, 2, 3, 4]
        mgr.save(5, {"w": np.full(8, 50.0), "step": 5})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [5]
    assert moved[0] in names(root)  # still there for a look: asyncckpt verify/show read it
    with pytest.raises(ac.CorruptCheckpointError, match="checksum mismatch"):
        ac.verify(root / moved[0])


def test_a_read_only_manager_falls_back_without_moving_anything(root):
    with ac.CheckpointManager(root) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": np.full(8, float(step)), "step": step})
    _damage(root / "2" / "w" / "c.0")
    with ac.CheckpointManager(root, read_only=True) as reader:
        assert reader.restore(fall_back=True)["step"] == 1
        assert reader.all_steps() == [1, 2]
    assert [n for n in names(root) if not n.startswith(".")] == ["1", "2"]


def test_a_step_deleted_behind_the_managers_back_is_dropped(root, caplog):
    with ac.CheckpointManager(root, max_to_keep=2) as mgr:
        mgr.save(1, {"s": 1})
        mgr.save(2, {"s": 2})
        mgr.wait_until_finished()
        _remove_step(root, 1)
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            for step in (3, 4, 5):
                mgr.save(step, {"s": step})
            mgr.wait_until_finished()
        assert mgr.all_steps() == [4, 5] and saved_steps(root) == [4, 5]
        _remove_step(root, 4)
        with pytest.raises(ac.StepNotFoundError, match=r"step 4 is not in .*steps: 5$"):
            mgr.delete(4)
        assert mgr.all_steps() == [5]
        with pytest.raises(ac.StepNotFoundError, match="step 1 is not in"):
            mgr.delete(1)


def test_should_save_is_false_on_a_read_only_manager(root):
    with ac.CheckpointManager(root) as mgr:
        mgr.save(1, {"s": 1})
    with ac.CheckpointManager(root, read_only=True) as reader:
        assert not reader.should_save(2) and not reader.should_save(1000)


def test_threads_checking_for_errors_while_retention_deletes(tmp_path):
    """The manager's list of file removals in flight is shared by the job thread (retention
    adds to it) and every caller thread (which take finished ones off): it is changed under the
    manager's lock (three polling threads hit `list.remove` of a removed entry before)."""
    errors = []
    with ac.CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        stop = threading.Event()

        def poll():
            try:
                while not stop.is_set():
                    mgr.check_for_errors()
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=poll) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for step in range(1, 150):
                mgr.save(step, {"x": np.full(4, step)})
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert errors == []
    assert saved_steps(tmp_path) == [149]


FOREIGN_GROUP = b'{"attributes": {}, "zarr_format": 3, "node_type": "group"}'


def test_a_foreign_zarr_group_named_like_a_step_is_never_a_step(root, caplog):
    """Issue 21: a Zarr group another program saved as `<dir>/3` was listed as step 3, blocked
    `save(2)` as older, and was deleted by max_to_keep."""
    from asyncckpt._storage import open_storage

    foreign = open_storage(os.fspath(root / "run" / "3"))
    foreign.make_dirs([""])
    foreign.write("zarr.json", FOREIGN_GROUP)
    with caplog.at_level("WARNING", logger="asyncckpt"):
        with ac.CheckpointManager(root / "run", max_to_keep=1) as mgr:
            assert mgr.all_steps() == [] and mgr.latest_step() is None
            assert mgr.save(2, {"v": np.zeros(4)})  # not "older than step 3"
            mgr.save(4, {"v": np.ones(4)})
            mgr.save(5, {"v": np.ones(4)})
            mgr.wait_until_finished()
            assert mgr.all_steps() == [5]
    assert foreign.read_small("zarr.json", 1 << 20) == FOREIGN_GROUP  # left alone
    assert "holds a Zarr group that asyncckpt did not write" in caplog.text


def test_a_listing_racing_a_commit_and_a_deletion_still_sees_a_step(tmp_path, monkeypatch):
    """Issue 21: a read-only manager restoring in a loop beside a writer with max_to_keep=1
    sometimes found no step at all: it listed [5, .6-tmp], then the writer committed 6 and
    deleted 5, then it checked 5. Here that happens exactly between the listing and the check."""
    from asyncckpt import _directory
    from asyncckpt._storage import local, open_storage

    run = tmp_path / "run"
    with ac.CheckpointManager(run) as mgr:
        mgr.save(5, {"s": 5})
    staged = run / ".6.asyncckpt-tmp-0123456789ab"
    shutil.copytree(run / "5", staged)  # a complete save of step 6, not yet renamed
    real = local.LocalStorage.checkpoint_states
    raced = []

    def racing(self, names):
        if not raced:  # the writer commits 6 and deletes 5 right after the reader listed
            raced.append(True)
            os.rename(staged, run / "6")
            os.rename(run / "5", run / ".5.asyncckpt-deleting-0123456789ab")
        return real(self, names)

    monkeypatch.setattr(local.LocalStorage, "checkpoint_states", racing)
    assert _directory.committed_steps(open_storage(str(run))) == [6]


def test_what_a_reader_would_refuse_is_never_committed(tmp_path, monkeypatch):
    """Issue 21: 300 MiB of metadata (or ~650k leaves) made a root document over the 256 MiB
    readers accept, and the writer committed it as the latest step, which then failed to
    restore. Here the limit is made small: metadata too large is refused at save(); a tree
    whose root document would be too large fails in the background with nothing committed."""
    from asyncckpt import _format

    monkeypatch.setattr(_format, "MAX_ROOT_DOC_BYTES", 64 << 10)
    with ac.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": np.zeros(3)})
        with pytest.raises(ac.CheckpointWriteError, match=r"`metadata` is \d+ bytes of JSON"):
            mgr.save(2, {"w": np.zeros(3)}, metadata="x" * (40 << 10))
        mgr.save(3, {f"leaf{i:04d}": np.zeros(1) for i in range(400)})
        with pytest.raises(ac.CheckpointWriteError, match="root document would be .* bytes"):
            mgr.wait_until_finished()
        assert mgr.all_steps() == [1]
        assert mgr.restore()["w"].shape == (3,)
