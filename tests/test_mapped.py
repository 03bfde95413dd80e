"""Restoring by mapping: a chunk that is exactly one device's shard is mapped copy-on-write from
its file (checksums verified through the mapping), not copied into new memory. Chunks under the
mapping threshold are read, in order by one thread that prefetches the files ahead of it."""

import gc
import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest
from conftest import assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac
from asyncckpt import _executor, _format
from asyncckpt._storage import local as _local

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")

RNG = np.random.default_rng(7)
PLAIN = RNG.standard_normal((1024, 512), dtype=np.float32)  # 4 shards of 512 KiB: plain chunks
BANDED = RNG.standard_normal((2048, 1024), dtype=np.float32)  # one 8 MiB chunk: 2 row bands
SMALL = np.arange(1000, dtype=np.int32)  # under the mapping threshold: read


@pytest.fixture
def mesh():
    return jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])


def tree(mesh):
    return {
        "plain": jax.device_put(PLAIN, NamedSharding(mesh, P("x"))),
        "banded": BANDED,
        "small": SMALL,
    }


def target(mesh):
    return {
        "plain": jax.ShapeDtypeStruct(
            PLAIN.shape, PLAIN.dtype, sharding=NamedSharding(mesh, P("x"))
        ),
        "banded": jax.ShapeDtypeStruct(
            BANDED.shape, BANDED.dtype, sharding=NamedSharding(mesh, P())
        ),
        "small": np.zeros_like(SMALL),
    }


def mapping_of(address: int) -> str:
    """The file (or "" for anonymous memory) mapped at `address` in this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) == 6 else ""
    raise AssertionError(f"{address:#x} is not mapped")


def check(restored):
    assert_same(restored["plain"], PLAIN)
    assert_same(restored["banded"], BANDED)
    assert_same(restored["small"], SMALL)


def test_resumed_shards_are_their_chunk_files_mapped(tmp_path, mesh):
    ac.save(tmp_path / "ck", tree(mesh))
    restored = ac.restore(tmp_path / "ck", target(mesh))
    check(restored)
    assert restored["plain"].sharding == target(mesh)["plain"].sharding
    for shard in restored["plain"].addressable_shards:
        row = shard.index[0].start // 256
        assert mapping_of(shard.data.unsafe_buffer_pointer()) == str(
            tmp_path / "ck" / "plain" / f"c.{row}.0"
        )
    # the banded chunk: each 4 MiB band is its own mapping of the file, side by side in memory
    start = restored["banded"].addressable_shards[0].data.unsafe_buffer_pointer()
    for band in range(2):
        assert mapping_of(start + band * (4 << 20)) == str(tmp_path / "ck" / "banded" / "c.0.0")
    # replicated: the other devices hold copies, one of them may alias the mapping
    assert mapping_of(restored["small"].ctypes.data) != str(tmp_path / "ck" / "small" / "c.0")


def test_map_files_false_reads_into_memory_of_its_own(tmp_path, mesh):
    ac.save(tmp_path / "ck", tree(mesh))
    restored = ac.restore(tmp_path / "ck", target(mesh), map_files=False)
    check(restored)
    for shard in restored["plain"].addressable_shards:
        assert "ck/plain" not in mapping_of(shard.data.unsafe_buffer_pointer())
    with ac.CheckpointManager(tmp_path / "m", map_files=False) as mgr:
        mgr.save(1, tree(mesh))
        mgr.wait_until_finished()
        got = mgr.restore(1, target(mesh))
        for shard in got["plain"].addressable_shards:
            assert "plain" not in mapping_of(shard.data.unsafe_buffer_pointer())


def test_writes_to_restored_arrays_never_reach_the_files(tmp_path, mesh):
    ac.save(tmp_path / "ck", tree(mesh))
    before = {p: p.read_bytes() for p in (tmp_path / "ck").rglob("c*") if p.is_file()}
    as_numpy = ac.restore(tmp_path / "ck")
    assert as_numpy["banded"].flags.writeable
    as_numpy["banded"][:] = 0  # copy-on-write: this process's pages only
    as_numpy["plain"][5] = -1
    # a donated argument may be written in place by XLA
    restored = ac.restore(tmp_path / "ck", target(mesh))
    doubled = jax.jit(lambda x: x * 2, donate_argnums=0)(restored["plain"])
    assert_same(doubled, PLAIN * 2)
    assert {p: p.read_bytes() for p in before} == before
    check(ac.restore(tmp_path / "ck", target(mesh)))


def test_restored_arrays_outlive_their_checkpoint(tmp_path, mesh):
    with ac.CheckpointManager(tmp_path / "m", max_to_keep=1) as mgr:
        mgr.save(1, tree(mesh))
        mgr.wait_until_finished()
        restored = mgr.restore(1, target(mesh))
        other = {
            "plain": jax.device_put(PLAIN + 1, NamedSharding(mesh, P("x"))),
            "banded": BANDED + 1,
            "small": SMALL + 1,
        }
        mgr.save(1, other, force=True)  # replaced...
        mgr.save(2, other)  # ...then deleted by retention
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]
    shutil.rmtree(tmp_path / "m")
    check(restored)


def test_bands_written_packed_are_read(tmp_path, monkeypatch):
    """Bands without padding (asyncckpt before aligned bands, or bands not a whole number of
    pages) cannot be mapped side by side; they are read, and zarr-python reads them too."""
    import zarr

    with monkeypatch.context() as m:
        m.setattr(_format, "band_stride", lambda band_nbytes: band_nbytes + 4)
        ac.save(tmp_path / "ck", {"banded": BANDED})
    size = (tmp_path / "ck" / "banded" / "c.0.0").stat().st_size
    assert size == BANDED.nbytes + 2 * 4 + 2 * 16 + 4
    restored = ac.restore(tmp_path / "ck")
    assert_same(restored["banded"], BANDED)
    assert mapping_of(restored["banded"].ctypes.data) != str(tmp_path / "ck/banded/c.0.0")
    ac.verify(tmp_path / "ck")
    assert_same(zarr.open_array(tmp_path / "ck" / "banded", mode="r")[:], BANDED)


def test_too_many_mappings_fall_back_to_reading(tmp_path, mesh, monkeypatch):
    ac.save(tmp_path / "ck", tree(mesh))
    budget = _local._MappingBudget()
    budget._limit = 2  # room for two plain shards (the banded chunk needs 3): the rest is read
    monkeypatch.setattr(_local, "_mappings", budget)
    restored = ac.restore(tmp_path / "ck", target(mesh))
    check(restored)
    mapped = [
        s
        for s in restored["plain"].addressable_shards
        if "ck/plain" in mapping_of(s.data.unsafe_buffer_pointer())
    ]
    assert len(mapped) == 2 and budget._live == 2
    del restored, mapped
    gc.collect()
    assert budget._live == 0  # freeing the arrays gives their mappings back


def test_damaged_mapped_chunk_is_corrupt_and_leaks_nothing(tmp_path, mesh, monkeypatch):
    ac.save(tmp_path / "ck", tree(mesh))
    path = tmp_path / "ck" / "plain" / "c.2.0"
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    budget = _local._MappingBudget()
    monkeypatch.setattr(_local, "_mappings", budget)
    with pytest.raises(
        ac.CorruptCheckpointError, match=r"'plain'.*checksum mismatch in chunk file .*plain/c\.2\.0"
    ):
        ac.restore(tmp_path / "ck", target(mesh))
    gc.collect()
    assert budget._live == 0


def test_small_chunks_are_read_in_order_by_one_thread_that_prefetches_ahead(tmp_path, monkeypatch):
    """Thousands of small chunks cost Python more than copying: one thread reads them, each
    file prefetched (the kernel's read-ahead) at most `AHEAD_READS` reads before it is read, so
    the disk still gets many requests at once; chunks that are mapped go to every thread, and
    each of those threads prefetches its chunks ahead of mapping them."""
    small = {f"s{i:03d}": np.full(1024, i, np.float32) for i in range(300)}
    large = {f"l{i:02d}": np.full(1 << 18, i, np.float32) for i in range(16)}  # 1 MiB: mapped
    path = tmp_path / "ck"
    ac.save(path, {**small, **large})
    events: list[tuple[str, str, str]] = []  # (what, chunk key, thread)

    def spy(method, what, delay=0.0):
        original = getattr(_local.LocalStorage, method)

        def spied(self, key, *args):
            events.append((what, key, threading.current_thread().name))
            time.sleep(delay)  # the mapped chunks' threads take a while: the others join
            return original(self, key, *args)

        monkeypatch.setattr(_local.LocalStorage, method, spied)

    spy("prefetch", "prefetch")
    spy("read_chunk_into", "read")
    spy("map_chunk", "map", delay=0.01)
    monkeypatch.setattr(_executor, "AHEAD_READS", 8)
    with ac.AsyncCheckpointer(max_workers=8) as ckptr:
        back = ckptr.restore(path, {**small, **large})
    for name, value in {**small, **large}.items():
        assert_same(back[name], value)

    reads = [key for what, key, _ in events if what == "read"]
    assert reads == sorted(f"s{i:03d}/c.0" for i in range(300))  # in order, each once
    assert len({t for what, _, t in events if what == "read"}) == 1
    prefetched: list[str] = []
    for what, key, _ in events:
        if what == "prefetch" and key.startswith("s"):
            prefetched.append(key)
        elif what == "read":  # prefetched before, and no more than 8 reads ahead
            assert key in prefetched and len(prefetched) - prefetched.index(key) <= 8, key
    assert sorted(prefetched) == reads
    mapped = {t for what, _, t in events if what == "map"}
    assert len([e for e in events if e[0] == "map"]) == 16 and len(mapped) > 1, mapped
    for thread in mapped:  # in order on each thread, each prefetched there before it is mapped
        mine = [(what, key) for what, key, t in events if t == thread and key.startswith("l")]
        maps = [key for what, key in mine if what == "map"]
        assert maps == sorted(maps)
        for i, (what, key) in enumerate(mine):
            if what == "map":
                assert ("prefetch", key) in mine[:i], (thread, key)
    # ahead: some thread asks for a chunk's read-ahead before it maps the chunk before that
    assert any(
        [what for what, key, t in events if t == thread and key.startswith("l")][:2]
        == ["prefetch", "prefetch"]
        for thread in mapped
    )
