"""`reuse_deleted_files`: a manager on a file system writes a new step over the files of the step
retention deleted last, instead of creating thousands of files and removing as many.

What must hold: every step reads back bit for bit; a recycled step holds exactly the files a
fresh save of the same tree holds; a file another step links, or that anyone holds open or
mapped, never changes; a save that fails in the middle leaves every committed step whole;
`close()` and object stores leave no deleted files behind, and `delete()` keeps none but the
step it deleted."""

import errno
import mmap
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr
from conftest import abstract, assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac
from asyncckpt import _format, _save
from asyncckpt._storage import Storage, open_storage
from asyncckpt._storage.local import LocalStorage


def files(path):
    """{relative path: (bytes, inode)} of every file under `path`."""
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = (f.read(), os.stat(p).st_ino)
    return out


def spares(directory):
    return [n for n in os.listdir(directory) if ".asyncckpt-deleting-" in n]


def tree_a(mesh, k):
    rng = np.random.default_rng(k)
    return {
        "a": np.arange(1000, dtype=np.float32) + k,
        "b": jax.device_put(
            jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)),
            NamedSharding(mesh, P("x", "y")),
        ),
        "big": rng.standard_normal(1 << 19, dtype=np.float32),  # 2 MiB: written with O_DIRECT
        "x": np.full(10, k, np.int32),
        "z": {"w": np.full((3, 3), k, np.float64)},
    }


def tree_c(mesh):
    """`tree_a` changed every way a tree can change: a shorter array, one gone, one new with
    another chunk grid, an array become a group and a group become an array, a large file
    shorter, a dtype changed."""
    rng = np.random.default_rng(99)
    return {
        "a": np.arange(500, dtype=np.float32),
        "b2": jax.device_put(
            jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)),
            NamedSharding(mesh, P("x")),
        ),
        "big": rng.standard_normal(3 << 17, dtype=np.float32).astype(jnp.bfloat16),
        "x": {"y": np.arange(7, dtype=np.int64)},
        "z": np.float32(2.5),
    }


def restores(mgr, step, tree):
    """Step `step` restores as `tree`: bytes, dtypes and shardings."""
    got = mgr.restore(step, target=abstract(tree))
    jax.tree.map(assert_same, got, tree)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
        if isinstance(b, jax.Array):
            assert a.sharding == b.sharding


def test_a_save_writes_over_the_files_of_the_step_retention_deleted(tmp_path, mesh):
    run = tmp_path / "run"
    with ac.CheckpointManager(run, max_to_keep=1) as mgr:
        mgr.save(1, tree_a(mesh, 1))
        mgr.wait_until_finished()
        first = files(run / "1")
        mgr.save(2, tree_a(mesh, 2))
        mgr.wait_until_finished()
        assert len(spares(run)) == 1  # step 1's files, out of the listing, kept for step 3
        assert mgr.all_steps() == [2]
        mgr.save(3, tree_a(mesh, 3))
        mgr.wait_until_finished()
        third = files(run / "3")
        assert len(spares(run)) == 1  # step 2's now
        restores(mgr, 3, tree_a(mesh, 3))
    assert spares(run) == []  # close() removes the kept files
    assert sorted(os.listdir(run)) == [".asyncckpt.lock", "3"]
    # the same files, written over: the same inodes, the new bytes
    assert third.keys() == first.keys()
    chunks = [k for k in first if k != "zarr.json"]
    assert [third[k][1] for k in chunks] == [first[k][1] for k in chunks]
    assert third["big/c.0"][0] != first["big/c.0"][0]


@pytest.mark.parametrize("remembered", [True, False])
def test_a_recycled_step_of_the_same_tree_keeps_its_documents_and_writes_only_chunks(
    tmp_path, mesh, monkeypatch, remembered
):
    """Saving the same tree over the files of the step retention deleted, the directories and
    documents there are the new step's already: only chunks and the root document are written
    (whether this process remembers writing that step or reads what it held from its root
    document), and the result is the checkpoint a fresh save makes."""
    run = tmp_path / "run"
    written = []

    def spy(real):
        def write(self, key, *args):
            written.append(key)
            return real(self, key, *args)

        return write

    with ac.CheckpointManager(run, max_to_keep=1) as mgr:
        mgr.save(1, tree_a(mesh, 1))
        mgr.wait_until_finished()
        first = files(run / "1")
        docs = {k: os.stat(run / "1" / k).st_mtime_ns for k in first if k.endswith("zarr.json")}
        mgr.save(2, tree_a(mesh, 2))
        mgr.wait_until_finished()
        if not remembered:
            monkeypatch.setattr(_save, "_WRITTEN", {})
        with monkeypatch.context() as m:  # every file written: chunks, documents
            m.setattr(Storage, "write_chunk", spy(Storage.write_chunk))
            real_write = LocalStorage.write
            m.setattr(
                LocalStorage,
                "write",
                lambda self, key, *b: (
                    key.endswith(_format.DOC) and written.append(key),
                    real_write(self, key, *b),
                )[1],
            )
            mgr.save(3, tree_a(mesh, 3))
            mgr.wait_until_finished()
        third = files(run / "3")
        restores(mgr, 3, tree_a(mesh, 3))
    chunks = sorted(k for k in first if not k.endswith("zarr.json"))
    assert sorted(written) == sorted([*chunks, "zarr.json"])
    for key, mtime in docs.items():
        if key != "zarr.json":
            assert third[key] == first[key], key  # the same file, untouched
            assert os.stat(run / "3" / key).st_mtime_ns == mtime, key
    ac.save(tmp_path / "fresh", tree_a(mesh, 3))
    fresh = files(tmp_path / "fresh")
    assert third.keys() == fresh.keys()
    for key in fresh:
        if key != "zarr.json":
            assert third[key][0] == fresh[key][0], key
    ac.verify(run / "3")
    b = zarr.open_array(run / "3" / "b", mode="r")  # plain Zarr, as a fresh save's
    assert b.shape == (64, 32)
    assert_same(b[:], np.asarray(tree_a(mesh, 3)["b"]))


def test_a_recycled_step_of_another_format_version_gets_new_documents(tmp_path, mesh, monkeypatch):
    run = tmp_path / "run"
    with ac.CheckpointManager(run, max_to_keep=1) as mgr:
        mgr.save(1, tree_a(mesh, 1))
        mgr.save(2, tree_a(mesh, 2))
        mgr.wait_until_finished()
        # as if step 1 had been written by an asyncckpt of an older format
        monkeypatch.setattr(_format, "FORMAT_VERSION", _format.FORMAT_VERSION + 1)
        written = []
        real_write = LocalStorage.write
        monkeypatch.setattr(
            LocalStorage,
            "write",
            lambda self, key, *b: (written.append(key), real_write(self, key, *b))[1],
        )
        mgr.save(3, tree_a(mesh, 3))
        mgr.wait_until_finished()
    assert {"a/zarr.json", "b/zarr.json", "z/zarr.json", "z/w/zarr.json"} <= set(written)


def test_a_recycled_step_holds_exactly_what_a_fresh_save_holds(tmp_path, mesh):
    run = tmp_path / "run"
    with ac.CheckpointManager(run, max_to_keep=1) as mgr:
        mgr.save(1, tree_a(mesh, 1))
        mgr.save(2, tree_a(mesh, 2))
        mgr.wait_until_finished()
        spare = os.path.join(run, spares(run)[0])
        old = files(spare)
        mgr.save(3, tree_c(mesh))
        mgr.wait_until_finished()
        restores(mgr, 3, tree_c(mesh))
    ac.save(tmp_path / "fresh", tree_c(mesh))
    recycled, fresh = files(run / "3"), files(tmp_path / "fresh")
    assert recycled.keys() == fresh.keys()  # nothing stale stays, nothing is missing
    for key in fresh:
        if key != "zarr.json":  # the root document says when and which step
            assert recycled[key][0] == fresh[key][0], key
    assert {recycled[k][1] for k in recycled} & {old[k][1] for k in old}  # it did write over
    ac.verify(run / "3")


def test_files_that_another_step_links_or_anyone_maps_never_change(tmp_path, mesh):
    run = tmp_path / "run"
    frozen = np.random.default_rng(7).standard_normal((256, 1024), dtype=np.float32)

    def state(k):  # incremental saves link what did not change from the step before
        return {
            "frozen": frozen,  # linked by every step
            "slow": np.full(1 << 18, 1 if k <= 2 else k, np.float32),  # 1 MiB, 2 links 1's
            "moving": np.full(4096, k, np.float32),
            "pairs": np.full(4096, k // 2, np.float32),  # 3 links 2's, 5 links 4's
        }

    with ac.CheckpointManager(run, max_to_keep=2, keep_every_n_steps=2) as mgr:
        mgr.save(1, state(1))
        mgr.wait_until_finished()
        held = mgr.restore(1)  # restored arrays (mapped where they can be), alive below
        del held["slow"]  # (a mapping of it would keep it from being written over)
        fd = os.open(run / "1" / "moving" / "c.0", os.O_RDONLY)  # someone reading step 1
        mapped = mmap.mmap(fd, 4096 * 4, prot=mmap.PROT_READ)
        try:
            # 3 deletes 1, 4 writes over its files: its "slow" is step 2's (a link), its
            # "moving" is open and mapped here; 5 deletes 3 and writes over it
            for k in range(2, 6):
                mgr.save(k, state(k))
                mgr.wait_until_finished()
                # in 5, "pairs" links 4's over the link to 2's that 3 held
                reused = frozen.nbytes + (4096 * 4 if k in (3, 5) else 0) + (1 << 20) * (k == 2)
                assert mgr.last_save_stats().reused_bytes == reused, k
            assert mgr.all_steps() == [2, 4, 5]
            assert_same(held["moving"], np.full(4096, 1, np.float32))
            assert_same(held["frozen"], frozen)
            assert np.frombuffer(mapped, np.float32).tolist() == [1.0] * 4096
            assert np.frombuffer(os.pread(fd, 16, 0), np.float32).tolist() == [1.0] * 4
        finally:
            mapped.close()
            os.close(fd)
        for k in (2, 4, 5):
            ac.verify(run / str(k))
            jax.tree.map(assert_same, mgr.restore(k), state(k))
        # steps 2, 4 and 5 share it, and step 3, deleted, whose files wait for the next save
        assert os.stat(run / "5" / "frozen" / "c.0.0").st_nlink == 4


def test_a_save_that_fails_writing_over_a_deleted_step_leaves_every_step_whole(
    tmp_path, mesh, monkeypatch
):
    run = tmp_path / "run"
    with ac.CheckpointManager(run, max_to_keep=1) as mgr:
        mgr.save(1, tree_a(mesh, 1))
        mgr.save(2, tree_a(mesh, 2))
        mgr.wait_until_finished()
        real = LocalStorage.write_chunk
        calls = []

        def failing(self, key, data, band, digest=None):
            calls.append(key)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, key, data, band, digest)

        monkeypatch.setattr(LocalStorage, "write_chunk", failing)
        mgr.save(3, tree_a(mesh, 3))
        with pytest.raises(ac.CheckpointWriteError, match="nothing was committed"):
            mgr.wait_until_finished()
        monkeypatch.setattr(LocalStorage, "write_chunk", real)
        assert mgr.all_steps() == [2]
        ac.verify(run / "2")
        restores(mgr, 2, tree_a(mesh, 2))
        assert [n for n in os.listdir(run) if ".asyncckpt-" in n] == []  # the spare went too
        mgr.save(4, tree_a(mesh, 4))  # and saving goes on
        mgr.wait_until_finished()
        restores(mgr, 4, tree_a(mesh, 4))


def test_deleted_steps_leave_no_files_where_nothing_is_reused(root, mesh):
    """Object stores and `reuse_deleted_files=False` remove a step's files at once, whether
    retention or `delete()` deleted it; on a file system with reuse, `delete()` keeps the files
    of the step it deleted (in place of those retention kept) for the next save to write over."""
    local = not str(root).startswith("s3://")
    for reuse in (True, False) if local else (True,):
        run = root / f"run-{reuse}"
        kept = 1 if local and reuse else 0  # deleted steps whose files wait for the next save
        with ac.CheckpointManager(run, max_to_keep=1, reuse_deleted_files=reuse) as mgr:
            for k in (1, 2, 3):
                mgr.save(k, tree_a(mesh, k))
            mgr.wait_until_finished()
            names = open_storage(str(run)).list_dir()
            assert "3" in names
            assert len([n for n in names if n not in ("3", ".asyncckpt.lock")]) == kept
            third = files(run / "3") if kept else {}
            mgr.delete(3)
            mgr.wait_until_finished()
            assert mgr.all_steps() == []
            names = [n for n in open_storage(str(run)).list_dir() if n != ".asyncckpt.lock"]
            assert len(names) == kept  # step 2's files went at once, and step 3's unless kept
            if kept:  # the files waiting now are step 3's
                assert files(run / names[0]) == third
            mgr.save(4, tree_a(mesh, 4))
            mgr.wait_until_finished()
            assert mgr.all_steps() == [4]
            restores(mgr, 4, tree_a(mesh, 4))
            store = open_storage(str(run))
            assert [n for n in store.list_dir() if not n.startswith(".asyncckpt.lock")] == ["4"]
            assert store.leftovers() == []
            if kept:  # step 4 was written over step 3's files
                fourth = files(run / "4")
                chunks = [k for k in third if k != "zarr.json"]
                assert [fourth[k][1] for k in chunks] == [third[k][1] for k in chunks]


@pytest.mark.parametrize("nbytes", [100, 3 << 20], ids=["buffered", "O_DIRECT"])
def test_writing_a_file_that_exists_changes_it_only_where_nobody_else_holds_it(tmp_path, nbytes):
    place = LocalStorage(str(tmp_path))
    old = np.full(nbytes * 2, 7, np.uint8)  # twice as long: the new file must be cut short
    new = np.arange(nbytes, dtype=np.uint8)

    def write_old(name):
        place.write(name, old)
        return os.stat(tmp_path / name).st_ino

    alone = write_old("alone")
    place.write("alone", new)  # written over in place, cut to the new length
    assert os.stat(tmp_path / "alone").st_ino == alone
    assert (tmp_path / "alone").read_bytes() == new.tobytes()

    write_old("linked")
    os.link(tmp_path / "linked", tmp_path / "other-step")
    place.write("linked", new)
    assert (tmp_path / "other-step").read_bytes() == old.tobytes()
    assert (tmp_path / "linked").read_bytes() == new.tobytes()

    write_old("open")
    with open(tmp_path / "open", "rb") as reader:
        place.write("open", new)
        assert reader.read() == old.tobytes()
    assert (tmp_path / "open").read_bytes() == new.tobytes()

    write_old("mapped")
    with open(tmp_path / "mapped", "rb") as f:
        view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    place.write("mapped", new)
    assert view[:] == old.tobytes()
    view.close()
    assert (tmp_path / "mapped").read_bytes() == new.tobytes()


def test_a_step_written_here_is_known_without_parsing_its_root_document(
    tmp_path, mesh, monkeypatch
):
    """Parsing a root document costs ~25 us an array: what a step this process committed holds
    (chunk hashes for the next save to reuse, files for a save that writes over it once it is
    deleted) is remembered, and used while its root document is byte for byte the one
    written; a document changed since is parsed."""
    import json
    import sys

    from asyncckpt import _format

    parsed = []
    real = _format.parse_root_doc

    def spy(raw, where):
        if sys._getframe(1).f_code.co_name == "_read_written":
            parsed.append(where)
        return real(raw, where)

    monkeypatch.setattr(_format, "parse_root_doc", spy)
    run = tmp_path / "run"
    with ac.CheckpointManager(run, max_to_keep=1) as mgr:
        for k in (1, 2, 3):
            mgr.save(k, tree_a(mesh, 1))  # the same content: every chunk reused
            mgr.wait_until_finished()
        assert parsed == []  # steps 2 and 3 reused and wrote over earlier steps: none parsed
        stats = mgr.last_save_stats()
        assert stats.reused_bytes == stats.bytes > 0
        doc = run / "3" / "zarr.json"  # the same document in other bytes
        doc.write_text(json.dumps(json.loads(doc.read_text()), indent=1))
        for k in (4, 5):
            mgr.save(k, tree_c(mesh) if k == 5 else tree_a(mesh, 1))
            mgr.wait_until_finished()
        # step 4 reused step 3's chunks, step 5 wrote over step 3's files: both parsed it
        assert len(parsed) == 2 and parsed[0].endswith("/run/3")
        assert ".3.asyncckpt-deleting-" in parsed[1]
        restores(mgr, 5, tree_c(mesh))
    ac.save(tmp_path / "fresh", tree_c(mesh))
    assert files(run / "5").keys() == files(tmp_path / "fresh").keys()
