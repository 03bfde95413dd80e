"""Faults: damaged files, a full or read-only disk, deletion and replacement under a reader,
readers racing a writer. Nothing committed is lost, and every failure says what and where."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt import _restore


def tree(value: float, n: int = 1024):
    """Two arrays whose every element is `value`: a torn read shows as mixed values."""
    return {
        "a": np.full((n, 16), value, np.float32),
        # 8 MiB in one chunk: stored as row bands
        "big": np.full((2048, 1024), value, np.float32),
        "n": np.int64(value),
    }


def assert_tree(got, value):
    for name in ("a", "big"):
        assert np.all(np.asarray(got[name]) == value), (name, np.unique(np.asarray(got[name])))
    assert int(got["n"]) == int(value)


def flip(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


# ------------------------------------------------------------------------------- damaged files

DAMAGE = {
    "flipped chunk byte": (
        lambda ck: flip(ck / "a" / "c.0.0", 100),
        ac.CorruptCheckpointError,
        r"'a'.*checksum mismatch in chunk file .*a/c\.0\.0",
    ),
    "flipped band byte": (
        lambda ck: flip(ck / "big" / "c.0.0", (4 << 20) + 4096 + 8),
        ac.CorruptCheckpointError,
        r"'big'.*checksum mismatch in band 1 of chunk file .*big/c\.0\.0",
    ),
    "flipped shard index": (
        lambda ck: flip(ck / "big" / "c.0.0", os.path.getsize(ck / "big" / "c.0.0") - 10),
        ac.CorruptCheckpointError,
        r"'big'.*shard index of chunk file",
    ),
    "truncated chunk": (
        lambda ck: truncate(ck / "a" / "c.0.0", 1000),
        ac.CorruptCheckpointError,
        r"'a'.*c\.0\.0 has 1000 bytes, expected 65540",
    ),
    "deleted chunk": (
        lambda ck: (ck / "n" / "c").unlink(),
        ac.IncompleteCheckpointError,
        r"'n'.*chunk file .*n/c is missing",
    ),
    "deleted banded chunk": (
        lambda ck: (ck / "big" / "c.0.0").unlink(),
        ac.IncompleteCheckpointError,
        r"'big'.*chunk file .*big/c\.0\.0 is missing",
    ),
    "corrupt root document": (
        lambda ck: flip(ck / "zarr.json", 1),
        ac.CorruptCheckpointError,
        "root zarr.json is not valid JSON",
    ),
    "truncated root document": (
        lambda ck: truncate(ck / "zarr.json", 300),
        ac.CorruptCheckpointError,
        "root zarr.json is not valid JSON",
    ),
    "commit marker removed": (
        lambda ck: (ck / "zarr.json").unlink(),
        ac.IncompleteCheckpointError,
        "root zarr.json .* is missing, so the save that wrote it never",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_reported_by_restore_and_verify(tmp_path, kind):
    damage, error, message = DAMAGE[kind]
    ck = tmp_path / "ck"
    ac.save(ck, tree(3.0))
    damage(ck)
    with pytest.raises(error, match=message):
        ac.restore(ck)
    with pytest.raises(error, match=message):
        ac.verify(ck)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open descriptors")
def test_a_restore_that_finds_damage_leaves_no_file_open_for_the_collector(tmp_path):
    """A restore that finds a damaged chunk part way through: the files its read-ahead opened
    for reads that never came are closed when it raises, and nothing of it waits for Python's
    cycle collector (a caller that tries one older step after another would run out of file
    descriptors first)."""
    import gc

    ck = tmp_path / "ck"
    ac.save(ck, {f"a{i:03d}": np.full(1024, i, np.float32) for i in range(200)})
    with open(next((ck / "a000").glob("c*")), "r+b") as f:
        f.write(b"\xff\xff")
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(ac.CorruptCheckpointError, match=r"checksum mismatch .*a000"):
                ac.restore(ck)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


def test_damaged_array_document_is_found_by_verify(tmp_path):
    """Restore reads the consolidated metadata; zarr-python and TensorStore read each array's
    own zarr.json, so verify checks those too."""
    ck = tmp_path / "ck"
    ac.save(ck, tree(3.0))
    truncate(ck / "a" / "zarr.json", 20)
    assert_tree(ac.restore(ck), 3.0)
    with pytest.raises(ac.CorruptCheckpointError, match=r"a/zarr\.json is not valid JSON"):
        ac.verify(ck)


def test_manager_names_a_damaged_latest_step(tmp_path, caplog):
    with ac.CheckpointManager(tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, tree(float(step)))
    flip(tmp_path / "3" / "a" / "c.0.0", 7)
    with ac.CheckpointManager(tmp_path) as mgr:
        assert mgr.latest_step() == 3  # damaged, but committed: nothing is skipped silently
        with pytest.raises(
            ac.CorruptCheckpointError,
            match=r"step 3 of .* is damaged \(earlier steps: 1, 2; restore one "
            r"with `restore\(step=...\)`, or pass fall_back=True\)",
        ):
            mgr.restore()
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            assert_tree(mgr.restore(fall_back=True), 2.0)
        assert "step 3 of" in caplog.text and "restoring step 2 instead" in caplog.text
        assert mgr.all_steps() == [1, 2]  # step 3 was set aside (tests/test_manager.py)
        assert_tree(mgr.restore(1), 1.0)
    flip(tmp_path / "2" / "a" / "c.0.0", 7)
    with ac.CheckpointManager(tmp_path, read_only=True) as mgr:  # a reader moves nothing
        assert_tree(mgr.restore(fall_back=True), 1.0)
        assert mgr.all_steps() == [1, 2]
    (tmp_path / "2" / "zarr.json").unlink()  # step 2 loses its commit marker: it is not a step
    with ac.CheckpointManager(tmp_path, read_only=True) as mgr:
        assert mgr.all_steps() == [1]
    (tmp_path / "1" / "n" / "c").unlink()
    with ac.CheckpointManager(tmp_path, read_only=True) as mgr:
        with pytest.raises(
            ac.IncompleteCheckpointError,
            match=r"step 1 of .* is damaged \(there is no earlier step\)",
        ):
            mgr.restore(1, fall_back=True)


# --------------------------------------------------------------------- deleted under a reader


def reading_hook(monkeypatch, action):
    """Run `action()` once, when the restore has read its first chunks."""
    original = _restore._read_chunk
    done = threading.Event()
    lock = threading.Lock()

    def read_chunk(*args):
        original(*args)
        with lock:
            if not done.is_set():
                done.set()
                action()

    monkeypatch.setattr(_restore, "_read_chunk", read_chunk)


def test_restore_of_a_step_deleted_meanwhile_fails_clearly(tmp_path, monkeypatch):
    with ac.CheckpointManager(tmp_path) as writer:
        writer.save(1, tree(1.0))
        writer.save(2, tree(2.0))
        writer.wait_until_finished()
        reader = ac.CheckpointManager(tmp_path, read_only=True, max_workers=1)
        reading_hook(monkeypatch, lambda: (writer.delete(1), writer.wait_until_finished()))
        with pytest.raises(
            ac.CheckpointNotFoundError,
            match=r"/1 was deleted or replaced while it was being restored",
        ):
            reader.restore(1)
        reader.close()
        monkeypatch.undo()
        assert_tree(writer.restore(2), 2.0)


def test_restore_of_a_replaced_checkpoint_is_never_torn(root, monkeypatch):
    """On disk the directory's inode changes; in an object store (issue 21: one leaf old and
    seven new were returned) the root document's save time does."""
    ck = root / "ck"
    ac.save(ck, tree(1.0))
    reading_hook(monkeypatch, lambda: ac.save(ck, tree(2.0), force=True))
    with ac.AsyncCheckpointer(max_workers=1) as ckptr:
        with pytest.raises(ac.CheckpointNotFoundError, match="replaced while it was being"):
            ckptr.restore(ck)
    monkeypatch.undo()
    assert_tree(ac.restore(ck), 2.0)


def test_readers_racing_a_writer_never_see_a_torn_step(tmp_path):
    """One thread saves steps 1..12 (max_to_keep=2: retention deletes as it goes); another
    restores the latest step over and over. Each restore returns exactly the data of its step
    or fails with a not-found error; nothing else."""
    stop = threading.Event()
    seen, errors = [], []

    def read():
        with ac.CheckpointManager(tmp_path, read_only=True) as mgr:
            while not stop.is_set():
                step = mgr.latest_step()
                if step is None:
                    continue
                try:
                    got = mgr.restore(step)
                except (ac.CheckpointNotFoundError, ac.StepNotFoundError):
                    continue
                except Exception as e:  # a torn or unexpected failure
                    errors.append(e)
                    return
                try:
                    assert_tree(got, float(step))
                except AssertionError as e:
                    errors.append(e)
                    return
                seen.append(step)

    with ac.CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        mgr.save(0, tree(0.0))
        mgr.wait_until_finished()
        reader = threading.Thread(target=read)
        reader.start()
        try:
            for step in range(1, 13):
                mgr.save(step, tree(float(step)))
                time.sleep(0.05)
            mgr.wait_until_finished()
            time.sleep(0.3)
        finally:
            stop.set()
            reader.join(60)
        assert mgr.all_steps() == [11, 12]
    assert errors == []
    assert len(seen) >= 3 and seen == sorted(seen)


# -------------------------------------------------------------------- full or read-only disks


@contextlib.contextmanager
def small_filesystem(path, size="24m"):
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_mid_save(tmp_path):
    with small_filesystem(tmp_path / "mnt") as mnt:
        run = mnt / "run"
        with ac.CheckpointManager(run) as mgr:
            mgr.save(1, tree(1.0))  # ~8.1 MiB
            mgr.save(2, tree(2.0))
            mgr.wait_until_finished()
            mgr.save(3, tree(3.0))  # does not fit beside steps 1 and 2
            with pytest.raises(
                ac.CheckpointWriteError,
                match=r"saving the checkpoint .*/run/3 failed, nothing was "
                r"committed: .*No space left on device",
            ):
                mgr.wait_until_finished()
            assert mgr.all_steps() == [1, 2]
            assert [n for n in os.listdir(run) if n.startswith(".3.")] == []  # partial removed
            assert_tree(mgr.restore(1), 1.0)
            assert_tree(mgr.restore(2), 2.0)
            ac.verify(run / "2")
            mgr.delete(1)
            mgr.wait_until_finished()
            mgr.save(3, tree(3.0))  # space freed: the next save succeeds
            mgr.wait_until_finished()
            assert mgr.all_steps() == [2, 3]
            assert_tree(mgr.restore(3), 3.0)


def test_read_only_file_system(tmp_path):
    with small_filesystem(tmp_path / "mnt") as mnt:
        ac.save(mnt / "ck", tree(1.0))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(
            ac.CheckpointWriteError, match=r"nothing was committed: .*Read-only file system"
        ):
            ac.save(mnt / "ck2", tree(2.0))
        with pytest.raises(OSError, match="Read-only file system"):
            ac.CheckpointManager(mnt / "run")
        assert_tree(ac.restore(mnt / "ck"), 1.0)  # reading still works
        ac.verify(mnt / "ck")


def test_directory_deleted_during_a_save(tmp_path, monkeypatch):
    from asyncckpt import _save

    run = tmp_path / "run"
    with ac.CheckpointManager(run) as mgr:
        mgr.save(1, tree(1.0))
        mgr.wait_until_finished()
        original = _save._commit

        def commit(tmp, *args, **kwargs):
            shutil.rmtree(run)  # someone removes the whole directory mid-save
            return original(tmp, *args, **kwargs)

        monkeypatch.setattr(_save, "_commit", commit)
        mgr.save(2, tree(2.0))
        with pytest.raises(
            ac.CheckpointWriteError,
            match=r"saving the checkpoint .*/run/2 failed, nothing was committed",
        ):
            mgr.wait_until_finished()
        monkeypatch.undo()
        mgr.reload()  # a writer caches its step list; re-read after someone else's deletion
        assert mgr.all_steps() == []
        mgr.save(3, tree(3.0))  # the manager recovers: the directory is made again
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3]
        assert_tree(mgr.restore(3), 3.0)


def test_permission_denied(tmp_path):
    """A directory the saving process may not write into: a clear error, nothing written. Root
    ignores permission bits, so as root the directory is made immutable (`chattr +i`)."""
    target = tmp_path / "locked"
    target.mkdir()
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(target)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"root ignores permissions, and chattr +i failed: {made.stderr.strip()}")
        expected, undo = "Operation not permitted", ["chattr", "-i", str(target)]
    else:
        os.chmod(target, 0o555)
        expected, undo = "Permission denied", ["chmod", "755", str(target)]
    try:
        with pytest.raises(
            ac.CheckpointWriteError,
            match=f"saving the checkpoint {target / 'ck'} failed, nothing was "
            f"committed: .*{expected}",
        ):
            ac.save(target / "ck", {"x": np.zeros(3)})
        assert os.listdir(target) == []
    finally:
        subprocess.run(undo, check=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "ck"
    ac.save(
        path,
        {
            "a": np.arange(4096, dtype=np.float32).reshape(64, 64),
            "big": np.random.default_rng(1).standard_normal((2048, 1024), np.float32),
            "k": {"n": np.int64(7), "v": np.arange(5, dtype=np.int8)},
        },
    )
    chunks = sorted(p for p in path.rglob("c*") if p.is_file())
    return path, chunks


def padding(chunk) -> list[range]:
    """The byte ranges of a banded chunk file that hold no data: the padding that starts each
    band on a 4 KiB page. Readers skip it (it is not data), so a flip there changes nothing."""
    doc = json.loads((chunk.parent / "zarr.json").read_text())
    if doc["codecs"][0]["name"] != "sharding_indexed":
        return []
    raw = chunk.read_bytes()
    rows, cols = doc["codecs"][0]["configuration"]["chunk_shape"]
    n = doc["shape"][0] // rows
    index = np.frombuffer(raw[-16 * n - 4 : -4], "<u8").reshape(n, 2).tolist()
    ends = [offset + size for offset, size in index]
    starts = [offset for offset, _ in index[1:]] + [len(raw) - 16 * n - 4]
    return [range(e, s) for e, s in zip(ends, starts) if s > e]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_flipped_byte_in_any_chunk_is_caught(pristine, tmp_path, data):
    """Every byte of every chunk file (data, checksums, shard index) is covered."""
    src, chunks = pristine
    chunk = data.draw(st.sampled_from(chunks))
    offset = data.draw(st.integers(0, chunk.stat().st_size - 1))
    assume(not any(offset in r for r in padding(chunk)))
    bit = data.draw(st.integers(0, 7))
    ck = tmp_path / f"ck{os.urandom(4).hex()}"
    shutil.copytree(src, ck)
    target = ck / chunk.relative_to(src)
    raw = bytearray(target.read_bytes())
    raw[offset] ^= 1 << bit
    target.write_bytes(bytes(raw))
    variable = str(chunk.parent.relative_to(src))
    for check in (ac.restore, ac.verify):
        with pytest.raises(ac.CorruptCheckpointError) as info:
            check(ck)
        assert repr(variable) in str(info.value) and str(target) in str(info.value)
    shutil.rmtree(ck)
