"""Large chunks are stored as Zarr shards of row bands, each band with its own crc32c, so a
restore reads and verifies only the bands it needs."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import assert_same, read_file, write_file
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac
from asyncckpt import _format

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from counting import count_chunk_reads  # noqa: E402

ROWS, COLS = 3072, 2048  # 24 MiB of float32: bands of 512 rows (4 MiB), 6 bands
VALUE = np.random.default_rng(0).standard_normal((ROWS, COLS), dtype=np.float32)
STRIDE = 512 * COLS * 4 + 4096  # a band, its checksum, padding to the next 4 KiB


@pytest.fixture
def saved(tmp_path):
    ac.save(tmp_path / "ck", {"w": VALUE, "small": VALUE[:4, :4].copy()})
    return tmp_path / "ck"


@pytest.fixture
def saved_anywhere(root):
    """The same checkpoint, on each backend."""
    ac.save(root / "ck", {"w": VALUE, "small": VALUE[:4, :4].copy()})
    return root / "ck"


@pytest.fixture
def reads():
    """Bytes read from chunk files, counted at the system call."""
    counter, stop = count_chunk_reads()
    yield counter
    stop()


def test_large_chunks_are_banded_small_ones_are_not(saved):
    doc = json.loads((saved / "w" / "zarr.json").read_text())
    (codec,) = doc["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [512, COLS]
    assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "crc32c"]
    raw = (saved / "w" / "c.0.0").read_bytes()
    band = 512 * COLS * 4
    assert len(raw) == 6 * (band + 4096) + 6 * 16 + 4  # bands, checksums and padding, the index
    index = np.frombuffer(raw[-6 * 16 - 4 : -4], "<u8").reshape(6, 2)
    assert index.tolist() == [[i * (band + 4096), band + 4] for i in range(6)]
    for i in range(6):  # each band starts on a page, is the chunk's rows, and its padding is 0
        start = i * (band + 4096)
        assert raw[start : start + band] == VALUE[i * 512 : (i + 1) * 512].tobytes()
        assert raw[start + band + 4 : start + band + 4096] == bytes(4092)
    small = json.loads((saved / "small" / "zarr.json").read_text())
    assert [c["name"] for c in small["codecs"]] == ["bytes", "crc32c"]


@pytest.mark.parametrize(
    "mesh_shape, spec",
    [
        ((8,), P("x", None)),  # 384-row shards: bands are shared between devices
        ((3,), P("x", None)),  # 1024-row shards
        ((8,), P(None, "x")),  # column strips: every band
        ((2, 4), P("y", "x")),
    ],
)
def test_banded_chunk_restores_onto_any_sharding(saved_anywhere, mesh_shape, spec):
    n = int(np.prod(mesh_shape))
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(mesh_shape), ("x", "y")[: len(mesh_shape)])
    target = jax.ShapeDtypeStruct(VALUE.shape, VALUE.dtype, sharding=NamedSharding(mesh, spec))
    got = ac.restore(saved_anywhere, {"w": target}, strict=False)["w"]
    assert got.sharding == target.sharding
    assert_same(got, VALUE)


def test_whole_read_is_one_pass_over_the_file(saved, reads):
    assert_same(ac.restore(saved)["w"], VALUE)
    file_size = (saved / "w" / "c.0.0").stat().st_size
    assert reads["bytes"] <= file_size + VALUE[:4, :4].nbytes + 8


def test_only_the_needed_bands_are_read(saved, reads):
    """A request for rows 600..900 reads band 1 (rows 512..1024) and the index, nothing else."""
    from asyncckpt import _restore
    from asyncckpt._storage import open_storage

    ckpt = open_storage(saved)
    spec = _restore.read_root(ckpt).arrays["w"]
    reads["bytes"] = 0
    out = np.empty((300, COLS), np.float32)
    request = _restore._Request((slice(600, 900), slice(0, COLS)), out)
    _restore._read_chunk(
        ckpt, "w/c.0.0", spec, spec.chunk_slices((0, 0)), [(request, request.index)], "test"
    )
    assert_same(out, VALUE[600:900])
    assert reads["bytes"] == 512 * COLS * 4 + 4 + (16 * 6 + 4)  # no padding: one band


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda data: data.__setitem__(2 * STRIDE + 10, data[2 * STRIDE + 10] ^ 1),
            r"checksum mismatch in band 2 of chunk file .*w/c\.0\.0",
        ),
        (
            lambda data: data.__setitem__(len(data) - 30, data[len(data) - 30] ^ 1),
            r"shard index of chunk file .*w/c\.0\.0 is damaged",
        ),
        (lambda data: data.__delitem__(slice(len(data) - 1, None)), r"expected \d+ \(truncated"),
    ],
)
def test_damaged_banded_chunk_is_corrupt(saved_anywhere, damage, match):
    path = saved_anywhere / "w" / "c.0.0"
    data = bytearray(read_file(path))
    damage(data)
    write_file(path, bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match=match):
        ac.restore(saved_anywhere)


def test_band_rows_choice():
    f = _format.band_rows_for
    assert f((1024, 1024), 4) is None  # 4 MiB: one band, a plain chunk
    assert f((3072, 2048), 4) == 512
    assert f((4099, 2048), 4) is None  # prime rows: bands of one 8 KiB row would be tiny
    assert f((6, 1 << 20), 4) == 1  # one 4 MiB row per band
    assert f((6, (1 << 20) + 1), 4) is None  # a row is bigger than a band
    assert f((100, 65536), 2) == 25  # the most rows that divide the chunk and fit in 4 MiB


@pytest.mark.parametrize("spec", [P("x"), P(None, "x")], ids=["rows", "columns"])
def test_a_one_chunk_array_is_restored_in_its_shards_memory_not_twice(tmp_path, spec):
    """Issue 21: a one-chunk array restored onto 8 devices took twice its size in host memory
    (the target's shards, and the whole chunk read into one buffer to scatter from), whatever
    `max_inflight_bytes` said. Now the bands a device's rows hold whole are read straight into
    its shard, and the rest (here: column slices) through buffers of at most 16 MiB. Measured
    by tracemalloc, which sees numpy's allocations."""
    import tracemalloc

    value = np.arange(8192 * 2048, dtype=np.float32).reshape(8192, 2048)  # 64 MiB, 16 bands
    ac.save(tmp_path / "ck", {"w": value})
    target = jax.ShapeDtypeStruct(
        value.shape, value.dtype, sharding=NamedSharding(jax.make_mesh((8,), ("x",)), spec)
    )
    tracemalloc.start()
    try:
        back = ac.restore(tmp_path / "ck", {"w": target})["w"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    beyond = peak - value.nbytes  # what the restore held besides the target's shards
    assert beyond <= (16 << 20) + (1 << 20), f"{beyond / 2**20:.1f} MiB beyond the shards"
    for shard in back.addressable_shards:
        assert_same(shard.data, value[shard.index])
