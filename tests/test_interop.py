"""Committed checkpoints are plain Zarr v3: zarr-python and TensorStore read every array."""

import hashlib
import json
import subprocess
import sys
from typing import NamedTuple

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
from asyncckpt import _dtypes

# TensorStore 0.1.x has no uint4, uint2 or float6 data types (it reads all the others).
TS_MISSING = {"uint4", "uint2", "float6_e2m3fn", "float6_e3m2fn", "float8_e4m3"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mesh):
    tree = {
        "dtypes": {
            np.dtype(d).name: _values(d, (3, 5), seed=i)
            for i, d in enumerate(NUMPY_DTYPES + ML_DTYPES)
        },
        "sharded": jax.device_put(
            jnp.arange(128.0).reshape(16, 8), NamedSharding(mesh, P("x", "y"))
        ),
        "replicated": jax.device_put(jnp.arange(8, dtype=jnp.int32), NamedSharding(mesh, P())),
        "scalar": np.float64(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "odd names": {"a/b": np.ones(2), "..": np.zeros(2)},
        # large chunks are Zarr shards of row bands (sharding_indexed codec)
        "banded": np.arange(3072 * 1024, dtype=np.float32).reshape(3072, 1024),
        "banded_bf16": jax.device_put(
            jnp.arange(4096 * 2048, dtype=jnp.float32).reshape(4096, 2048).astype(jnp.bfloat16),
            NamedSharding(mesh, P("y", None)),
        ),
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
        store = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{name}"}}
        ).result()
        assert_same(store.read().result(), flat[name])
        checked += 1
    assert checked >= 20


def test_tensorstore_written_zarr3_types_match_ours(tmp_path):
    """Our data-type names are the ones TensorStore itself writes."""
    import json

    for name in ("bfloat16", "float8_e4m3fn", "int4"):
        ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / name)}},
            create=True,
            dtype=ts.dtype(name),
            shape=[2],
        ).result()
        written = json.loads((tmp_path / name / "zarr.json").read_text())["data_type"]
        ac.save(tmp_path / f"ours_{name}", {"x": np.zeros(2, getattr(ml_dtypes, name))})
        ours = json.loads((tmp_path / f"ours_{name}" / "x" / "zarr.json").read_text())["data_type"]
        assert ours == written == name


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    from asyncckpt import _tree

    return [(_tree.variable_name(kp), np.asarray(v)) for kp, v in leaves if hasattr(v, "shape")]


class Point(NamedTuple):
    x: np.ndarray
    y: np.ndarray


# Run as a script in a fresh process: no asyncckpt import, zarr's defaults only.
PLAIN_READER = r"""
import hashlib, json, sys
import zarr

group = zarr.open_group(sys.argv[1], mode="r")
arrays = {}
for name, node in group.members(max_depth=None):
    if isinstance(node, zarr.Array):
        data = node[...]
        digest = hashlib.sha256(data.tobytes()).hexdigest()
        arrays[name] = [data.dtype.name, list(data.shape), digest]
print(json.dumps({"arrays": arrays, "jax imported": "jax" in sys.modules}))
"""


def _digest(value):
    value = np.asarray(value)
    return [value.dtype.name, list(value.shape), hashlib.sha256(value.tobytes()).hexdigest()]


def test_plain_zarr_python_opens_any_tree_in_a_process_without_asyncckpt(tmp_path, mesh):
    """zarr.open_group with its defaults, in a process that never imports asyncckpt, reads a
    tree of lists, tuples and namedtuples with escaped names and every ml_dtypes leaf. (zarr 3.1
    needs the consolidated metadata ordered by depth then name; zarr-python finds the data
    types through asyncckpt's entry points, without importing JAX.)"""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {
        "arrays": {"w": a, "b": a[0] + 1},
        "seq": [a * 2, (a * 3, Point(a * 4, a * 5))],
        "names": {"a/b": a * 6, "..": a * 7, "ünï cödé": a * 8, "": a * 9},
        "dtypes": {
            name: _values(_dtypes.ml_dtype(name), (3, 4), seed=i)
            for i, name in enumerate(_dtypes.ML_DTYPE_NAMES)
        },
        "sharded": jax.device_put(
            jnp.arange(64.0).reshape(16, 4).astype(jnp.bfloat16), NamedSharding(mesh, P("x", None))
        ),
    }
    ac.save(tmp_path / "ck", tree)
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_READER, str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert not got["jax imported"]
    expected = {name: _digest(value) for name, value in _flat(tree)}
    assert len(expected) == 11 + len(_dtypes.ML_DTYPE_NAMES)
    assert got["arrays"] == expected
