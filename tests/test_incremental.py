"""Incremental saves: a chunk whose content did not change is linked (disk) or copied
server-side (object stores) from the step before, never written again; every step stays whole."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac
from asyncckpt._storage import open_storage

FROZEN_BYTES = 64 * 1024 * 4


def state(mesh, step):
    return {
        "base": jax.device_put(
            jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024),
            NamedSharding(mesh, P("x", "y")),
        ),
        "adapter": jax.device_put(jnp.full((8, 16), float(step)), NamedSharding(mesh, P("x"))),
        "step": jnp.int32(step),
    }


@functools.partial(jax.jit, donate_argnums=0)
def train_step(s):
    """Donates the whole state: the frozen base is a new array every step, same bytes."""
    return {"base": s["base"] * 1, "adapter": s["adapter"] + 1, "step": s["step"] + 1}


def ls_json(path):
    out = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "ls", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    return {s["step"]: s for s in json.loads(out)["steps"]}


def test_unchanged_chunks_are_reused_not_written(root, mesh):
    s = state(mesh, 0)
    with ac.CheckpointManager(root / "run") as mgr:
        for step in range(1, 5):
            s = train_step(s)
            mgr.save(step, s)
            mgr.wait_until_finished()
            stats = mgr.last_save_stats()
            assert stats.reused_bytes == (0 if step == 1 else FROZEN_BYTES), step
        for step in range(1, 5):  # each step is whole, bit for bit
            got = mgr.restore(step, target=jax.tree.map(lambda x: x, state(mesh, step)))
            assert_same(got["base"], state(mesh, 0)["base"])
            assert_same(got["adapter"], np.full((8, 16), float(step), np.float32))
    listed = ls_json(root / "run")
    assert listed[1]["new_bytes"] == listed[1]["bytes"]
    assert listed[2]["new_bytes"] == listed[2]["bytes"] - FROZEN_BYTES
    if open_storage(os.fspath(root)).local_path is not None:  # hard links: one inode
        files = [root / "run" / str(s) / "base" / "c.0.0" for s in range(1, 5)]
        assert len({os.stat(f).st_ino for f in files}) == 1
        assert os.stat(files[0]).st_nlink == 4


def test_arrays_that_changed_whole_are_hashed_as_written_and_the_others_first(
    root, mesh, monkeypatch
):
    """An array that changed whole in the last two saves is taken to change again: its chunks
    are hashed in the checksums' pass as they are written, not read once more before. One that
    then stops changing is written once more, then reused like any other."""
    from asyncckpt._storage import Storage

    real = Storage.write_chunk
    writes: list[tuple[str, bool]] = []  # (array, hashed before the write)

    def spy(self, key, data, band, digest=None):
        writes.append((key.rsplit("/", 1)[0], digest is not None))
        return real(self, key, data, band, digest)

    monkeypatch.setattr(Storage, "write_chunk", spy)
    s = state(mesh, 0)
    steps = {}
    with ac.CheckpointManager(root / "run") as mgr:
        for step in range(1, 7):
            # the adapter trains until step 4, then stays as it is
            s = train_step(s) if step <= 4 else {**s, "step": s["step"] + 1}
            steps[step] = jax.tree.map(np.asarray, s)
            writes.clear()
            mgr.save(step, s)
            mgr.wait_until_finished()
            written = {a: {first for b, first in writes if b == a} for a, _ in writes}
            reused = mgr.last_save_stats().reused_bytes
            if step == 1:  # nothing before it
                assert written == {"base": {False}, "adapter": {False}, "step": {False}}
            elif step in (2, 3):  # nothing known of step 1, then one change: hashed first
                assert written == {"adapter": {True}, "step": {True}}, (step, written)
            elif step in (4, 5):  # adapter and step changed whole in the two saves before
                assert written == {"adapter": {False}, "step": {False}}, (step, written)
            else:  # the adapter stayed the same in step 5: hashed first, reused
                assert written == {"step": {False}}, written
            adapter = 8 * 16 * 4
            assert reused == {1: 0, 6: FROZEN_BYTES + adapter}.get(step, FROZEN_BYTES), step
        for step, want in steps.items():  # each step whole, its hashes right
            got = mgr.restore(step, target=jax.tree.map(lambda x: x, state(mesh, step)))
            for name in want:
                assert_same(got[name], want[name])
            ac.verify(root / "run" / str(step))


def test_deleting_any_steps_leaves_the_others_whole(root, mesh):
    s = state(mesh, 0)
    with ac.CheckpointManager(root / "run", max_to_keep=2) as mgr:
        for step in range(1, 6):
            s = train_step(s)
            mgr.save(step, s)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [4, 5]  # retention deleted 1-3, whose files 4 and 5 share
        mgr.delete(4)
        ac.verify(root / "run" / "5")
        got = mgr.restore(5)
        assert_same(got["base"], state(mesh, 0)["base"])
        mgr.save(6, train_step(s))  # still reuses from 5
        mgr.wait_until_finished()
        assert mgr.last_save_stats().reused_bytes == FROZEN_BYTES


def test_a_damaged_shared_chunk_is_reported_for_every_step(tmp_path, mesh):
    s = state(mesh, 0)
    with ac.CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):
            s = train_step(s)
            mgr.save(step, s)
    with open(tmp_path / "1" / "base" / "c.1.0", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    for step in (1, 2):
        with pytest.raises(ac.CorruptCheckpointError, match=rf"{tmp_path}/{step}/base/c\.1\.0"):
            ac.verify(tmp_path / str(step))


def test_a_rewritten_chunk_with_valid_checksums_is_caught_by_its_hash(tmp_path):
    ac.save(tmp_path / "ck", {"w": np.arange(1000, dtype=np.float32)})
    place = open_storage(str(tmp_path / "ck"))
    place.write_chunk("w/c.0", np.zeros(1000, np.float32), None)  # its crc32c is right
    with pytest.raises(ac.CorruptCheckpointError, match="content is not what the checkpoint"):
        ac.verify(tmp_path / "ck")


def test_content_digest_compares_checkpoints_without_reading_them(tmp_path, mesh):
    tree = {"a": np.arange(10.0), "b": {"c": 3, "d": np.ones((4, 4), np.int8)}}
    ac.save(tmp_path / "one", tree, metadata={"run": 1})
    ac.save(tmp_path / "two", tree, metadata={"run": 2})  # other metadata, other time
    tree["a"] = tree["a"] + 1
    ac.save(tmp_path / "three", tree)
    digests = [ls_show_digest(tmp_path / n) for n in ("one", "two", "three")]
    assert digests[0] == digests[1] != digests[2]
    assert digests[0].startswith("xxh3-128:")
    # a root document whose hashes were edited no longer matches its digest
    doc_path = tmp_path / "one" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["asyncckpt"]["chunk_hashes"]["a"] = ["0" * 32]
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ac.CorruptCheckpointError, match="content digest .* does not match"):
        ac.verify(tmp_path / "one")


def ls_show_digest(path):
    out = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if "content digest" in line)


def test_incremental_false_writes_everything(tmp_path, mesh):
    s = state(mesh, 0)
    with ac.CheckpointManager(tmp_path, incremental=False) as mgr:
        for step in (1, 2):
            s = train_step(s)
            mgr.save(step, s)
            mgr.wait_until_finished()
            assert mgr.last_save_stats().reused_bytes == 0
    assert os.stat(tmp_path / "2" / "base" / "c.0.0").st_nlink == 1


def test_replacing_the_latest_step_and_plain_readers(tmp_path, mesh):
    """force=True over the newest step cannot reuse from itself; zarr-python reads a step
    whose chunks are links as plain files."""
    import zarr

    s = state(mesh, 0)
    with ac.CheckpointManager(tmp_path) as mgr:
        s = train_step(s)
        mgr.save(1, s)
        s = train_step(s)
        mgr.save(2, s)
        mgr.save(2, s, force=True)
        mgr.wait_until_finished()
        assert mgr.last_save_stats().reused_bytes == FROZEN_BYTES  # from step 1
    group = zarr.open_group(str(tmp_path / "2"), mode="r")
    assert_same(group["base"][...], np.asarray(state(mesh, 0)["base"]))
    assert_same(group["adapter"][...], np.full((8, 16), 2.0, np.float32))


def allocated_new(step_dir, seen):
    """Bytes allocated on disk by the files of `step_dir` whose inodes no step before had."""
    total = 0
    for folder, _, files in os.walk(step_dir):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


@pytest.mark.slow
def test_lora_sized_run_writes_only_what_changed(tmp_path):
    """A 1 GiB frozen base in 64 leaves, ~10 MiB of adapters and their Adam moments, a train step
    that donates the whole state, 10 steps: each step after the first adds on disk at most 1.1x
    the bytes that changed; every step restores bit for bit; after deleting steps 1-9, step 10
    restores, verifies and opens in zarr-python and TensorStore."""
    import optax
    import tensorstore as ts
    import zarr

    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = NamedSharding(mesh, P("x", "y"))
    keys = jax.random.split(jax.random.key(0), 64)
    base = {
        f"w{i:02d}": jax.random.normal(k, (1024, 4096), jnp.float32) for i, k in enumerate(keys)
    }
    base = jax.device_put(base, sharded)
    expected_base = {n: np.asarray(base[n]) for n in ("w00", "w07", "w63")}  # base is donated
    adapters = {
        name: {"a": jnp.zeros((4096, 8), jnp.float32), "b": jnp.full((8, 1024), 0.01)}
        for name in base
    }
    tx = optax.adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(state, x):
        def loss(adapters):
            return sum(
                jnp.sum((x @ state["base"][n] @ adapters[n]["a"] @ adapters[n]["b"]) ** 2)
                for n in adapters
            )

        grads = jax.grad(loss)(state["adapters"])
        updates, opt = tx.update(grads, state["opt"], state["adapters"])
        return {**state, "adapters": optax.apply_updates(state["adapters"], updates), "opt": opt}

    state = {"base": base, "adapters": adapters, "opt": tx.init(adapters)}
    changing = sum(x.nbytes for x in jax.tree.leaves((state["adapters"], state["opt"])))
    saved = {}
    seen: set[int] = set()
    with ac.CheckpointManager(tmp_path) as mgr:
        for step in range(1, 11):
            state = step_fn(state, jnp.full((2, 1024), step / 10))
            mgr.save(step, state)
            mgr.wait_until_finished()
            saved[step] = jax.tree.map(np.asarray, (state["adapters"], state["opt"]))
            added = allocated_new(tmp_path / str(step), seen)
            if step > 1:
                assert added <= 1.1 * changing, (step, added, changing)
        for step in range(1, 11):
            got = mgr.restore(step)
            jax.tree.map(assert_same, (got["adapters"], got["opt"]), saved[step])
            assert_same(got["base"]["w07"], expected_base["w07"])
        for step in range(1, 10):
            mgr.delete(step)
    ac.verify(tmp_path / "10")
    group = zarr.open_group(str(tmp_path / "10"), mode="r")
    assert_same(group["base/w63"][...], expected_base["w63"])
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "10/base/w00")}}
    assert_same(ts.open(spec).result().read().result(), expected_base["w00"])


def test_cp_of_an_incremental_run_copies_what_each_step_added(root, tmp_path, mesh):
    """`asyncckpt cp` of a manager directory links (or copies server-side) what the step copied
    before holds, instead of reading it again; every copied step verifies."""
    s = state(mesh, 0)
    with ac.CheckpointManager(tmp_path / "run") as mgr:
        for step in (1, 2, 3):
            s = train_step(s)
            mgr.save(step, s)
    out = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "cp", str(tmp_path / "run"), str(root / "copy")],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("copied")]
    assert len(lines) == 3 and "reused" not in lines[0]
    assert all("256.0 KiB of it reused from the step before" in line for line in lines[1:])
    for step in (1, 2, 3):
        ac.verify(root / "copy" / str(step))
    got = ac.restore(root / "copy" / "3")
    assert_same(got["base"], state(mesh, 0)["base"])
    if open_storage(os.fspath(root)).local_path is not None:
        files = [root / "copy" / str(step) / "base" / "c.0.0" for step in (1, 2, 3)]
        assert len({os.stat(f).st_ino for f in files}) == 1
