"""The node-local tier of a CheckpointManager (`local_directory=`): frequent steps on each
host's own storage, restored before the persistent tier when the whole job holds them."""

import logging
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest
from conftest import abstract, assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))


def tree(mesh, step):
    value = np.arange(16 * 24, dtype=np.float32).reshape(16, 24) + step
    return {
        "w": jax.device_put(value, NamedSharding(mesh, P("x", "y"))),
        "b": jax.device_put(value[0], NamedSharding(mesh, P())),
        "host": np.full(3, step, np.int32),
        "step": step,
    }


def target(mesh):
    return abstract(tree(mesh, 0))


def check(got, mesh, step):
    want = tree(mesh, step)
    for k in ("w", "b"):
        assert_same(got[k], want[k])
        assert got[k].sharding == want[k].sharding
    np.testing.assert_array_equal(got["host"], want["host"])
    assert got["step"] == step


def manager(tmp_path, **kw):
    return ac.CheckpointManager(
        tmp_path / "persistent",
        save_interval_steps=4,
        local_directory=tmp_path / "local",
        local_max_to_keep=2,
        **kw,
    )


def test_local_steps_are_saved_often_kept_few_and_restored_first(tmp_path, mesh):
    with manager(tmp_path) as mgr:
        for step in range(1, 9):
            assert mgr.save(step, tree(mesh, step))
        assert not mgr.save(7, tree(mesh, 7))  # not newer than the newest step of either tier
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 4, 8]  # the first save, then every 4 steps
        assert mgr.local_steps() == [7, 8]
        assert mgr.latest_step() == 8
        assert sorted(os.listdir(tmp_path / "local")) == [".asyncckpt.lock", "7", "8"]
        check(mgr.restore(target=target(mesh)), mesh, 8)
        assert mgr.last_restore_stats().path.startswith(str(tmp_path / "local"))
        check(mgr.restore(4, target(mesh)), mesh, 4)  # only persistent
    # a restarted job finds the local steps again, and they win: step 8 of the persistent tier
    # (its chunks removed here) is not read
    for chunk in (tmp_path / "persistent" / "8" / "w").iterdir():
        chunk.unlink()
    with manager(tmp_path) as mgr:
        assert mgr.local_steps() == [7, 8] and mgr.latest_step() == 8
        check(mgr.restore(target=target(mesh)), mesh, 8)
        assert mgr.save(9, tree(mesh, 9))
        mgr.wait_until_finished()
        assert mgr.local_steps() == [8, 9] and mgr.all_steps() == [1, 4, 8]


def test_preemption_saves_the_next_step_to_both_tiers_at_once(tmp_path, mesh):
    """SIGTERM (or `notify_preemption()`): the next step is saved whatever the intervals, to the
    local tier (the fast way back) and to the persistent one."""
    with manager(tmp_path, local_save_interval_steps=50) as mgr:
        assert mgr.save(1, tree(mesh, 1))  # the first save: persistent only
        assert not mgr.save(2, tree(mesh, 2))  # due on neither tier
        mgr.notify_preemption()
        assert mgr.save(3, tree(mesh, 3))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 3] and mgr.local_steps() == [3]
    os.replace(tmp_path / "persistent", tmp_path / "away")  # step 3 comes from the local tier
    with ac.CheckpointManager(
        tmp_path / "persistent", local_directory=tmp_path / "local", local_max_to_keep=2
    ) as mgr:
        check(mgr.restore(target=target(mesh)), mesh, 3)
        assert mgr.last_restore_stats().path.startswith(str(tmp_path / "local"))


def test_a_local_part_is_not_a_checkpoint_by_itself(tmp_path, mesh):
    with manager(tmp_path) as mgr:
        mgr.save(1, tree(mesh, 1))
    with pytest.raises(ac.CheckpointError, match="part of a step of a node-local tier"):
        ac.restore(tmp_path / "local" / "1")


def test_lost_local_directory_falls_back_to_the_persistent_tier(tmp_path, mesh, caplog):
    with manager(tmp_path) as mgr:
        for step in range(1, 7):
            mgr.save(step, tree(mesh, step))
    shutil.rmtree(tmp_path / "local")  # the host was replaced
    with manager(tmp_path) as mgr:
        assert mgr.local_steps() == [] and mgr.latest_step() == 4
        check(mgr.restore(target=target(mesh)), mesh, 4)


def test_damaged_local_step_falls_back_and_says_why(tmp_path, mesh, caplog):
    with manager(tmp_path) as mgr:
        for step in range(1, 6):
            mgr.save(step, tree(mesh, step))
        mgr.wait_until_finished()
        chunk = tmp_path / "local" / "5" / "w" / "c.0.0"
        chunk.write_bytes(b"\0" * chunk.stat().st_size)
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            check(mgr.restore(target=target(mesh)), mesh, 4)
        assert "restoring step 4 from the persistent tier" in caplog.text
        assert "instead of local step 5" in caplog.text and "c.0.0" in caplog.text


def test_interrupted_local_save_leaves_debris_that_the_next_manager_removes(tmp_path, mesh):
    with manager(tmp_path) as mgr:
        mgr.save(1, tree(mesh, 1))
    debris = tmp_path / "local" / ".2.asyncckpt-tmp-0123456789ab"
    shutil.copytree(tmp_path / "local" / "1", debris)  # what a killed save leaves
    (debris / "zarr.json").unlink()
    with manager(tmp_path) as mgr:
        assert mgr.local_steps() == [1]
        assert not debris.exists()


def test_local_tier_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="local_max_to_keep"):
        ac.CheckpointManager(tmp_path / "p", local_directory=tmp_path / "l", local_max_to_keep=0)
    with pytest.raises(ValueError, match="local_replicas"):
        ac.CheckpointManager(tmp_path / "p", local_directory=tmp_path / "l", local_replicas=0)
    with pytest.raises(ValueError, match="read_only=True with local_directory"):
        ac.CheckpointManager(tmp_path / "p", local_directory=tmp_path / "l", read_only=True)
    with pytest.raises(ValueError, match="storage of this host"):
        ac.CheckpointManager(tmp_path / "p", local_directory="memory://x")


def test_transfers_bundle_small_buffers_and_give_each_device_one_send_a_round():
    """The plan of a `_collectives.move`: many small chunks for the same process travel in
    one bundle; no device sends or receives twice in a round; every move once, in order."""
    from types import SimpleNamespace

    from asyncckpt import _collectives
    from asyncckpt._collectives import BUNDLE_BYTES, Move

    devices = tuple(SimpleNamespace(process_index=i // 2) for i in range(8))  # 4 x 2
    moves = [Move(0, 1, f"{i}@small") for i in range(1000)]  # 1000 x 64 KiB
    moves += [Move(3, 1, f"{i}@big") for i in range(3)]  # 3 x 48 MiB
    moves += [Move(2, 0, "0@huge")]  # one larger than a bundle
    sizes = {"small": 64 << 10, "big": 48 << 20, "huge": 2 * BUNDLE_BYTES}

    def size(key):
        return sizes[key.partition("@")[2]]

    rounds = _collectives._bundle_rounds(moves, size, devices)
    carried = []
    for this in rounds:
        assert len({a for a, _, _ in this}) == len(this) == len({b for _, b, _ in this})
        for a, b, bundle in this:
            assert {(devices[a].process_index, devices[b].process_index)} == {
                (m.src, m.dst) for m in bundle
            }
            assert len(bundle) == 1 or sum(size(m.key) for m in bundle) <= BUNDLE_BYTES
            carried += bundle
    assert sorted(carried, key=moves.index) == moves and len(carried) == len(moves)
    assert len(rounds) == 2  # not 1000: the small ones fill one bundle


# -- 4 real processes on jax.distributed, each with its own local directory --------------------


def run(script_args, processes=4):
    from distributed import launch

    procs = launch("tier_child.py", processes, *script_args)
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    return procs, outputs


@pytest.mark.timeout(600)
def test_four_processes_restore_from_their_local_tiers_and_their_peers(tmp_path):
    """Fully sharded: each shard of the matrix is on one process, and on the next one's local
    tier too (local_replicas=2). Restarts, a kill during a local save, one and two lost hosts."""
    procs, outputs = run(["save", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [5, 6]" in out, out[-3000:]
    # the persistent tier's chunks are away: a restore that read them would fail
    matrix = tmp_path / "persistent" / "4" / "matrix"
    matrix.rename(tmp_path / "away")
    procs, outputs = run(["restore", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 6 from local" in out, out[-3000:]
    # process 1 is killed while writing its part of local step 7: nothing is committed
    procs, outputs = run(["die", str(tmp_path)])
    assert procs[1].returncode == -9
    for i in (0, 2, 3):
        # process 1 is named among those missing; a survivor that reached the barrier first
        # may name late survivors too (under load they can be more than the timeout behind)
        missing = re.search(r"processes \[([\d, ]+)\] of 4 did not arrive", outputs[i])
        assert missing and "1" in missing[1].split(", "), outputs[i][-3000:]
        assert str(i) not in missing[1].split(", "), outputs[i][-3000:]
        assert "listing ['.asyncckpt.lock', '5', '6']" in outputs[i], outputs[i][-3000:]
    assert any(".7.asyncckpt-tmp-" in n for n in os.listdir(tmp_path / "local-1"))
    # the restarted job restores local step 6; process 1's debris is gone
    procs, outputs = run(["restore", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 6 from local" in out, out[-3000:]
        assert "listing ['.asyncckpt.lock', '5', '6']" in out, out[-3000:]
    # a host replaced: process 2's local directory is empty. Its shards of the matrix were
    # copied to process 3 when saved (local_replicas=2), so process 3 sends them to it
    shutil.rmtree(tmp_path / "local-2")
    procs, outputs = run(["restore", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "local [5, 6]" in out, out[-3000:]
        assert "restored step 6 from local" in out, out[-3000:]
    assert "of local step 6 that this host (its part is gone) lacks from peers" in outputs[2]
    # the received chunks are restored from memory, not written: the next local save writes
    # a whole part again
    assert sorted(os.listdir(tmp_path / "local-2")) == [".asyncckpt.lock"]
    # two neighbouring hosts replaced: every copy of process 2's shards is gone, so the job
    # restores the persistent step, and says which shard no surviving part holds
    shutil.rmtree(tmp_path / "local-2")
    shutil.rmtree(tmp_path / "local-3")
    (tmp_path / "away").rename(matrix)
    procs, outputs = run(["restore", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "local []" in out, out[-3000:]
        assert "restored step 4 from persistent" in out, out[-3000:]
        assert (
            "processes [2, 3] lack their part, and no surviving part holds chunk (2, 0) of " in out
        )


@pytest.mark.timeout(600)
def test_a_replaced_host_gets_its_part_from_the_replicas_on_its_peers(tmp_path):
    """Data parallel: every process holds a replica of every shard. Process 2's local directory
    is wiped (a new host); the job restores the newest local step anyway, process 2's chunks
    sent by its peers through collectives, and the persistent tier is not read."""
    procs, outputs = run(["save", str(tmp_path), "dp"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [5, 6]" in out, out[-3000:]
    shutil.rmtree(tmp_path / "local-2")
    shutil.rmtree(tmp_path / "persistent" / "4")
    procs, outputs = run(["restore", str(tmp_path), "dp"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 6 from local" in out, out[-3000:]
    # the chunks came from both peers holding them, none from the persistent tier (step 4 is
    # gone from it); a next job recovers the same way
    assert "of local step 6 that this host (its part is gone) lacks from peers" in outputs[2]
    procs, outputs = run(["restore", str(tmp_path), "dp"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "local [5, 6]" in out, out[-3000:]
        assert "restored step 6 from local" in out, out[-3000:]
    # training goes on: the next local saves write process 2's whole parts again
    procs, outputs = run(["resume", str(tmp_path), "dp"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 8] local [7, 8]" in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / "local-2")) == [".asyncckpt.lock", "7", "8"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("copies", ["transfer server", "collectives"])
def test_copies_of_an_array_on_a_sub_mesh_survive_a_replaced_host(tmp_path, copies, monkeypatch):
    """An array on a mesh of two of the four processes is copied too (the ring reaches
    processes outside its mesh): on CPU through JAX's transfer server; through collectives
    (what accelerators use: round by round for it, beside the others' one program) when
    ASYNCCKPT_PEER_COPIES says so. A replaced host still gets every shard back from its peers."""
    if copies == "collectives":
        monkeypatch.setenv("ASYNCCKPT_PEER_COPIES", "collectives")
    procs, outputs = run(["save", str(tmp_path), "mixed"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [5, 6]" in out, out[-3000:]
    shutil.rmtree(tmp_path / "local-1")  # process 1 holds half of "sub"; process 2 its copy
    shutil.rmtree(tmp_path / "persistent" / "4")
    procs, outputs = run(["restore", str(tmp_path), "mixed"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 6 from local" in out, out[-3000:]
    assert "of local step 6 that this host (its part is gone) lacks from peers" in outputs[1]


@pytest.mark.timeout(600)
def test_copies_on_cpu_leave_after_save_returns_and_a_silent_peer_fails_only_that_step(tmp_path):
    """On CPU devices the copies to peers go through JAX's transfer server: `save()` returns
    before they are pulled (here 2 s late), the saved arrays may be donated and overwritten
    meanwhile, and the copies still hold the saved values (process 2's shards restored from
    process 3's copy after its directory is wiped); jaxlib's transfer threads run at the
    background writers' priority. A process that never sends its copies fails
    that local step everywhere after the deadline, naming itself; the steps before stay."""
    procs, outputs = run(["save", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [5, 6]" in out, out[-3000:]
    procs, outputs = run(["slow-peer", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [6, 7]" in out, out[-3000:]
        took, committed = map(float, re.findall(r"in ([0-9.]+) s", out)[:2])
        assert took < 1.0 and committed > 2.0, out[-3000:]
        assert "transfer threads at idle priority: True" in out, out[-3000:]
    shutil.rmtree(tmp_path / "local-2")
    shutil.rmtree(tmp_path / "persistent" / "4")
    procs, outputs = run(["restore", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 7 from local" in out, out[-3000:]
    assert "of local step 7 that this host (its part is gone) lacks from peers" in outputs[2]
    procs, outputs = run(["mute", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "local [6, 7]" in out, out[-3000:]
        assert "process 1 did not send process 2 the copies of its shards" in out, out[-3000:]


@pytest.mark.timeout(600)
def test_a_replaced_host_gets_its_own_data_iterator_state_from_a_peers_part(tmp_path):
    """Each process's grain iterator is saved with the local steps; every part holds every
    process's state, so the replaced host's iterator goes on where its own left off (not where
    the peer's that sent it the step's documents did)."""
    procs, saved = run(["grain-save", str(tmp_path)])
    for p, out in zip(procs, saved):
        assert p.returncode == 0 and "next batch" in out, out[-3000:]
    shutil.rmtree(tmp_path / "local-2")
    procs, restored = run(["grain-restore", str(tmp_path)])
    for p, out in zip(procs, restored):
        assert p.returncode == 0 and "restored step 3 from local" in out, out[-3000:]

    def batch(out):
        return next(ln for ln in out.splitlines() if ln.startswith("next batch"))

    assert [batch(out) for out in restored] == [batch(out) for out in saved]
    assert len({batch(out) for out in saved}) == 4  # each process's own records


@pytest.mark.timeout(600)
def test_another_mesh_reshards_from_the_local_tiers_another_process_count_falls_back(tmp_path):
    """Another sharding over the same processes restores the newest local step: each process
    gets the chunks its part lacks from the parts that hold them. Another number of processes
    restores the persistent step, and the log says why."""
    procs, outputs = run(["save", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [5, 6]" in out, out[-3000:]
    procs, outputs = run(["reshard", str(tmp_path)])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 6 from local" in out, out[-3000:]
        assert "of local step 6 that" in out and "lacks from peers" in out, out[-3000:]
    procs, outputs = run(["restore", str(tmp_path)], processes=2)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "local []" in out, out[-3000:]
        assert "restored step 4 from persistent" in out, out[-3000:]


@pytest.mark.timeout(600)
def test_a_damaged_copy_on_a_peer_fails_the_local_restore_everywhere_and_falls_back(tmp_path):
    """A replaced host's chunks come from peers, one of whose copies is damaged: every process
    learns it (none waits in a collective for ever), and the job restores the persistent step,
    saying why."""
    procs, outputs = run(["save", str(tmp_path), "dp"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "persistent [1, 4] local [5, 6]" in out, out[-3000:]
    shutil.rmtree(tmp_path / "local-2")
    chunk = tmp_path / "local-0" / "6" / "matrix" / "c.0.0"  # sent to process 2, or restored
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    procs, outputs = run(["restore", str(tmp_path), "dp"])
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "restored step 4 from persistent" in out, out[-3000:]
        assert f"checksum mismatch in chunk file {chunk}" in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / "local-2")) == [".asyncckpt.lock"]
