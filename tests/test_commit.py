"""Atomic commit, incomplete and damaged checkpoints, and refusing bad input."""

import gc
import json
import os

import jax
import numpy as np
import pytest
from conftest import UrlPath, assert_same, names, write_file

import asyncckpt as ac


def _tree():
    return {"a": np.arange(100.0), "b": {"c": np.ones((3, 4), np.int32)}}


def test_checkpoint_appears_only_at_commit(tmp_path, monkeypatch):
    from asyncckpt._storage.local import LocalStorage

    seen = []
    original = LocalStorage.commit

    def spy(dest, staged, *, replace):
        seen.append((os.path.exists(dest.url), os.path.exists(staged.path("zarr.json"))))
        original(dest, staged, replace=replace)

    monkeypatch.setattr(LocalStorage, "commit", spy)
    ac.save(tmp_path / "ck", _tree())
    assert seen == [(False, True)]  # invisible until the rename, complete before it
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_interrupted_save_is_never_restored(tmp_path, monkeypatch):
    from asyncckpt._storage.local import LocalStorage

    def crash(dest, staged, *, replace):
        raise KeyboardInterrupt  # the process dies right before the commit

    monkeypatch.setattr(LocalStorage, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        ac.save(tmp_path / "ck", _tree())
    with pytest.raises(ac.CheckpointNotFoundError, match="does not exist"):
        ac.restore(tmp_path / "ck")


def test_missing_root_document_is_incomplete(tmp_path):
    ac.save(tmp_path / "ck", _tree())
    os.remove(tmp_path / "ck" / "zarr.json")
    with pytest.raises(ac.IncompleteCheckpointError, match="root zarr.json .* is missing"):
        ac.restore(tmp_path / "ck")
    with pytest.raises(ac.IncompleteCheckpointError):
        ac.list_variables(tmp_path / "ck")
    with pytest.raises(ac.IncompleteCheckpointError):
        ac.load_variable(tmp_path / "ck", "a")


def test_missing_chunk_names_variable_and_file(tmp_path):
    ac.save(tmp_path / "ck", _tree())
    os.remove(tmp_path / "ck" / "b" / "c" / "c.0.0")
    with pytest.raises(ac.IncompleteCheckpointError, match=r"'b/c'.*c\.0\.0 is missing"):
        ac.restore(tmp_path / "ck")
    assert_same(
        ac.restore(tmp_path / "ck", {"a": np.empty(100)}, strict=False)["a"], np.arange(100.0)
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_restore_that_fails_midway_leaves_no_file_open(tmp_path):
    """The reads of small chunks open each file ahead of reading it (`prefetch`); a damaged
    chunk in the middle stops the restore with those still unread, and none stays open."""
    tree = {f"v{i:03d}": np.full(64, i, np.float32) for i in range(200)}
    ac.save(tmp_path / "ck", tree)
    chunk = tmp_path / "ck" / "v100" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ac.CorruptCheckpointError, match=r"'v100'.*checksum mismatch"):
        ac.restore(tmp_path / "ck", tree)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_damaged_chunk_is_corrupt(tmp_path, damage):
    ac.save(tmp_path / "ck", _tree())
    chunk = tmp_path / "ck" / "a" / "c.0"
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[17] ^= 0x01
    elif damage == "truncate":
        data = data[:-9]
    else:
        data += b"\0"
    chunk.write_bytes(bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match=r"'a'.*c\.0"):
        ac.restore(tmp_path / "ck")
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load_variable(tmp_path / "ck", "a")


def test_damaged_root_document_is_corrupt(tmp_path):
    ac.save(tmp_path / "ck", _tree())
    (tmp_path / "ck" / "zarr.json").write_text('{"node_type": "group", "attri')
    with pytest.raises(ac.CorruptCheckpointError, match="not valid JSON"):
        ac.restore(tmp_path / "ck")


def test_hostile_variable_name_in_metadata_is_rejected(tmp_path):
    ac.save(tmp_path / "ck", _tree())
    doc_path = tmp_path / "ck" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    nodes = doc["consolidated_metadata"]["metadata"]
    nodes["../../outside"] = nodes.pop("a")
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ac.CorruptCheckpointError, match="invalid variable name"):
        ac.restore(tmp_path / "ck")
    with pytest.raises(ac.CorruptCheckpointError, match="invalid variable name"):
        ac.load_variable(tmp_path / "ck", "../../outside")


def test_existing_checkpoint_needs_force(tmp_path):
    ac.save(tmp_path / "ck", {"x": np.zeros(2)})
    with pytest.raises(ac.CheckpointExistsError, match="force=True"):
        ac.save(tmp_path / "ck", {"x": np.ones(2)})
    assert_same(ac.restore(tmp_path / "ck")["x"], np.zeros(2))
    ac.save(tmp_path / "ck", {"y": np.ones(3)}, force=True)
    back = ac.restore(tmp_path / "ck")
    assert list(back) == ["y"] and not (tmp_path / "ck" / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_refuses_non_checkpoint_directory_even_with_force(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(ac.CheckpointExistsError, match="not empty and is not a checkpoint"):
            ac.save(target, {"x": np.ones(1)}, force=force)
    assert os.listdir(target) == ["precious.txt"]
    assert os.listdir(tmp_path) == ["data"]


def test_refuses_foreign_zarr_group(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "z", mode="w").create_array("a", shape=(2,), dtype="f4")
    with pytest.raises(ac.CheckpointExistsError, match="not an asyncckpt checkpoint"):
        ac.save(tmp_path / "z", {"x": np.ones(1)}, force=True)
    with pytest.raises(ac.CorruptCheckpointError, match="not written by asyncckpt"):
        ac.restore(tmp_path / "z")


def test_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("hello")
    with pytest.raises(ac.CheckpointExistsError, match="not a directory"):
        ac.save(f, {"x": np.ones(1)})
    with pytest.raises(ac.CheckpointNotFoundError, match="is a file"):
        ac.restore(f)
    assert f.read_text() == "hello" and os.listdir(tmp_path) == ["file"]


def test_empty_existing_directory_is_fine(tmp_path):
    (tmp_path / "ck").mkdir()
    ac.save(tmp_path / "ck", {"x": np.ones(1)})
    assert_same(ac.restore(tmp_path / "ck")["x"], np.ones(1))


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(ac.CheckpointNotFoundError, match="does not exist") as e:
        ac.restore(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ac.CheckpointNotFoundError, match="not a checkpoint"):
        ac.restore(tmp_path / "empty")


@pytest.mark.parametrize(
    "leaf, match",
    [
        (object(), "object"),
        (jax.ShapeDtypeStruct((2,), np.float32), "ShapeDtypeStruct"),
        (np.array(["a"]), "dtype <U1"),
        (np.ones(2, np.float128) if hasattr(np, "float128") else np.array([b"x"]), "dtype"),
    ],
)
def test_unsupported_leaves_name_keypath_and_write_nothing(tmp_path, leaf, match):
    where = r"\['bad'\]\['leaf'\]"
    with pytest.raises(ac.UnsupportedTypeError, match=rf"{where}.*{match}|{match}.*{where}"):
        ac.save(tmp_path / "ck", {"ok": np.ones(2), "bad": {"leaf": leaf}})
    assert os.listdir(tmp_path) == []


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ac.UnsupportedTypeError, match="metadata"):
        ac.save(tmp_path / "ck", {"x": np.ones(1)}, metadata={"obj": object()})
    assert os.listdir(tmp_path) == []


def test_restore_target_mismatch_lists_differences(tmp_path):
    ac.save(tmp_path / "ck", {"a": np.ones((2, 3)), "b": np.ones(2), "c": np.ones(1)})
    target = {"a": np.empty((3, 2)), "b": np.empty(2), "z": np.empty(1)}
    with pytest.raises(ac.TreeMismatchError) as e:
        ac.restore(tmp_path / "ck", target)
    msg = str(e.value)
    assert "['z']" in msg and "in the target but not in the checkpoint" in msg
    assert "c" in msg and "in the checkpoint but not in the target" in msg
    assert "['a']: target (3, 2), checkpoint (2, 3)" in msg
    with pytest.raises(ac.TreeMismatchError, match="target but not in the checkpoint"):
        ac.restore(tmp_path / "ck", {"b": np.empty(2), "z": np.empty(1)}, strict=False)
    assert list(ac.restore(tmp_path / "ck", {"b": np.empty(2)}, strict=False)) == ["b"]


def test_lossy_kind_cast_is_refused(tmp_path):
    ac.save(tmp_path / "ck", {"w": np.ones(3, np.float32)})
    with pytest.raises(ac.TreeMismatchError, match="float32.*int32"):
        ac.restore(tmp_path / "ck", {"w": np.empty(3, np.int32)})


def test_unknown_variable(tmp_path):
    ac.save(tmp_path / "ck", {"a": np.ones(1), "b": np.ones(1)})
    with pytest.raises(ac.VariableNotFoundError, match="no variable 'zz'; it has: a, b") as e:
        ac.load_variable(tmp_path / "ck", "zz")
    assert isinstance(e.value, KeyError)


def test_the_commit_refuses_to_replace_foreign_data_whatever_it_is_told(root):
    """The guard sits next to the deletion it guards: `begin` (object stores) and `commit`
    (disk) refuse to replace anything but an asyncckpt checkpoint, even with replace=True."""
    import zarr

    from asyncckpt._storage import open_storage

    foreign = open_storage(root / "z")
    if isinstance(root, UrlPath):
        write_file(root / "z" / "table.csv", b"a,b\n")
    else:
        zarr.open_group(foreign.url, mode="w").create_array("a", shape=(2,), dtype="f4")
    before = names(root / "z")
    with pytest.raises(ac.CheckpointExistsError, match="(not a checkpoint|not an asyncckpt)"):
        foreign.commit(foreign.begin(replace=True), replace=True)
    assert names(root / "z") == before
    ac.save(root / "ck", {"x": np.zeros(2)})
    ckpt = open_storage(root / "ck")
    with pytest.raises(ac.CheckpointExistsError, match="already exists"):
        ckpt.commit(ckpt.begin(replace=False), replace=False)
    assert_same(ac.restore(root / "ck")["x"], np.zeros(2))


def test_restore_of_a_manager_directory_says_how_to_restore_a_step(root):
    with ac.CheckpointManager(root) as mgr:
        mgr.save(1, {"x": np.zeros(2)})
        mgr.save(2, {"x": np.ones(2)})
    with pytest.raises(
        ac.CheckpointNotFoundError,
        match=r"is a CheckpointManager directory, not a checkpoint: it holds "
        r"steps 1, 2\. Restore one of them, e.g\. the latest with "
        r"`asyncckpt\.restore\('.*2'\)` or `asyncckpt\.CheckpointManager",
    ):
        ac.restore(root)


def test_load_variable_of_a_group_lists_the_variables_under_it(root):
    tree = {
        "model": {
            "l1": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)},
            "l2": {"kernel": np.ones(3)},
        }
    }
    ac.save(root / "ck", tree)
    with pytest.raises(
        ac.VariableNotFoundError,
        match=r"'model/l1' in checkpoint .* is a group, not a variable; the "
        r"variables under it: model/l1/bias, model/l1/kernel \(load them",
    ):
        ac.load_variable(root / "ck", "model/l1")
    with pytest.raises(ac.VariableNotFoundError, match="is a group.*model/l2/kernel"):
        ac.load_variable(root / "ck", "model")
    assert_same(ac.load_variable(root / "ck", "model/l1/kernel"), np.ones((2, 2)))


def test_saving_a_donated_or_deleted_array_names_the_leaf(tmp_path):
    import jax.numpy as jnp

    state = {"params": {"w": jnp.ones(4), "b": jnp.ones(2)}, "step": 3}
    step = jax.jit(lambda s: jax.tree.map(lambda a: a + 1, s), donate_argnums=0)
    step(state["params"])
    with pytest.raises(
        ac.DeletedArrayError,
        match=r"cannot save \['params'\]\['b'\], \['params'\]\['w'\]: deleted or "
        r"donated .* before save\(\) copied it",
    ) as e:
        ac.save(tmp_path / "ck", state)
    assert isinstance(e.value, RuntimeError)  # what JAX raised: existing handlers still work
    other = {"a": jnp.zeros(3), "gone": jnp.zeros(3)}
    other["gone"].delete()
    with ac.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(ac.DeletedArrayError, match=r"cannot save \['gone'\]: deleted"):
            mgr.save(1, other)
        assert mgr.save(1, {"a": other["a"]})  # nothing was left behind
    assert os.listdir(tmp_path) == ["run"]
