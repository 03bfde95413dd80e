"""`import_orbax` on checkpoints that orbax-checkpoint writes here: nothing lost or printed."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

ocp = pytest.importorskip("orbax.checkpoint")


def state(mesh):
    return {
        "params": {
            "w": jax.device_put(
                np.arange(64, dtype=np.float32).reshape(8, 8).astype(ml_dtypes.bfloat16),
                NamedSharding(mesh, P("x", "y")),
            )
        },
        "rng": jax.random.key(3),  # typed: Orbax stores its key data and the implementation
        "rbg": jax.random.key(4, impl="rbg"),
        "legacy": jax.random.PRNGKey(5),  # raw uint32[2]: stays raw
        "step": jnp.int32(7),
    }


def orbax_step(root, mesh, **items):
    """Step 5 of an Orbax CheckpointManager: `state` (StandardSave), metrics, extra items."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state(mesh)), **items)
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"])  # else it drops metrics
    with ocp.CheckpointManager(root, options=options) as mgr:
        mgr.save(5, args=args, metrics={"loss": 0.25, "acc": 0.5})
        mgr.wait_until_finished()
    return os.path.join(root, "5")


def test_composite_step_keeps_keys_metrics_and_json_items(tmp_path, mesh):
    src = orbax_step(
        str(tmp_path / "orbax"), mesh, extra=ocp.args.JsonSave({"data_pos": 12, "name": "run"})
    )
    ac.import_orbax(src, tmp_path / "run" / "5")
    expected = state(mesh)
    with ac.CheckpointManager(tmp_path / "run", read_only=True, best_metric="loss") as mgr:
        assert mgr.all_steps() == [5] and mgr.best_step() == 5
        assert mgr.metrics(5) == {"loss": 0.25, "acc": 0.5}
        meta = mgr.metadata(5)
        assert meta["orbax_items"] == {"extra": {"data_pos": 12, "name": "run"}}
        assert meta["imported_from"] == src
        # the job's own target restores: typed keys stay typed, bf16 stays bf16, any sharding
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=NamedSharding(mesh, P(*[None] * x.ndim))
            ),
            expected,
        )
        got = mgr.restore(5, target=target)
    assert got["rng"].dtype == expected["rng"].dtype
    assert jax.random.key_impl(got["rbg"]) == jax.random.key_impl(expected["rbg"])
    for name in ("rng", "rbg"):
        assert_same(jax.random.key_data(got[name]), jax.random.key_data(expected[name]))
    assert_same(got["params"]["w"], expected["params"]["w"])
    assert_same(got["legacy"], expected["legacy"])
    assert_same(got["step"], expected["step"])


def test_unconvertible_items_are_refused_or_skipped_by_name(tmp_path, mesh):
    src = orbax_step(str(tmp_path / "orbax"), mesh, table=ocp.args.ArraySave(np.ones(3)))
    with pytest.raises(ac.CheckpointError, match=r"'table' \(ArrayCheckpointHandler\).*skip_items"):
        ac.import_orbax(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ac.import_orbax(src, tmp_path / "out", skip_items=["table"])
    assert "rng" in ac.restore(tmp_path / "out")
    with pytest.raises(ac.CheckpointError, match=r"skip_items names \['tabel'\]"):
        ac.import_orbax(src, tmp_path / "out2", skip_items=["tabel"])


def test_several_pytree_items_become_one_tree_by_item(tmp_path, mesh):
    src = orbax_step(
        str(tmp_path / "orbax"), mesh, opt=ocp.args.StandardSave({"mu": jnp.arange(4.0)})
    )
    ac.import_orbax(src, tmp_path / "out")
    got = ac.restore(tmp_path / "out")
    assert sorted(got) == ["opt", "state"]
    assert_same(got["opt"]["mu"], np.arange(4.0, dtype=np.float32))


def test_import_prints_nothing_that_is_not_ours(tmp_path, mesh):
    src = orbax_step(str(tmp_path / "orbax"), mesh, extra=ocp.args.JsonSave({"a": 1}))
    code = (
        "import sys, asyncckpt as ac; "
        "ac.import_orbax(sys.argv[1], sys.argv[2]); "
        "ac.import_orbax(sys.argv[1] + '/state', sys.argv[3])"  # an item read on its own
    )
    out = subprocess.run(
        [sys.executable, "-c", code, src, str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
    doc = json.loads((tmp_path / "b" / "zarr.json").read_text())
    assert doc["attributes"]["asyncckpt"]["metadata"]["format"] == "orbax"
