"""The storage contract: every behaviour of the `Storage` interface, on every backend.

Like zarr-python's `StoreTests`, one suite runs on each backend: the local file system,
`memory://` (obstore's in-memory store) and S3 (moto's server on 127.0.0.1). Damaged, missing and
foreign data are part of the contract. A new backend passes this file before anything else.
"""

import gc
import os
import uuid

import numpy as np
import pytest
from conftest import S3_BUCKET

import asyncckpt as ac
from asyncckpt import _format
from asyncckpt._storage import Storage, open_storage

BACKENDS = ["local", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def place(request, tmp_path) -> Storage:
    """A fresh, empty place on one backend."""
    name = uuid.uuid4().hex[:12]
    if request.param == "local":
        return open_storage(tmp_path / name)
    if request.param == "memory":
        return open_storage(f"memory://contract/{name}")
    request.getfixturevalue("s3_server")
    return open_storage(f"s3://{S3_BUCKET}/contract-{name}")


def _data(shape=(64, 1024), dtype=np.float32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _make_dirs(place: Storage, *keys: str) -> None:
    place.prepare_directory()
    place.make_dirs(keys)


def _flip(place: Storage, key: str, offset: int) -> None:
    data = bytearray(place.get(key).tobytes())
    data[offset] ^= 0x10
    place.write(key, bytes(data))


def _commit_checkpoint(place: Storage, *, replace: bool = False, value: float = 1.0) -> None:
    """A minimal committed asyncckpt checkpoint at `place`, through the commit protocol."""
    staged = place.begin(replace=replace)
    spec = _format.ArraySpec("x", (4,), np.dtype(np.float32), (4,))
    staged.make_dirs(["x"])
    staged.write("x/zarr.json", _format.array_doc(spec))
    staged.write_chunk("x/c.0", np.full(4, value, np.float32), None)
    fields = _format.root_fields(None, None, "test")
    staged.write(
        _format.DOC,
        _format.root_doc(
            [spec], {"t": "dict", "k": ["x"], "c": [{"t": "array", "v": "x"}]}, fields, created=0.0
        ),
    )
    staged.sync()
    place.commit(staged, replace=replace)


# ------------------------------------------------------------------------------------- bytes


def test_bytes_round_trip_whole_ranges_and_suffixes(place):
    _make_dirs(place, "d")
    place.write("d/f", b"hello ", memoryview(b"world"), np.frombuffer(b"!", np.uint8))
    assert place.get("d/f").tobytes() == b"hello world!"
    assert place.get("d/f", start=6, end=11).tobytes() == b"world"
    assert place.get("d/f", start=6).tobytes() == b"world!"
    assert place.get("d/f", suffix=6).tobytes() == b"world!"
    assert place.read_small("d/f", 100) == b"hello world!"
    assert place.size("d/f") == 12 and place.exists("d/f")
    place.write("d/f", b"")  # replaced
    assert place.get("d/f").tobytes() == b"" and place.exists("d/f")
    place.delete("d/f")
    assert not place.exists("d/f")


def test_runs_are_read_into_caller_memory(place):
    """`read_runs_into`: scattered byte runs of one file straight into the caller's buffers
    (near runs share a request on object stores, far ones do not; both must be right)."""
    data = np.arange(3 << 20, dtype=np.uint8) * 7
    _make_dirs(place, "d")
    place.write("d/f", data)
    offsets = [0, 100, 5000, (2 << 20) + 3, (3 << 20) - 10]
    out = np.zeros(10 * len(offsets), np.uint8)
    runs = [(o, memoryview(out[10 * i : 10 * i + 10])) for i, o in enumerate(offsets)]
    place.read_runs_into("d/f", runs, "reading a test file")
    assert out.tobytes() == b"".join(data[o : o + 10].tobytes() for o in offsets)
    with pytest.raises(ac.CorruptCheckpointError, match="reading a test file"):
        place.read_runs_into("d/f", [(3 << 20, memoryview(out[:10]))], "reading a test file")


def test_a_reused_chunk_is_independent_of_its_source(place):
    """`reuse_chunk` from a committed checkpoint: the same bytes, without writing them, and
    deleting either checkpoint leaves the other whole. Local disk and object stores do it;
    another backend's (or a missing) source says no, and the caller writes."""
    source = place.child("1")
    _commit_checkpoint(source, value=3.0)
    staged = place.child("2").begin(replace=False)
    staged.make_dirs(["x"])
    assert staged.reuse_chunk("x/c.0", source, "x/c.0")
    assert not staged.reuse_chunk("x/c.1", source, "x/missing")
    assert not staged.reuse_chunk("x/c.1", open_storage("memory://elsewhere/1"), "x/c.0")
    out = np.empty(4, np.float32)
    staged.read_chunk_into("x/c.0", out, "reading the reused chunk")
    assert (out == 3.0).all()
    source.unlist()
    source.remove()
    staged.read_chunk_into("x/c.0", out, "reading it after its source was deleted")
    assert (out == 3.0).all()


def test_missing_files_and_oversized_documents(place):
    for call in (
        lambda: place.read_small("nope", 10),
        lambda: place.get("nope"),
        lambda: place.size("nope"),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    _make_dirs(place)
    place.write("big.json", b"x" * 101)
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=r"big\.json is 10[01] bytes, more than "
        r"the 100 allowed",
    ):
        place.read_small("big.json", 100)


def test_kind_tells_nothing_a_file_and_a_directory(place):
    assert place.kind() == "missing"
    _make_dirs(place, "sub")
    place.write("sub/file", b"x")
    assert place.kind() == "directory" and place.child("sub").kind() == "directory"
    assert place.child("sub/file").kind() == "file"
    assert place.child("sub/other").kind() == "missing"


def test_child_and_path_name_places(place):
    child = place.child("a/b")
    assert child.url == place.path("a/b") and child.name == "b"
    assert open_storage(child.url) == child and hash(open_storage(child.url)) == hash(child)


# ------------------------------------------------------------------------------- chunk files


@pytest.mark.parametrize("shape", [(64, 1024), (3,), ()], ids=str)
def test_plain_chunks_round_trip_with_checksums(place, shape):
    _make_dirs(place, "w")
    value = _data(shape)
    place.write_chunk("w/c", value, None)
    out = np.empty_like(value)
    place.read_chunk_into("w/c", out, "test")
    np.testing.assert_array_equal(out, value)
    whole = place.read_chunk_file("w/c", (value.nbytes + 4,), "test")
    assert whole.nbytes == value.nbytes + 4
    _format.check_chunk_file(whole, value.nbytes, None, place.path("w/c"), "test")


def test_prefetch_is_a_hint_that_never_fails(place, tmp_path):
    """`prefetch` starts fetching a file and returns; what is wrong with the file (missing, a
    directory, a FIFO that would block a reader) is the read's to report, not the hint's."""
    _make_dirs(place, "w")
    value = _data((3, 5))
    place.write_chunk("w/c", value, None)
    for key in ("w/c", "w/missing", "w", "nowhere/c"):
        place.prefetch(key, value.nbytes + 4)
    if place.local_path is not None and hasattr(os, "mkfifo"):
        os.mkfifo(place.path("w/fifo"))
        place.prefetch("w/fifo", 64)  # returns at once: opened without blocking
    out = np.empty_like(value)
    place.read_chunk_into("w/c", out, "test")
    np.testing.assert_array_equal(out, value)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_prefetched_files_are_read_as_they_are_and_never_left_open(place):
    """A local prefetch keeps each file open for the read that follows; however many are
    prefetched, at most a bounded number stay open, each read closes its own, and those never
    read close with the storage. A file that is no regular file still fails its read."""
    _make_dirs(place, "w")
    values = [_data((4,), seed=i) for i in range(300)]
    for i, v in enumerate(values):
        place.write_chunk(f"w/c.{i}", v, None)
    local = place.local_path is not None and os.path.isdir("/proc/self/fd")
    before = _open_fds() if local else 0
    for i, v in enumerate(values):
        place.prefetch(f"w/c.{i}", v.nbytes + 4)
    if local:
        assert before < _open_fds() <= before + 256
    for i, v in enumerate(values):
        out = np.empty_like(v)
        place.read_chunk_into(f"w/c.{i}", out, "test")
        np.testing.assert_array_equal(out, v)
    if local:
        assert _open_fds() == before
        other = open_storage(place.url)  # pytest holds `place`
        for i in range(10):
            other.prefetch(f"w/c.{i}", 20)
        assert _open_fds() == before + 10
        del other
        gc.collect()
        assert _open_fds() == before
        if hasattr(os, "mkfifo"):
            os.mkfifo(place.path("w/fifo"))
            place.prefetch("w/fifo", 64)
            with pytest.raises(ac.CorruptCheckpointError, match=r"w/fifo is a FIFO"):
                place.read_chunk_into("w/fifo", np.empty(4, np.float32), "test")
            assert _open_fds() == before


def test_damaged_truncated_and_missing_chunks_say_what_and_where(place):
    _make_dirs(place, "w")
    value = _data()
    place.write_chunk("w/c", value, None)
    _flip(place, "w/c", 100)
    out = np.empty_like(value)
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=r"where: checksum mismatch in chunk file "
        r".*w/c$",
    ):
        place.read_chunk_into("w/c", out, "where")
    place.write("w/c", place.get("w/c", end=1000))
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=r"chunk file .*w/c has 1000 bytes, "
        rf"expected {value.nbytes + 4}",
    ):
        place.read_chunk_into("w/c", out, "where")
    with pytest.raises(ac.IncompleteCheckpointError, match=r"chunk file .*w/gone is missing"):
        place.read_chunk_into("w/gone", out, "where")
    with pytest.raises(ac.IncompleteCheckpointError, match="is missing"):
        place.read_chunk_file("w/gone", (4,), "where")


BAND = 64 * 1024 * 4  # bytes per band: 64 rows of 1024 float32, a whole number of pages


def test_banded_chunks_read_any_run_of_bands(place):
    _make_dirs(place, "w")
    value = _data((512, 1024))  # 8 bands
    place.write_chunk("w/c", value, BAND)
    assert place.size("w/c") == _format.chunk_file_sizes(value.nbytes, BAND)[0]
    for first, count in ((0, 8), (3, 2), (7, 1)):
        out = np.empty((64 * count, 1024), np.float32)
        place.read_bands_into("w/c", out, first, 8, BAND, "test")
        np.testing.assert_array_equal(out, value[64 * first : 64 * (first + count)])
    whole = place.read_chunk_file("w/c", _format.chunk_file_sizes(value.nbytes, BAND), "test")
    _format.check_chunk_file(whole, value.nbytes, BAND, place.path("w/c"), "test")


def test_damaged_bands_and_shard_index_are_caught(place):
    _make_dirs(place, "w")
    value = _data((512, 1024))
    place.write_chunk("w/c", value, BAND)
    stride = _format.band_stride(BAND)
    out = np.empty((64, 1024), np.float32)
    _flip(place, "w/c", 2 * stride + 10)
    with pytest.raises(ac.CorruptCheckpointError, match=r"checksum mismatch in band 2 of chunk"):
        place.read_bands_into("w/c", out, 2, 8, BAND, "test")
    place.read_bands_into("w/c", out, 3, 8, BAND, "test")  # the others are fine
    place.write_chunk("w/c", value, BAND)
    _flip(place, "w/c", place.size("w/c") - 20)
    with pytest.raises(ac.CorruptCheckpointError, match=r"shard index of chunk file .* damaged"):
        place.read_bands_into("w/c", out, 0, 8, BAND, "test")
    place.write("w/c", place.get("w/c", end=5 * stride))
    with pytest.raises(ac.CorruptCheckpointError, match=rf"has {5 * stride} bytes, expected"):
        place.read_bands_into("w/c", out, 0, 8, BAND, "test")


def test_mapping_where_the_backend_can(place):
    _make_dirs(place, "w")
    plain, banded = _data((64, 1024)), _data((512, 1024), seed=1)
    place.write_chunk("w/p", plain, None)
    place.write_chunk("w/b", banded, BAND)
    mapped = place.map_chunk("w/p", plain.nbytes, None, "test")
    mapped_bands = place.map_chunk("w/b", banded.nbytes, BAND, "test")
    if place.local_path is None:  # object stores cannot map: the caller reads
        assert mapped is None and mapped_bands is None
        return
    np.testing.assert_array_equal(mapped.view(np.float32).reshape(plain.shape), plain)
    np.testing.assert_array_equal(mapped_bands.view(np.float32).reshape(banded.shape), banded)
    mapped[:] = 0  # copy-on-write: the file is not changed
    out = np.empty_like(plain)
    place.read_chunk_into("w/p", out, "test")
    np.testing.assert_array_equal(out, plain)
    _flip(place, "w/p", 8)
    with pytest.raises(ac.CorruptCheckpointError, match="checksum mismatch"):
        place.map_chunk("w/p", plain.nbytes, None, "test")


def test_links_out_of_a_checkpoint_are_refused(place, tmp_path):
    _make_dirs(place, "ok")
    place.check_no_links("ok/x", "test", set())  # nothing wrong (and nothing there yet)
    if place.local_path is None:
        return  # object stores have no links
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(place.url, "evil"))
    os.symlink(outside, os.path.join(place.url, "ok", "deep"))
    with pytest.raises(ac.CorruptCheckpointError, match=r"evil is a symbolic link"):
        place.check_no_links("evil/x", "test", set())
    seen: set[str] = set()  # one restore: each directory is listed once, links found in it
    place.check_no_links("ok/x", "test", seen)
    for name, link in (("ok/deep/x", "ok/deep"), ("evil/y", "evil")):
        with pytest.raises(ac.CorruptCheckpointError, match=rf"{link} is a symbolic link"):
            place.check_no_links(name, "test", seen)


# ----------------------------------------------------------------------------------- listing


def test_listing_names_states_and_many_at_once(place):
    _make_dirs(place, "a", "b")
    place.write("a/f", b"1")
    place.write("b/g", b"2")
    place.write("top", b"3")
    assert place.list_dir() == ["a", "b", "top"]
    assert place.list_dir("a") == ["f"] and place.list_dir("nothing") == []
    assert place.list_dirs(["a", "b", "nothing"]) == [["f"], ["g"], []]
    _commit_checkpoint(place.child("7"))
    place.child("8").begin(replace=False)  # a save that never finished
    names = ["7", "a", "nothing"]
    assert place.checkpoint_states(names) == ["committed", None, None]
    left = place.leftovers()
    assert len(left) == 1 and place.checkpoint_states([left[0].name]) == ["leftover"]


# ------------------------------------------------------------------------ writing and commits


def test_a_checkpoint_is_invisible_until_committed(place):
    target = place.child("ck")
    staged = place.child("ck").begin(replace=False)
    staged.write("partial", b"x")
    assert not target.is_checkpoint() and place.checkpoint_states(["ck"]) != ["committed"]
    target.discard(staged)
    _commit_checkpoint(target)
    assert target.is_checkpoint() and place.checkpoint_states(["ck"]) == ["committed"]
    out = np.empty(4, np.float32)
    target.read_chunk_into("x/c.0", out, "test")
    assert (out == 1.0).all()


def test_replacing_needs_replace_and_swaps_whole(place):
    target = place.child("ck")
    _commit_checkpoint(target, value=1.0)
    with pytest.raises(ac.CheckpointExistsError, match="already exists"):
        target.check_writable(replace=False)
        target.commit(target.begin(replace=False), replace=False)
    _commit_checkpoint(target, replace=True, value=2.0)
    out = np.empty(4, np.float32)
    target.read_chunk_into("x/c.0", out, "test")
    assert (out == 2.0).all() and target.is_checkpoint()


def test_foreign_data_is_never_replaced(place):
    foreign = place.child("data")
    _make_dirs(place, "data")
    foreign.write("table.csv", b"a,b\n")
    not_ours = place.child("zarr")
    _make_dirs(place, "zarr")
    not_ours.write(_format.DOC, b'{"zarr_format":3,"node_type":"group","attributes":{}}')
    for target, match in (
        (foreign, "not empty and is not a checkpoint"),
        (not_ours, "not an asyncckpt checkpoint"),
    ):
        assert not target.is_checkpoint()
        with pytest.raises(ac.CheckpointExistsError, match=match):
            target.check_writable(replace=True)
            target.commit(target.begin(replace=True), replace=True)
    assert foreign.list_dir() == ["table.csv"] and not_ours.list_dir() == [_format.DOC]


def test_discarding_keeps_a_committed_checkpoint(place):
    target = place.child("ck")
    _commit_checkpoint(target)
    staged = target.begin(replace=True)  # a second save that then fails
    staged.write("junk", b"x")
    target.discard(staged)
    if target.is_checkpoint():  # on disk the old one stays until a commit swaps it out
        return
    # in an object store `begin(replace=True)` removed the old one: documented in FORMAT.md
    assert target.list_dir() == []


def test_sync_of_a_place_written_by_another_writer(place):
    """Under jax.distributed the other processes write into the staged place and sync it."""
    staged = place.child("ck").begin(replace=False)
    theirs = open_storage(staged.url)
    theirs.write("c", b"mine")
    theirs.sync()
    assert staged.get("c").tobytes() == b"mine"


# ---------------------------------------------------------------------------------- deleting


def test_unlisting_is_immediate_and_removing_follows(place):
    step = place.child("3")
    _commit_checkpoint(step)
    trash = step.unlist()
    assert place.checkpoint_states(["3"]) == [None] and not step.is_checkpoint()
    trash.remove()
    assert place.list_dir() in ([], [_format.LOCK_NAME])
    with pytest.raises(FileNotFoundError):
        step.unlist()
    place.child("nothing").remove()  # removing nothing is fine


def test_setting_aside_moves_the_whole_checkpoint(place):
    step = place.child("5")
    _commit_checkpoint(step, value=5.0)
    moved = step.set_aside("5.damaged-20261129T000000Z")
    assert moved.name == "5.damaged-20261129T000000Z" and moved.is_checkpoint()
    assert not step.is_checkpoint() and place.checkpoint_states(["5"]) == [None]
    out = np.empty(4, np.float32)
    moved.read_chunk_into("x/c.0", out, "test")
    assert (out == 5.0).all()


def test_leftovers_are_asyncckpts_own_debris_only(place):
    _make_dirs(place, "notes")
    place.write("notes/mine.txt", b"keep")
    _commit_checkpoint(place.child("1"))
    assert place.leftovers() == []
    place.child("2").begin(replace=False).write("partial", b"x")
    (left,) = place.leftovers()
    left.remove()
    assert place.leftovers() == [] and "notes" in place.list_dir()
    assert place.checkpoint_states(["1"]) == ["committed"]


# ------------------------------------------------------------------------- locks and identity


def test_the_writer_lock_where_there_is_one(place):
    place.prepare_directory()
    lock = place.lock()
    if place.local_path is None:
        assert lock is None  # no locks in object stores: one writer per prefix is the user's job
        return
    with pytest.raises(
        ac.DirectoryLockedError,
        match=rf"another CheckpointManager \(pid "
        rf"{os.getpid()} on .*read_only=True",
    ):
        place.lock()
    lock.release()
    place.lock().release()


def test_identity_changes_when_a_checkpoint_is_replaced(place):
    target = place.child("ck")
    _commit_checkpoint(target)
    before = target.identity()
    _commit_checkpoint(target, replace=True)
    if place.local_path is None:
        assert before is None  # the root document tells instead
    else:
        assert before is not None and target.identity() != before


# ------------------------------------------------- local files: large chunks around the page cache

_DIRECT_CASES = {  # name: (offset into an aligned buffer, bytes, band bytes)
    "plain, whole pages": (0, 4 << 20, None),
    "plain, a partial last page": (0, (4 << 20) + 100, None),
    "plain, from unaligned memory": (3, 2 << 20, None),
    "bands of whole pages": (0, 4 << 20, 1 << 20),
    "bands from memory 64 bytes past a page (XLA's CPU buffers)": (64, 4 << 20, 1 << 20),
    "packed bands": (0, 3_000_000, 300_000),
    "unaligned, over more than two bounce buffers": (64, (9 << 20) + 100, None),
    "unaligned bands over bounce buffers": (64, 12 << 20, 3 << 20),
}


@pytest.fixture
def opened(monkeypatch):
    """The flags of every file `os.open` opened for writing, by path, with `O_DIRECT` added where
    `fcntl` switched the file to it (as direct.py does)."""
    import fcntl

    flags: dict[str, int] = {}
    paths: dict[int, str] = {}
    real_open, real_fcntl = os.open, fcntl.fcntl

    def spy(path, mode, *rest, **kw):
        fd = real_open(path, mode, *rest, **kw)
        if mode & os.O_WRONLY:
            flags[os.fspath(path)] = mode
            paths[fd] = os.fspath(path)
        return fd

    def spy_fcntl(fd, cmd, arg=0, *rest):
        if cmd == fcntl.F_SETFL and isinstance(arg, int) and arg & os.O_DIRECT and fd in paths:
            flags[paths[fd]] |= os.O_DIRECT
        return real_fcntl(fd, cmd, arg, *rest)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(fcntl, "fcntl", spy_fcntl)
    return flags


def _aligned(offset: int, nbytes: int) -> np.ndarray:
    import mmap

    buf = np.frombuffer(mmap.mmap(-1, nbytes + offset), np.uint8)
    buf[:] = np.random.default_rng(nbytes).integers(0, 256, buf.size, dtype=np.uint8)
    return buf[offset:]


def _buffered_file(data: np.ndarray, band: int | None) -> bytes:
    """The bytes of the chunk file that the buffered write makes."""
    buffers = _format.chunk_file(data, band).buffers(_format.Sums(content=False))
    return b"".join(bytes(b) for b in buffers)


@pytest.mark.parametrize("case", list(_DIRECT_CASES))
def test_large_chunk_files_are_written_around_the_page_cache(tmp_path, opened, case):
    offset, nbytes, band = _DIRECT_CASES[case]
    place = open_storage(tmp_path / "d")
    _make_dirs(place, "w")
    data = _aligned(offset, nbytes)
    digest = place.write_chunk("w/c", data, band)
    assert opened[place.path("w/c")] & os.O_DIRECT
    want = _buffered_file(data, band)
    assert (tmp_path / "d/w/c").read_bytes() == want  # the same file a buffered write makes
    assert digest == _format.chunk_hash(data)  # taken on the bounce buffer's copies, in pieces
    assert place.write_chunk("w/c", data, band, "given") == "given"
    assert (tmp_path / "d/w/c").read_bytes() == want
    out = np.empty_like(data)
    if band is None:
        place.read_chunk_into("w/c", out, "test")
    else:
        place.read_bands_into("w/c", out, 0, nbytes // band, band, "test")
    np.testing.assert_array_equal(out, data)


def test_small_chunks_and_configured_directories_stay_buffered(tmp_path, opened):
    place = open_storage(tmp_path / "d")
    _make_dirs(place, "w")
    place.write_chunk("w/small", _aligned(0, 64 << 10), None)
    assert not opened[place.path("w/small")] & os.O_DIRECT
    ac.configure_storage(str(tmp_path / "d"), direct_io=False)
    try:
        place.write_chunk("w/big", _aligned(0, 2 << 20), None)
        assert not opened[place.path("w/big")] & os.O_DIRECT
        ac.configure_storage(str(tmp_path / "d/w"), direct_io=True)  # the closest one counts
        place.write_chunk("w/big", _aligned(0, 2 << 20), None)
        assert opened[place.path("w/big")] & os.O_DIRECT
    finally:
        from asyncckpt._storage import local

        local._direct_io.clear()
    with pytest.raises(ValueError, match=r"a local directory takes one option, direct_io"):
        ac.configure_storage(str(tmp_path), page_cache=True)


@pytest.mark.parametrize("refused", ["switch", "write"])
def test_a_file_system_that_refuses_direct_io_gets_buffered_writes(tmp_path, monkeypatch, refused):
    import errno
    import fcntl

    real_fcntl, real_pwrite, direct_fds = fcntl.fcntl, os.pwrite, set()

    def no_direct_fcntl(fd, cmd, arg=0, *rest):
        if cmd == fcntl.F_SETFL and isinstance(arg, int) and arg & os.O_DIRECT:
            if refused == "switch":
                raise OSError(errno.EINVAL, "Invalid argument")
            direct_fds.add(fd)
        return real_fcntl(fd, cmd, arg, *rest)

    def no_direct_pwrite(fd, data, offset):
        if fd in direct_fds and offset > 0 and real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # the second block on is refused
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fcntl, "fcntl", no_direct_fcntl)
    monkeypatch.setattr(os, "pwrite", no_direct_pwrite)
    place = open_storage(tmp_path / "d")
    _make_dirs(place, "w")
    data = _aligned(0, (3 << 20) + 10)
    assert place.write_chunk("w/c", data, None) == _format.chunk_hash(data)
    assert (tmp_path / "d/w/c").read_bytes() == _buffered_file(data, None)
    assert bool(direct_fds) == (refused == "write")
