"""Deterministic global trees for the multi-process tests, and their checks."""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

TIMEOUT_S = 10.0
SHAPE = (16, 24)
BIG = np.arange(4096 * 2048, dtype=np.float32).reshape(4096, 2048)  # 32 MiB: 8 bands of 4 MiB
READ_ONCE = {  # saved sharded 8 ways (w), whole (e: one chunk of 2 bands, v)
    "w": np.arange(1024 * 512, dtype=np.float32).reshape(1024, 512),
    "e": np.arange(2048 * 1024, dtype=np.int32).reshape(2048, 1024) * 3,
    "v": np.linspace(0, 1, 4096, dtype=np.float32),
}


def global_value(step=0):
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + step


def global_tree(mesh, step=0, spec=None):
    """A matrix sharded over every process's devices (by `spec`, default P("x", "y")), a
    replicated vector, a numpy array, ints."""
    value = global_value(step)
    sharding = NamedSharding(mesh, P("x", "y") if spec is None else spec)
    matrix = jax.make_array_from_callback(SHAPE, sharding, lambda idx: value[idx])
    replicated = NamedSharding(mesh, P())
    vector = jax.make_array_from_callback((24,), replicated, lambda idx: value[0][idx])
    return {"matrix": matrix, "vector": vector, "host": np.full(5, step, np.int32), "step": step}


def abstract_tree(mesh, spec):
    return {
        "matrix": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=NamedSharding(mesh, spec)),
        "vector": jax.ShapeDtypeStruct((24,), np.float32, sharding=NamedSharding(mesh, P())),
        "host": np.zeros(5, np.int32),
        "step": 0,
    }


def check_tree(tree, step=0):
    value = global_value(step)
    for name, want in (("matrix", value), ("vector", value[0])):
        for shard in tree[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], name)
    np.testing.assert_array_equal(tree["host"], np.full(5, step, np.int32))
    assert tree["step"] == step
