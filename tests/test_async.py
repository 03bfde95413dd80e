"""The async contract: save() returns after the snapshot; failures reach the caller."""

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac


@pytest.fixture
def held_writer(monkeypatch):
    """Chunk writes wait until the test sets the returned event: what the caller does right
    after `save` returns happens before any byte of the checkpoint is written."""
    from asyncckpt._storage import Storage

    release = threading.Event()
    original = Storage.write_chunk

    def held(*args):
        assert release.wait(60), "the test never released the writer"
        return original(*args)

    monkeypatch.setattr(Storage, "write_chunk", held)
    return release


def _state(mesh):
    sharding = NamedSharding(mesh, P("x", "y"))
    return {
        "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding),
        "big": jax.device_put(
            jnp.arange(1 << 21, dtype=jnp.float32).reshape(1024, 2048), sharding
        ),  # banded chunks
        "b": jnp.ones(8),
        "k": jax.random.key(3),
    }


def test_donating_arrays_right_after_save_keeps_old_values(tmp_path, mesh, held_writer):
    state = _state(mesh)
    expected = jax.tree.map(np.array, {k: v for k, v in state.items() if k != "k"})
    expected_key = np.array(jax.random.key_data(state["k"]))
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), donate_argnums=0)
    numeric = {k: v for k, v in state.items() if k != "k"}
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ck", state)
        new_state = jax.block_until_ready(step(numeric))  # donated while nothing is written
        del numeric, state
        garbage = [jnp.full((1024, 2048), 7.0) + i for i in range(4)]  # reuses freed memory
        jax.block_until_ready(garbage)
        held_writer.set()
    back = ac.restore(tmp_path / "ck")
    for name in expected:
        assert_same(back[name], expected[name])
    np.testing.assert_array_equal(jax.random.key_data(back["k"]), expected_key)
    assert (np.asarray(new_state["w"]) == -1).all()


def test_deleting_arrays_right_after_save_keeps_old_values(tmp_path, mesh, held_writer):
    state = _state(mesh)
    expected = np.array(state["big"])
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ck", state)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        jax.block_until_ready([jnp.full((1024, 2048), 7.0) + i for i in range(4)])
        held_writer.set()
    assert_same(ac.restore(tmp_path / "ck")["big"], expected)


def test_a_committed_save_holds_nothing_of_the_callers_arrays(tmp_path, mesh):
    """Once a save has committed, donating the arrays really donates them: the snapshot let go of
    every view of their buffers."""
    state = {k: v for k, v in _state(mesh).items() if k != "k"}
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 2, s), donate_argnums=0)
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ck", state).result(timeout=60)
        jax.block_until_ready(step(state))
        assert all(x.is_deleted() for x in jax.tree.leaves(state))


def test_mutating_numpy_leaves_after_save_does_not_change_checkpoint(tmp_path):
    x = np.arange(10.0)
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ck", {"x": x})
        x[:] = -1
    assert_same(ac.restore(tmp_path / "ck")["x"], np.arange(10.0))


def test_save_returns_a_future_of_the_committed_path(tmp_path):
    with ac.AsyncCheckpointer() as ckptr:
        fut = ckptr.save(tmp_path / "ck", {"x": np.ones(3)})
        assert fut.result(timeout=60) == str(tmp_path / "ck")
        assert (tmp_path / "ck" / "zarr.json").exists()


def _spy_writes(monkeypatch, delay_on_writers=0.0):
    """Record the thread of every chunk write; writes on the background writer threads take
    `delay_on_writers` seconds longer (a machine whose CPU training keeps busy)."""
    from asyncckpt._storage import Storage

    threads = []
    original = Storage.write_chunk

    def spy(*args):
        name = threading.current_thread().name
        threads.append(name)
        if name.startswith("asyncckpt-write"):
            time.sleep(delay_on_writers)
        return original(*args)

    monkeypatch.setattr(Storage, "write_chunk", spy)
    return threads


def test_writing_happens_off_the_callers_thread(tmp_path, monkeypatch):
    threads = _spy_writes(monkeypatch)
    with ac.AsyncCheckpointer(durable_within_s=None) as ckptr:
        future = ckptr.save(tmp_path / "ck", {f"x{i}": np.ones(1000) for i in range(50)})
        while not future.done():  # the caller goes on without waiting for the save
            time.sleep(0.01)
    assert len(threads) == 50 and all(t.startswith("asyncckpt-write") for t in threads)


def test_small_files_are_written_by_one_thread_that_a_waiting_caller_leaves_alone(
    tmp_path, monkeypatch
):
    """Thousands of small files are Python's work more than the disk's: one writer thread takes
    them (two only hand the GIL to each other), and a caller that waits for the save joins in
    only if that thread stalls (`STALL_S`; here never), while large chunks go to every writer."""
    from asyncckpt import _executor

    monkeypatch.setattr(_executor, "STALL_S", 60.0)
    threads = _spy_writes(monkeypatch, delay_on_writers=0.002)
    small = {f"x{i}": np.full(1024, i, np.float32) for i in range(300)}
    with ac.AsyncCheckpointer(max_workers=8) as ckptr:
        ckptr.save(tmp_path / "small", small)
        ckptr.wait_until_finished()
        assert len(threads) == 300 and len(set(threads)) == 1, set(threads)
        assert threads[0].startswith("asyncckpt-write")
        threads.clear()
        large = {f"y{i}": np.full(1 << 18, i, np.float32) for i in range(16)}  # 1 MiB each
        ckptr.save(tmp_path / "large", large)
        ckptr.wait_until_finished()
        assert len(threads) == 16 and len(set(threads)) > 1, set(threads)
    for path, tree in ((tmp_path / "small", small), (tmp_path / "large", large)):
        back = ac.restore(path)
        for name, value in tree.items():
            assert_same(back[name], value)


@pytest.mark.parametrize("within", [1.0, None])
def test_a_save_is_paced_by_a_writer_at_the_callers_priority_to_be_durable_within_its_time(
    tmp_path, monkeypatch, within
):
    """Idle-priority writers on a CPU that training keeps busy (each write 0.1 s slower): the
    caller never waits, yet the pacing thread, at the caller's priority, writes what keeps the
    save on a line to 80% of `durable_within_s`: spread over that time, not all at once, and
    done soon after it; where the process may (root here) writers raised meanwhile are idle
    again once the save is done. With None the idle writers write everything."""
    threads = _spy_writes(monkeypatch, delay_on_writers=0.1)
    tree = {f"x{i}": np.full(16384, i, np.float32) for i in range(64)}
    times = []
    from asyncckpt._storage import Storage

    spy = Storage.write_chunk

    idle = getattr(os, "SCHED_IDLE", None)

    def policy(tid=0):
        return os.sched_getscheduler(tid) if idle is not None else None

    def timed(*args):
        times.append((time.perf_counter(), threading.current_thread().name, policy()))
        return spy(*args)

    monkeypatch.setattr(Storage, "write_chunk", timed)
    with ac.AsyncCheckpointer(durable_within_s=within) as ckptr:
        t0 = time.perf_counter()
        future = ckptr.save(tmp_path / "a", tree)
        while not future.done():  # a training loop: never waits inside asyncckpt
            time.sleep(0.01)
        took = time.perf_counter() - t0
        paced = [t - t0 for t, name, _ in times if name.startswith("asyncckpt-pace")]
        if within is None:
            assert not paced and all(n.startswith("asyncckpt-write") for n in threads)
            assert all(p == idle for _, _, p in times)
        else:
            assert len(paced) > len(threads) // 2, threads
            # on the line (25% due at 0.2 s, all at 0.8 s): spread out, yet done in time
            assert sum(t - t0 < 0.2 for t, _, _ in times) <= 0.4 * len(tree), sorted(paced)
            assert max(paced) > 0.4 and took < within + 3, (sorted(paced), took)
            if idle is not None:  # the pacing thread has the caller's policy, not idle
                pacer = next(t for t in threading.enumerate() if t.name.startswith("asyncckpt-pa"))
                assert policy(pacer.native_id) == policy() != idle
                deadline = time.monotonic() + 5  # raised writers are idle again once it is done
                writer_ids = [
                    t.native_id for t in threading.enumerate() if t.name.startswith("asyncckpt-w")
                ]
                while any(policy(tid) != idle for tid in writer_ids):
                    assert time.monotonic() < deadline, "the writers stayed at normal priority"
                    time.sleep(0.01)
    back = ac.restore(tmp_path / "a")
    for name, value in tree.items():
        assert_same(back[name], value)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_threads_of_others_carrying_a_save_get_the_writers_priority_and_are_raised_with_them():
    """jaxlib's transfer threads carry a local step's copies to peers on CPU (`_transfer`):
    adopted, they run at the background writers' priority, and where the process may raise
    priorities (root here) a save that falls behind its pace with nothing left to take raises
    them with the writers until it is done."""
    from asyncckpt._executor import Workers

    stop = threading.Event()
    foreign = threading.Thread(target=stop.wait)  # stands in for a thread jaxlib started
    foreign.start()
    workers = Workers(2, background_nice="idle", durable_within_s=0.2)
    try:
        assert os.sched_getscheduler(foreign.native_id) != os.SCHED_IDLE
        workers.adopt({foreign.native_id})
        assert os.sched_getscheduler(foreign.native_id) == os.SCHED_IDLE
        if os.geteuid() != 0:
            return
        done = threading.Event()
        save = workers.submit_save(done.wait, 30)  # a save still in flight past its line
        deadline = time.monotonic() + 10
        while os.sched_getscheduler(foreign.native_id) == os.SCHED_IDLE:
            assert time.monotonic() < deadline, "the adopted thread was not raised"
            time.sleep(0.01)
        done.set()
        save.result(timeout=10)
        while os.sched_getscheduler(foreign.native_id) != os.SCHED_IDLE:
            assert time.monotonic() < deadline, "the adopted thread stayed raised"
            time.sleep(0.01)
    finally:
        stop.set()
        foreign.join()
        workers.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread niceness")
@pytest.mark.parametrize("within", [None, 0.0])
def test_background_threads_get_the_callers_niceness_plus_background_nice(within):
    """Pool threads are started by whichever thread first gives them work (the writers by the
    job thread, itself lowered): each gets the niceness of the thread that made the workers
    plus `background_nice`, not that added to a lowered niceness it inherited; and where the
    pacing thread raises them (root here, with a line that ends at once), the same again once
    the save is done."""
    from asyncckpt._executor import Workers

    caller = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = min(19, caller + 5)
    workers = Workers(4, background_nice=5, durable_within_s=within)
    tids: dict[str, int] = {}
    during: dict[str, int] = {}

    def task():
        name = threading.current_thread().name
        if not name.startswith("asyncckpt-pace"):  # (at the caller's priority, by design)
            tids[name] = threading.get_native_id()
            during[name] = os.getpriority(os.PRIO_PROCESS, 0)
        time.sleep(0.02)

    def save():
        tids["job"] = threading.get_native_id()
        during["job"] = os.getpriority(os.PRIO_PROCESS, 0)
        workers.expect(4)
        workers.run_all([task] * 4, background=True, costs=[1] * 4)

    def niceness() -> dict[str, int]:
        return {name: os.getpriority(os.PRIO_PROCESS, tid) for name, tid in tids.items()}

    try:
        for _ in range(2):
            during.clear()
            workers.submit_save(save).result(timeout=30)
            assert any(name.startswith("asyncckpt-write") for name in tids), tids
            if within is None:  # nothing raises them: as they were made
                assert during == dict.fromkeys(during, lowered), (during, lowered)
            deadline = time.monotonic() + 10  # (the pacing thread lowers what it raised)
            while niceness() != dict.fromkeys(tids, lowered):
                assert time.monotonic() < deadline, (niceness(), lowered)
                time.sleep(0.01)
    finally:
        workers.close()


def test_a_caller_interrupted_while_it_waits_for_tasks_starts_no_more_of_them():
    """A KeyboardInterrupt in `run_all` (Ctrl-C during a restore) stops the batch: the pool
    threads end the tasks they run and start no other for a caller who is gone."""
    import _thread

    from asyncckpt._executor import Workers

    workers = Workers(4, durable_within_s=None)
    ran: list[int] = []

    def task():
        time.sleep(0.05)
        ran.append(1)

    timer = threading.Timer(0.12, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            workers.run_all([task] * 200)
            time.sleep(30)  # (not reached: the interrupt lands in run_all's wait)
        time.sleep(0.5)  # the tasks running then end (4 threads: 80 tasks a second)
        settled = len(ran)
        time.sleep(0.5)
        assert len(ran) == settled < 40, (settled, len(ran))
    finally:
        timer.cancel()
        workers.close()


def test_a_save_whose_helping_caller_is_interrupted_as_a_task_ends_still_ends():
    """A KeyboardInterrupt on the main thread, helping a save in `help_until`, landing right
    after a task of it ended (here: in counting its progress): the batch still learns that the
    task ended, and the save's job does not wait for it for ever."""
    from asyncckpt import _executor
    from asyncckpt._executor import Workers

    count = _executor._Schedule.progress
    fired: list[int] = []

    def progress(self, cost):
        if threading.current_thread() is threading.main_thread() and not fired:
            fired.append(1)
            raise KeyboardInterrupt  # what a SIGINT arriving there raises
        count(self, cost)

    workers = Workers(2, background_nice=0, durable_within_s=10.0)
    try:
        _executor._Schedule.progress = progress  # type: ignore[method-assign]

        def save():
            workers.expect(64)
            workers.run_all([lambda: time.sleep(0.02)] * 64, background=True, costs=[1] * 64)

        future = workers.submit_save(save)
        with pytest.raises(KeyboardInterrupt):
            workers.help_until(future)
        assert fired
        future.result(timeout=30)
    finally:
        _executor._Schedule.progress = count  # type: ignore[method-assign]
        workers.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_object_store_reads_that_a_caller_waits_for_run_at_its_priority(monkeypatch):
    """A restore from an object store waits on its requests: they run at the caller's
    priority, not on the idle-priority threads that write saves in the background (beside a
    busy training loop such a restore would wait for spare CPU time); the writes stay idle."""
    from asyncckpt._storage.objects import ObjectStorage

    seen: list[tuple[str, str, int]] = []
    get, put = ObjectStorage.get, ObjectStorage.write

    def spy(what, real):
        def call(self, *args, **kwargs):
            name = threading.current_thread().name
            seen.append((what, name, os.sched_getscheduler(0)))
            return real(self, *args, **kwargs)

        return call

    monkeypatch.setattr(ObjectStorage, "get", spy("read", get))
    monkeypatch.setattr(ObjectStorage, "write", spy("write", put))
    tree = {f"x{i}": np.full(4096, i, np.float32) for i in range(16)}
    with ac.CheckpointManager(f"memory://priority/{os.urandom(4).hex()}") as mgr:
        mgr.save(1, tree)
        mgr.wait_until_finished()
        back = mgr.restore(1)
    for name, value in tree.items():
        assert_same(back[name], value)
    reads = [policy for what, name, policy in seen if what == "read" and "-net" in name]
    writes = [policy for what, name, policy in seen if what == "write" and "-net" in name]
    assert reads and writes, seen
    assert os.SCHED_IDLE not in reads and set(writes) == {os.SCHED_IDLE}, seen


def test_durable_within_s_is_checked_and_urgent_after_s_is_read_as_it_with_a_warning(tmp_path):
    for bad in (-1, "soon", True, float("nan")):
        with pytest.raises(ValueError, match="durable_within_s must be a number of seconds"):
            ac.AsyncCheckpointer(durable_within_s=bad)
    with pytest.warns(DeprecationWarning, match="urgent_after_s is deprecated: use durable_wi"):
        ckptr = ac.AsyncCheckpointer(urgent_after_s=0.5)
    with ckptr:
        assert ckptr._engine.workers.durable_within_s == 0.5
    with pytest.warns(DeprecationWarning, match="urgent_after_s is deprecated") as record:
        mgr = ac.CheckpointManager(tmp_path / "m", urgent_after_s=None)
    assert record[0].filename == __file__  # the warning names the caller's line
    with mgr:
        assert mgr._engine.workers.durable_within_s is None


@pytest.mark.parametrize("wait", ["wait_until_finished", "save", "close"])
def test_a_caller_that_waits_for_a_save_writes_too(tmp_path, monkeypatch, wait):
    """Background writers run at idle priority; when the caller has to wait for their save it
    takes the writes left on its own thread instead of waiting on a busy CPU."""
    threads = _spy_writes(monkeypatch, delay_on_writers=0.1)
    tree = {f"x{i}": np.full(16384, i, np.float32) for i in range(64)}  # 5 tasks of 13
    ckptr = ac.AsyncCheckpointer()
    try:
        ckptr.save(tmp_path / "a", tree)
        if wait == "save":
            ckptr.save(tmp_path / "b", {"y": np.ones(3)})
        getattr(ckptr, "wait_until_finished" if wait != "close" else "close")()
    finally:
        ckptr.close()
    assert threading.current_thread().name in threads
    assert sum(t == threading.current_thread().name for t in threads) > len(threads) // 2
    back = ac.restore(tmp_path / "a")
    for name, value in tree.items():
        assert_same(back[name], value)


def test_background_priority_is_checked():
    for bad in (-1, 20, "low", True, 2.5):
        with pytest.raises(ValueError, match="background_nice must be 'idle' or a niceness"):
            ac.AsyncCheckpointer(background_nice=bad)


def _fail_writes(monkeypatch):
    from asyncckpt._storage import Storage

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Storage, "write_chunk", broken)


@pytest.mark.parametrize("raised_by", ["wait_until_finished", "save", "close", "check_for_errors"])
def test_background_failure_is_raised_on_callers_thread(tmp_path, monkeypatch, raised_by):
    ckptr = ac.AsyncCheckpointer()
    _fail_writes(monkeypatch)
    fut = ckptr.save(tmp_path / "ck1", {"x": np.ones(4)})
    fut.exception(timeout=60)
    monkeypatch.undo()
    with pytest.raises(ac.CheckpointWriteError, match=r"'x'.*No space left on device"):
        if raised_by == "save":
            ckptr.save(tmp_path / "ck2", {"x": np.ones(4)})
        else:
            getattr(ckptr, raised_by)()
    ckptr.close()
    assert not (tmp_path / "ck1").exists()  # nothing committed ...
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # ... or left over


def test_failure_is_raised_once_then_saving_works_again(tmp_path, monkeypatch):
    with ac.AsyncCheckpointer() as ckptr:
        _fail_writes(monkeypatch)
        ckptr.save(tmp_path / "ck1", {"x": np.ones(4)})
        with pytest.raises(ac.CheckpointWriteError):
            ckptr.wait_until_finished()
        monkeypatch.undo()
        ckptr.save(tmp_path / "ck2", {"x": np.ones(4)})
    assert_same(ac.restore(tmp_path / "ck2")["x"], np.ones(4))


def test_blocking_save_raises_background_failure(tmp_path, monkeypatch):
    _fail_writes(monkeypatch)
    with pytest.raises(ac.CheckpointWriteError, match="No space left"):
        ac.save(tmp_path / "ck", {"x": np.ones(4)})
    assert os.listdir(tmp_path) == []


def test_many_saves_in_a_row_commit_in_order(tmp_path):
    with ac.AsyncCheckpointer() as ckptr:
        futs = [ckptr.save(tmp_path / f"ck{i}", {"x": np.full(1000, i)}) for i in range(5)]
    assert [f.result() for f in futs] == [str(tmp_path / f"ck{i}") for i in range(5)]
    for i in range(5):
        assert_same(ac.restore(tmp_path / f"ck{i}")["x"], np.full(1000, i))


def test_closed_checkpointer_refuses_work(tmp_path):
    ckptr = ac.AsyncCheckpointer()
    ckptr.close()
    ckptr.close()  # idempotent
    with pytest.raises(ac.CheckpointError, match="closed"):
        ckptr.save(tmp_path / "ck", {"x": np.ones(1)})


def test_a_snapshot_of_cpu_leaves_views_their_buffers_and_copies_the_rest(mesh):
    """On CPU devices the snapshot holds views of the arrays' own buffers (nothing is copied
    while the caller waits); key data and numpy leaves are copied. Values every process holds
    whole are process 0's to write: another process keeps them only as extra replicas for its
    node-local tier."""
    from asyncckpt._executor import Workers
    from asyncckpt._snapshot import ArenaPool, take_snapshot

    tree = {
        "one": jnp.arange(6.0).reshape(2, 3),
        "replicated": jax.device_put(jnp.arange(8, dtype=jnp.int32), NamedSharding(mesh, P())),
        "sharded": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("x"))),
        "key": jax.random.key(1),
        "host": np.arange(4, dtype=np.int16),
    }
    workers = Workers(2)
    try:
        for process, every in ((0, False), (1, False), (1, True)):
            snap = take_snapshot(
                tree, workers, ArenaPool(), process_index=process, every_replica=every
            )
            got = {a.spec.name: a for a in snap.arrays}
            for name in ("one", "replicated", "key", "host"):
                chunks = got[name].chunks if process == 0 else got[name].extra
                if process != 0:
                    assert got[name].chunks == []
                if process == 1 and not every:
                    assert chunks == []
                    continue
                assert [c for c, _ in chunks] == ([(0, 0)] if name == "one" else [(0,)])
                ((_, buf),) = chunks
                leaf = jax.random.key_data(tree[name]) if name == "key" else tree[name]
                assert np.array_equal(buf, np.asarray(leaf)) and buf.dtype == leaf.dtype
                if name != "key":  # its key data is a new array: nothing to share
                    viewed = name != "host"  # a numpy leaf is copied: the caller may change it
                    assert np.shares_memory(buf, np.asarray(leaf)) == viewed, name
            if process == 0:  # the replica-0 row blocks, views of their shards' buffers
                sharded = got["sharded"].chunks
                assert sorted(c for c, _ in sharded) == [(i, 0) for i in range(4)]
                for (row, _), buf in sharded:
                    want = np.asarray(tree["sharded"])[row * 2 : row * 2 + 2]
                    assert np.array_equal(buf, want) and not buf.flags.writeable
    finally:
        workers.close()
