"""A save that `save()` returned is committed before a normal interpreter exit, even when the
script never calls `close()`, or its failure is reported on stderr: it never vanishes."""

import subprocess
import sys

import numpy as np
import pytest

import asyncckpt as ac

# The child slows every chunk write down, so the save is still being written when the script
# reaches its end.
CHILD = r"""
import sys, time
import numpy as np
import asyncckpt as ac
from asyncckpt._storage import Storage

mode, path = sys.argv[1], sys.argv[2]
original = Storage.write_chunk

def slow(*args):
    time.sleep(0.3)
    if mode.endswith("fail"):
        raise OSError(28, "No space left on device")
    return original(*args)

Storage.write_chunk = slow
tree = {"w": np.arange(1000.0), "b": np.ones(3)}
if mode == "retention-fails":  # the save commits; the retention job after it fails
    from asyncckpt import _directory

    mgr = ac.CheckpointManager(path, max_to_keep=1)
    mgr.save(1, tree)
    mgr.wait_until_finished()

    def refuse(directory, step):
        raise PermissionError(13, "Permission denied", directory.path(str(step)))

    _directory.start_delete = refuse
    mgr.save(2, tree)
elif mode.startswith("manager"):
    mgr = ac.CheckpointManager(path, max_to_keep=1)
    mgr.save(1, tree)
else:
    ckptr = ac.AsyncCheckpointer()
    ckptr.save(path + "/ck", tree)
print("save returned", flush=True)
"""


def _run(mode, path):
    return subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("mode", ["manager", "checkpointer"])
def test_a_save_in_flight_at_exit_is_committed(tmp_path, mode):
    proc = _run(mode, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "save returned" in proc.stdout
    assert "waiting for 1 save" in proc.stderr and "close()" in proc.stderr
    path = tmp_path / "1" if mode == "manager" else tmp_path / "ck"
    np.testing.assert_array_equal(ac.restore(path)["w"], np.arange(1000.0))
    if mode == "manager":
        assert ac.CheckpointManager(tmp_path, read_only=True).all_steps() == [1]


@pytest.mark.parametrize("mode", ["manager-fail", "checkpointer-fail"])
def test_a_save_failing_at_exit_is_reported(tmp_path, mode):
    proc = _run(mode, tmp_path)
    assert "save returned" in proc.stdout
    assert "was not committed" in proc.stderr and "No space left on device" in proc.stderr
    assert not (tmp_path / "1").exists() and not (tmp_path / "ck").exists()


def test_a_retention_failing_at_exit_is_reported(tmp_path):
    proc = _run("retention-fails", tmp_path)
    assert "save returned" in proc.stdout
    assert "retention could not delete an old step" in proc.stderr, proc.stderr
    assert ac.CheckpointManager(tmp_path, read_only=True).all_steps() == [1, 2]
