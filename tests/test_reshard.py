"""Restore onto other meshes, partition specs and device counts than the save used."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_same, remove_file
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac


def make_mesh(shape, names, first=0):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[first : first + n]).reshape(shape), names)


def sharded(value, mesh, spec):
    return jax.device_put(value, NamedSharding(mesh, spec))


def abstract(value, mesh, spec, dtype=None):
    return jax.ShapeDtypeStruct(
        value.shape, dtype or value.dtype, sharding=NamedSharding(mesh, spec)
    )


def check(restored, want, mesh, spec):
    assert restored.sharding == NamedSharding(mesh, spec)
    assert_same(restored, want)
    for shard in restored.addressable_shards:  # every device holds its own slice, exactly
        assert_same(shard.data, np.asarray(want)[shard.index])


VALUE = np.arange(48 * 24, dtype=np.float32).reshape(48, 24)

# (save mesh shape, save spec) -> (restore mesh shape, restore spec)
CASES = [
    (((4, 2), P("x", "y")), ((2, 4), P("x", "y"))),  # other mesh shape
    (((4, 2), P("x", "y")), ((8, 1), P("x", None))),
    (((8,), P("x", None)), ((8,), P(None, "x"))),  # rows -> columns
    (((8,), P(None, "x")), ((8,), P())),  # columns -> replicated
    (((8,), P()), ((4, 2), P("x", "y"))),  # replicated -> sharded
    (((8,), P("x", None)), ((4,), P("x", None))),  # 8 devices -> 4
    (((8,), P("x", None)), ((1,), P())),  # 8 -> 1
    (((1,), P()), ((8,), P("x", None))),  # 1 -> 8
    (((8,), P("x", None)), ((3,), P("x", None))),  # 6-row chunks, 16-row shards
    (((4, 2), P("x", "y")), ((3, 2), P("y", "x"))),  # nothing lines up
]


@pytest.mark.parametrize("saved, target", CASES, ids=lambda c: f"{c[0]}{c[1]}")
def test_reshard(root, saved, target):
    (save_shape, save_spec), (load_shape, load_spec) = saved, target
    names = ("x", "y")[: len(save_shape)]
    save_mesh = make_mesh(save_shape, names)
    tree = {"w": sharded(VALUE, save_mesh, save_spec), "v": sharded(VALUE[0], save_mesh, P())}
    ac.save(root / "ckpt", tree)
    load_mesh = make_mesh(load_shape, ("x", "y")[: len(load_shape)])
    got = ac.restore(
        root / "ckpt",
        {"w": abstract(VALUE, load_mesh, load_spec), "v": abstract(VALUE[0], load_mesh, P())},
    )
    check(got["w"], VALUE, load_mesh, load_spec)
    check(got["v"], VALUE[0], load_mesh, P())


def test_unsharded_numpy_save_restored_sharded_onto_other_devices(root):
    ac.save(root / "ckpt", {"w": VALUE})
    mesh = make_mesh((2, 2), ("x", "y"), first=4)  # devices 4..7 only
    got = ac.restore(root / "ckpt", {"w": abstract(VALUE, mesh, P("y", "x"))})
    check(got["w"], VALUE, mesh, P("y", "x"))


def test_restore_onto_real_arrays_and_with_a_cast(root):
    mesh = make_mesh((4, 2), ("x", "y"))
    ac.save(root / "ckpt", {"w": sharded(VALUE, mesh, P("x", "y"))})
    other = make_mesh((2, 4), ("x", "y"))
    like = sharded(jnp.zeros(VALUE.shape, jnp.bfloat16), other, P(None, "y"))
    got = ac.restore(root / "ckpt", {"w": like})["w"]
    assert got.dtype == jnp.bfloat16
    check(got, VALUE.astype(ml_dtypes.bfloat16), other, P(None, "y"))
    with pytest.raises(ac.TreeMismatchError, match=r"'w'.*float32.*int32.*refuses"):
        ac.restore(root / "ckpt", {"w": abstract(VALUE, other, P(), dtype=jnp.int32)})


def test_partial_restore_reads_only_the_requested_leaves(root):
    ac.save(root / "ckpt", {"keep": VALUE, "skip": VALUE + 1})
    remove_file(root / "ckpt" / "skip" / "c.0.0")  # never read, so its absence is fine
    mesh = make_mesh((8,), ("x",))
    got = ac.restore(root / "ckpt", {"keep": abstract(VALUE, mesh, P("x"))}, strict=False)
    check(got["keep"], VALUE, mesh, P("x"))
    with pytest.raises(ac.TreeMismatchError, match="skip"):
        ac.restore(root / "ckpt", {"keep": abstract(VALUE, mesh, P("x"))})
