"""Round trips: every dtype, shardings, tree shapes, python leaves, metadata."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_same, names, read_file, remove_file, write_file
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

NUMPY_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]
ML_DTYPES = [
    getattr(ml_dtypes, n)
    for n in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e4m3b11fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e3m4",
        "float8_e4m3",
        "float8_e8m0fnu",
        "float4_e2m1fn",
        "int4",
        "uint4",
        "int2",
        "uint2",
    )
    if hasattr(ml_dtypes, n)
]


def _values(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.name in ("int4", "int2"):
        return rng.integers(-2, 2, shape).astype(dtype)
    if dtype.kind in "iu" or dtype.name in ("uint4", "uint2"):
        return rng.integers(0, 3, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES + ML_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (7,), (4, 6)], ids=str)
def test_numpy_dtypes_and_shapes_round_trip(root, dtype, shape):
    x = _values(dtype, shape)
    ac.save(root / "ck", {"x": x})
    assert_same(ac.restore(root / "ck")["x"], x)
    assert_same(ac.load_variable(root / "ck", "x"), x)


@pytest.mark.parametrize(
    "dtype",
    [jnp.float32, jnp.bfloat16, jnp.int8, jnp.bool_, jnp.float8_e4m3fn, jnp.int4, jnp.complex64],
)
@pytest.mark.parametrize(
    "spec", [P("x", "y"), P("x", None), P(None, "y"), P(), P(("x", "y"))], ids=str
)
def test_sharded_jax_arrays_round_trip_with_shardings(root, mesh, dtype, spec):
    host = _values(np.dtype(dtype), (16, 8))
    x = jax.device_put(host, NamedSharding(mesh, spec))
    ac.save(root / "ck", {"w": x})
    back = ac.restore(root / "ck", {"w": x})["w"]
    assert isinstance(back, jax.Array)
    assert back.sharding == x.sharding
    assert back.dtype == x.dtype
    for a, b in zip(back.addressable_shards, x.addressable_shards):
        assert a.device == b.device and a.index == b.index
        assert_same(a.data, b.data)
    assert_same(ac.restore(root / "ck")["w"], host)  # no target: numpy


def test_leaves_on_one_device_are_placed_as_jax_device_put_places_them(root):
    """A whole leaf on one device goes straight to the runtime's batched put, not through
    `jax.device_put` (whose Python dominated restores of thousands of small leaves); it comes
    back as `jax.device_put` would give it: dtype, shape, device, committed, bytes. A dtype
    that JAX changes (int64 without x64) takes `jax.device_put` itself."""
    from asyncckpt import _restore

    assert _restore._direct_put() is not None  # this JAX has it: the tests here exercise it
    dtypes = [np.float32, ml_dtypes.bfloat16, np.bool_, np.int8, np.uint32, np.float16]
    dtypes += [ml_dtypes.int4, ml_dtypes.float8_e4m3fn, np.complex64]
    devices = jax.local_devices()
    hosts = {f"x{i}": _values(d, (5, 3) if i % 3 else (), seed=i) for i, d in enumerate(dtypes)}
    hosts["wide"] = np.arange(6, dtype=np.int64)
    tree = {
        k: jax.device_put(v, devices[i % len(devices)]) for i, (k, v) in enumerate(hosts.items())
    }
    ac.save(root / "ck", tree)
    target = {
        k: jax.ShapeDtypeStruct(v.shape, hosts[k].dtype, sharding=v.sharding)
        for k, v in tree.items()
    }
    back = ac.restore(root / "ck", target)
    for k, host in hosts.items():
        _assert_placed_as_device_put(back[k], jax.device_put(host, tree[k].sharding), k)


def _assert_placed_as_device_put(got, want, name):
    """`got` is what `jax.device_put` gave (`want`): type, dtype, shape, sharding, committed,
    weak type, each shard's device, index and bytes."""
    assert isinstance(got, jax.Array), name
    assert (got.dtype, got.shape, got.sharding, got.committed, got.weak_type) == (
        want.dtype,
        want.shape,
        want.sharding,
        want.committed,
        want.weak_type,
    ), name
    assert [(s.device, s.index) for s in got.addressable_shards] == [
        (s.device, s.index) for s in want.addressable_shards
    ], name
    for a, b in zip(got.addressable_shards, want.addressable_shards):
        assert_same(a.data, b.data)


def test_replicated_leaves_are_placed_as_jax_device_put_places_them(root, monkeypatch):
    """A whole leaf replicated over devices of this process (data-parallel parameters) goes
    straight to the runtime's batched put as well, the same host buffer for each device, as
    `jax.device_put` gives it; only the leaves that no device holds whole, and dtypes that JAX
    changes, take `jax.device_put`."""
    from asyncckpt import _restore

    devices = jax.local_devices()
    full = NamedSharding(jax.make_mesh((len(devices),), ("d",)), P())
    half = NamedSharding(jax.sharding.Mesh(np.array(devices[: len(devices) // 2]), ("d",)), P())
    rows = NamedSharding(jax.make_mesh((len(devices),), ("d",)), P("d"))
    dtypes = [np.float32, ml_dtypes.bfloat16, np.bool_, np.int8, ml_dtypes.int4, np.int64]
    hosts = {f"x{i}": _values(d, (8, 3) if i % 2 else (), seed=i) for i, d in enumerate(dtypes)}
    hosts["big"] = _values(np.dtype(np.float32), (512, 256), seed=9)  # 512 KiB: mapped
    hosts["rows"] = _values(np.dtype(np.float32), (16, 4), seed=10)
    shardings = {k: rows if k == "rows" else (full, half)[i % 2] for i, k in enumerate(hosts)}
    ac.save(root / "ck", {k: jax.device_put(v, shardings[k]) for k, v in hosts.items()})
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in hosts.items()
    }
    assert _restore._direct_put() is not None
    device_put = jax.device_put
    put_by_jax: list[int] = []

    def spy(x, *args, **kwargs):
        put_by_jax.append(len(x) if isinstance(x, list) else 1)
        return device_put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", spy)
    back = ac.restore(root / "ck", target)
    monkeypatch.undo()
    assert put_by_jax == [1]  # int64 alone (without x64 JAX makes it int32); "rows": shards
    for k, host in hosts.items():
        _assert_placed_as_device_put(back[k], jax.device_put(host, shardings[k]), k)


def test_small_leaves_come_back_aligned_and_apart(root):
    """Small leaves are read into buffers cut from shared allocations (`_restore._Slabs`):
    each must still be 64-byte aligned (CPU devices then use it without a copy) and hold only
    its own bytes, whatever the dtypes and sizes around it."""
    dtypes = [np.float32, ml_dtypes.bfloat16, np.bool_, np.int8, np.complex128, ml_dtypes.int4]
    shapes = [(), (1,), (3, 5), (0,), (1000,), (17, 3)]
    tree = {
        f"x{i:03d}": _values(dtypes[i % len(dtypes)], shapes[i % len(shapes)], seed=i)
        for i in range(300)
    }
    tree["big"] = _values(np.float32, (300, 300))  # 360 KB: its own buffer
    ac.save(root / "ck", tree)
    back = ac.restore(root / "ck")
    for name, value in tree.items():
        assert_same(back[name], value)
        if back[name].nbytes:
            assert back[name].ctypes.data % 64 == 0, name
    for name in back:  # writing to one leaf leaves every other as it was
        back[name][...] = 0 if back[name].dtype != np.bool_ else True
        nxt = f"x{int(name[1:]) + 1:03d}" if name.startswith("x") else None
        if nxt in back:
            assert_same(back[nxt], tree[nxt])


def test_one_chunk_per_shard(root, mesh):
    x = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P("x", "y")))
    ac.save(root / "ck", {"w": x, "v": np.arange(5)})
    info = ac.list_variables(root / "ck")
    assert info["w"].chunk_shape == (4, 4)
    assert [n for n in names(root / "ck" / "w") if n != "zarr.json"] == [
        f"c.{i}.{j}" for i in range(4) for j in range(2)
    ]
    assert info["v"].chunk_shape == (5,)  # unsharded: a single chunk


def test_replicated_array_written_once(root, mesh):
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P()))
    ac.save(root / "ck", {"b": x})
    assert names(root / "ck" / "b") == ["c.0", "zarr.json"]
    back = ac.restore(root / "ck", {"b": x})["b"]
    assert back.sharding == x.sharding and len(back.addressable_shards) == 8
    for shard in back.addressable_shards:
        assert_same(shard.data, np.arange(8.0, dtype=np.float32))


def test_restore_onto_shape_dtype_structs(root, mesh):
    x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("x")))
    ac.save(root / "ck", {"w": x})
    sharding = NamedSharding(mesh, P(None, "y"))
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}
    back = ac.restore(root / "ck", target)["w"]
    assert back.sharding == sharding
    assert_same(back, np.arange(32.0, dtype=np.float32).reshape(8, 4))


def test_prng_keys_round_trip(root, mesh):
    keys = {
        "one": jax.random.key(7),
        "many": jax.random.split(jax.random.key(3), 8),
        "rbg": jax.random.key(5, impl="rbg"),
    }
    keys["sharded"] = jax.device_put(keys["many"], NamedSharding(mesh, P("x")))
    ac.save(root / "ck", keys)
    for back in (ac.restore(root / "ck"), ac.restore(root / "ck", keys)):
        for name, k in keys.items():
            assert back[name].dtype == k.dtype
            assert jax.random.key_impl(back[name]) == jax.random.key_impl(k)
            assert_same(jax.random.key_data(back[name]), jax.random.key_data(k))
    assert ac.restore(root / "ck", keys)["sharded"].sharding == keys["sharded"].sharding
    info = ac.list_variables(root / "ck")["many"]
    assert (info.shape, info.dtype, info.prng_impl) == ((8, 2), np.uint32, "threefry2x32")
    assert_same(ac.load_variable(root / "ck", "one"), jax.random.key_data(keys["one"]))


class Pair(NamedTuple):
    first: object
    second: object


@dataclasses.dataclass
class Layer:
    w: object
    b: object
    name: str = "dense"


jax.tree_util.register_dataclass(Layer, data_fields=["w", "b"], meta_fields=["name"])


def test_tree_structure_round_trips_without_target(root):
    tree = {
        "list": [np.ones(2), (np.zeros(1), None)],
        "pair": Pair(np.arange(3), [1, 2.5, True, "text", -7]),
        "layer": Layer(np.eye(2), np.ones(2), name="proj"),
        "none": None,
        "empty": {},
        "ints": {1: np.ones(1), 2: np.zeros(1)},
        "nan": float("nan"),
        "big": 2**80,
    }
    back = ac.restore(ac_save(root, tree))
    assert isinstance(back["pair"], Pair) and isinstance(back["layer"], Layer)
    assert back["layer"].name == "proj"
    assert back["list"][1][1] is None and back["none"] is None and back["empty"] == {}
    assert back["pair"].second == [1, 2.5, True, "text", -7]
    assert type(back["pair"].second[2]) is bool
    assert set(back["ints"]) == {1, 2}
    assert np.isnan(back["nan"]) and back["big"] == 2**80
    leaves_a, def_a = jax.tree_util.tree_flatten(tree)
    leaves_b, def_b = jax.tree_util.tree_flatten(back)
    assert def_a == def_b
    for a, b in zip(leaves_a, leaves_b):
        assert_same(a, b) if isinstance(a, np.ndarray) else _same_scalar(a, b)


def _same_scalar(a, b):
    assert type(a) is type(b)
    assert a == b or (a != a and b != b)


def ac_save(root, tree, **kw):
    path = root / "ck"
    ac.save(path, tree, **kw)
    return path


def test_restore_with_target_keeps_target_structure(root):
    saved = {"layer": {"w": np.ones((2, 2)), "b": np.zeros(2)}, "step": 4}
    path = ac_save(root, saved)
    target = {"layer": Layer(w=np.empty((2, 2)), b=np.empty(2), name="x"), "step": 0}
    back = ac.restore(path, target)
    assert isinstance(back["layer"], Layer) and back["layer"].name == "x"
    assert_same(back["layer"].w, saved["layer"]["w"])
    assert back["step"] == 4


def test_metadata_round_trips(root):
    meta = {"lr": 0.1, "tags": ["a", "b"], "nested": {"n": 3}}
    path = ac_save(root, {"x": np.ones(1)}, metadata=meta)
    assert ac.read_metadata(path) == meta


def test_list_variables_describes_arrays(root, mesh):
    x = jax.device_put(jnp.ones((8, 4), jnp.bfloat16), NamedSharding(mesh, P("x")))
    path = ac_save(root, {"params": {"w": x, "b": np.zeros(3, np.int64)}, "step": 1})
    info = ac.list_variables(path)
    assert set(info) == {"params/w", "params/b"}
    w = info["params/w"]
    assert (w.shape, w.dtype, w.nbytes, w.chunk_shape) == ((8, 4), jnp.bfloat16, 64, (2, 4))
    assert info["params/b"].nbytes == 24


def test_restore_casts_within_a_kind(root):
    path = ac_save(root, {"w": np.linspace(0, 1, 5, dtype=np.float32)})
    back = ac.restore(path, {"w": jax.ShapeDtypeStruct((5,), jnp.bfloat16)})["w"]
    assert back.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(back, np.float32), np.linspace(0, 1, 5), atol=1e-2)


def test_large_leaves_copied_in_parallel_parts_round_trip(root, mesh):
    """Leaves over the copy-split size (32 MiB) are copied by several threads in row blocks."""
    host = np.arange(9 * 2**20, dtype=np.float32).reshape(3 * 2**10, 3 * 2**10)  # 36 MiB
    tree = {
        "numpy": host,
        "replicated": jax.device_put(host, NamedSharding(mesh, P())),
        "sharded": jax.device_put(host, NamedSharding(mesh, P(None, "y"))),  # 18 MiB shards
    }
    with ac.AsyncCheckpointer() as ckptr:
        ckptr.save(root / "ck", tree)
        tree["numpy"] = None  # the caller may drop its arrays right away
    back = ac.restore(root / "ck")
    for name in ("numpy", "replicated", "sharded"):
        assert_same(back[name], host)


def test_load_variable_salvages_a_variable_of_a_damaged_checkpoint(root, caplog):
    path = ac_save(root, {"want": np.arange(6).reshape(2, 3), "other": np.ones(4)})
    remove_file(path / "other" / "c.0")  # another variable's data ...
    doc = path / "zarr.json"
    write_file(doc, read_file(doc).replace(b'"asyncckpt"', b'"garbage!"'))  # ... and the root
    with caplog.at_level("WARNING", logger="asyncckpt"):
        assert_same(ac.load_variable(path, "want"), np.arange(6).reshape(2, 3))
    assert "loading 'want' by its own zarr.json alone" in caplog.text


@pytest.mark.parametrize("max_shardings", [None, 0])
def test_repeated_saves_of_one_structure_store_each_saves_values(
    root, mesh, monkeypatch, max_shardings
):
    """Saves of the same structure reuse a cached plan; values, scalar leaves and shardings
    must still come from each save (also when the shardings the plans' keys hold are forgotten
    at each save: `max_shardings` 0)."""
    from asyncckpt import _snapshot

    if max_shardings is not None:
        monkeypatch.setattr(_snapshot, "_MAX_SHARDINGS", max_shardings)
    sharded = NamedSharding(mesh, P("x", "y"))
    with ac.AsyncCheckpointer() as ckptr:
        for i, scalar in enumerate([1, 2, -0.0, 0.0, float("nan")]):
            tree = {
                "w": jax.device_put(jnp.full((8, 4), i, jnp.float32), sharded),
                "h": np.full(3, i),
                "s": scalar,
            }
            ckptr.save(root / str(i), tree)
        other = {
            "w": jax.device_put(jnp.full((8, 4), 9, jnp.float32), NamedSharding(mesh, P())),
            "h": np.full(3, 9),
            "s": 1,
        }
        ckptr.save(root / "other", other)
        again = {"w": jax.device_put(jnp.full((8, 4), 7, jnp.float32), sharded), "h": np.ones(3)}
        ckptr.save(root / "again", {**again, "s": 1})
    assert ac.list_variables(root / "again")["w"].chunk_shape == (2, 2)
    assert_same(ac.restore(root / "again")["w"], np.full((8, 4), 7, np.float32))
    for i, scalar in enumerate([1, 2, -0.0, 0.0, float("nan")]):
        got = ac.restore(root / str(i))
        assert_same(got["w"], np.full((8, 4), i, np.float32))
        assert_same(got["h"], np.full(3, i))
        assert repr(got["s"]) == repr(scalar) and type(got["s"]) is type(scalar)
    assert ac.list_variables(root / "0")["w"].chunk_shape == (2, 2)
    assert ac.list_variables(root / "other")["w"].chunk_shape == (8, 4)
    assert_same(ac.restore(root / "other")["w"], np.full((8, 4), 9, np.float32))


@pytest.mark.parametrize("limit_mib", [4, 12])
def test_max_inflight_bytes_bounds_the_shards_staged_in_host_memory(
    tmp_path, monkeypatch, limit_mib
):
    """Measured from outside, by tracemalloc (which sees numpy's allocations). Restored as
    float64 from float32, each staged buffer is freed once its array is placed, as on an
    accelerator; so between two placements the peak of traced memory beyond what was placed
    before is what was staged at once. (One batch of the whole tree was staged whatever the
    limit said; then each group's buffers lived on until the next group was staged.)"""
    import tracemalloc

    from asyncckpt import _restore

    tree = {f"w{i:02d}": np.full((256, 1024), i, np.float32) for i in range(32)}  # 32 x 1 MiB
    ac.save(tmp_path / "ck", tree)
    target = {k: np.zeros((256, 1024), np.float64) for k in tree}
    place, placed, staged = _restore._place, [0], []

    def measured_place(*args):
        staged.append(tracemalloc.get_traced_memory()[1] - placed[0])
        values = place(*args)
        placed[0] += sum(v.nbytes for v in values)
        tracemalloc.reset_peak()
        return values

    monkeypatch.setattr(_restore, "_place", measured_place)
    tracemalloc.start()
    try:
        back = ac.restore(
            tmp_path / "ck", target, max_inflight_bytes=limit_mib << 20, map_files=False
        )
        staged.append(tracemalloc.get_traced_memory()[1] - placed[0])
    finally:
        tracemalloc.stop()
    assert len(staged) > 32 // limit_mib
    assert max(staged) <= (limit_mib << 20) + (1 << 20), [s / 2**20 for s in staged]
    for k, v in tree.items():
        assert_same(back[k], v.astype(np.float64))


def test_python_scalar_leaves_follow_the_target(tmp_path, mesh):
    """A python scalar is stored in the tree description; restored against an array target it
    comes back as that array (dtype, sharding), and a 0-d array restored against a python
    scalar target comes back as that python type."""
    ac.save(
        tmp_path / "ck",
        {"step": 7, "lr": 0.5, "flag": True, "n": np.int64(3), "big": 2**40, "vec": np.arange(3)},
    )
    replicated = NamedSharding(mesh, P())
    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "lr": jnp.zeros((), jnp.float32),
        "flag": np.bool_(False),
        "n": 0,
        "big": 0,
        "vec": np.zeros(3, np.int64),
    }
    back = ac.restore(tmp_path / "ck", target)
    assert isinstance(back["step"], jax.Array) and back["step"].dtype == jnp.int32
    assert back["step"].sharding == replicated and int(back["step"]) == 7
    assert isinstance(back["lr"], jax.Array) and back["lr"].dtype == jnp.float32
    assert float(back["lr"]) == 0.5 and back["lr"].shape == ()
    assert type(back["flag"]) is np.bool_ and bool(back["flag"])
    assert type(back["n"]) is int and back["n"] == 3
    assert type(back["big"]) is int and back["big"] == 2**40
    for bad, match in (
        ({"step": jax.ShapeDtypeStruct((2,), jnp.int32)}, "shape differs"),
        ({"lr": jnp.zeros((), jnp.int32)}, "loses the kind"),
        ({"big": np.zeros((), np.int32)}, "does not fit in the target's int32"),
        ({"vec": 0}, r"vec.*shape differs|shape differs.*vec"),
    ):
        with pytest.raises(ac.TreeMismatchError, match=match):
            ac.restore(tmp_path / "ck", bad, strict=False)
