"""The package as others see it: what importing it does, its version, its typing marker."""

import importlib.metadata
import os
import subprocess
import sys

import asyncckpt as ac

# Run in a fresh interpreter: record every process started while asyncckpt is imported, then used.
AUDIT = r"""
import sys
events = []
WATCH = ("subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.fork")
sys.addaudithook(lambda event, args: events.append(event) if event in WATCH else None)
import asyncckpt
print("imported", sorted(m for m in ("jax", "zarr", "numpy") if m in sys.modules), events)
import numpy as np, tempfile, ml_dtypes
asyncckpt_bf16 = np.dtype(ml_dtypes.bfloat16)
path = tempfile.mkdtemp() + "/ck"
asyncckpt.save(path, {"x": np.arange(3), "b": np.ones(2, asyncckpt_bf16)})
assert (asyncckpt.restore(path)["x"] == np.arange(3)).all()
import zarr
assert zarr.open_group(path, mode="r")["b"].dtype == asyncckpt_bf16
print("used", events)
import os, shutil
shutil.rmtree(os.path.dirname(path))  # the temporary directory mkdtemp made
"""


def test_import_does_no_work_and_nothing_starts_a_process():
    """`import asyncckpt` imports neither JAX nor zarr; neither it nor a save and restore start
    a process (finding the C library used to run `ldconfig -p`) or raise a warning."""
    # -W error: neither asyncckpt nor what it imports on this stack may warn (a project that runs
    # with warnings as errors would fail)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", AUDIT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # also those a library shows only once
    assert "imported [] []" in proc.stdout and "used []" in proc.stdout, proc.stdout


def test_version_is_the_installed_one_and_types_ship():
    assert ac.__version__ == importlib.metadata.version("asyncckpt")
    assert "__version__" in ac.__all__ and "CheckpointManager" in dir(ac)
    package = os.path.dirname(ac.__file__)
    assert os.path.exists(os.path.join(package, "py.typed"))
    assert os.path.exists(os.path.join(package, "__init__.pyi"))


def test_the_public_api_is_the_stub():
    """Every name the stub states resolves, and nothing private leaks into `dir()`."""
    for name in ac.__all__:
        assert getattr(ac, name) is not None, name
    assert not [n for n in dir(ac) if n.startswith("_") and not n.startswith("__")]
