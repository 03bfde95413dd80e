"""Committed checkpoints are plain Zarr v3: zarr-python and TensorStore read every array."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from conftest import assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_roundtrip import ML_DTYPES, NUMPY_DTYPES, _values

import asyncckpt as ac

# TensorStore 0.1.x has no uint4, uint2 or float6 data types (it reads all the others).
TS_MISSING = {"uint4", "uint2", "float6_e2m3fn", "float6_e3m2fn", "float8_e4m3"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mesh):
    tree = {
        "dtypes": {np.dtype(d).name: _values(d, (3, 5), seed=i)
                   for i, d in enumerate(NUMPY_DTYPES + ML_DTYPES)},
        "sharded": jax.device_put(jnp.arange(128.0).reshape(16, 8),
                                  NamedSharding(mesh, P("x", "y"))),
        "replicated": jax.device_put(jnp.arange(8, dtype=jnp.int32), NamedSharding(mesh, P())),
        "scalar": np.float64(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "odd names": {"a/b": np.ones(2), "..": np.zeros(2)},
        # large chunks are Zarr shards of row bands (sharding_indexed codec)
        "banded": np.arange(3072 * 1024, dtype=np.float32).reshape(3072, 1024),
        "banded_bf16": jax.device_put(
            jnp.arange(4096 * 2048, dtype=jnp.float32).reshape(4096, 2048).astype(jnp.bfloat16),
            NamedSharding(mesh, P("y", None))),
    }
    path = tmp_path_factory.mktemp("interop") / "ck"
    ac.save(path, tree)
    return path, ac.restore(path)


def _array_names(path):
    return list(ac.list_variables(path))


def test_zarr_python_reads_every_array(checkpoint):
    path, expected = checkpoint
    group = zarr.open_group(str(path), mode="r")
    flat = {name: value for name, value in _flat(expected)}
    for name in _array_names(path):
        assert_same(group[name][...], flat[name])
    assert group.attrs["asyncckpt"]["format_version"] == 1


def test_zarr_python_reads_without_consolidated_metadata(checkpoint):
    path, expected = checkpoint
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert_same(group["sharded"][...], np.asarray(expected["sharded"]))
    assert_same(group["dtypes"]["bfloat16"][...], expected["dtypes"]["bfloat16"])


def test_tensorstore_reads_every_array(checkpoint):
    path, expected = checkpoint
    flat = dict(_flat(expected))
    checked = 0
    for name in _array_names(path):
        if name.split("/")[-1] in TS_MISSING:
            continue
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                        "path": f"{path}/{name}"}}).result()
        assert_same(store.read().result(), flat[name])
        checked += 1
    assert checked >= 20


def test_tensorstore_written_zarr3_types_match_ours(tmp_path):
    """Our data-type names are the ones TensorStore itself writes."""
    import json

    for name in ("bfloat16", "float8_e4m3fn", "int4"):
        ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / name)}},
                create=True, dtype=ts.dtype(name), shape=[2]).result()
        written = json.loads((tmp_path / name / "zarr.json").read_text())["data_type"]
        ac.save(tmp_path / f"ours_{name}", {"x": np.zeros(2, getattr(ml_dtypes, name))})
        ours = json.loads((tmp_path / f"ours_{name}" / "x" / "zarr.json").read_text())["data_type"]
        assert ours == written == name


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    from asyncckpt import _tree

    return [(_tree.variable_name(kp), np.asarray(v)) for kp, v in leaves if hasattr(v, "shape")]
