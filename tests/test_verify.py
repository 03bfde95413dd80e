"""`asyncckpt.verify`: every chunk and document is checked, every problem is named."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import read_file, remove_file, write_file
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac


def save(root, mesh):
    tree = {
        "small": jax.device_put(
            np.arange(64, dtype=np.float32).reshape(8, 8), NamedSharding(mesh, P("x", "y"))
        ),
        # 8 MiB in one chunk: stored as row bands of its own checksums
        "big": np.random.default_rng(0).standard_normal((2048, 1024), dtype=np.float32),
        "v": np.arange(5, dtype=np.int32),
    }
    path = root / "ck"
    ac.save(path, tree)
    return path


def flip(path, offset):
    data = bytearray(read_file(path))
    data[offset] ^= 0x01
    write_file(path, bytes(data))


def test_sound_checkpoint_passes(root, mesh):
    ac.verify(save(root, mesh))


def test_every_damaged_variable_is_named(root, mesh):
    path = save(root, mesh)
    flip(path / "small" / "c.1.0", 3)
    flip(path / "big" / "c.0.0", 5 * (4 << 20) // 4)  # inside band 1
    remove_file(path / "v" / "c.0")
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.verify(path)
    message = str(info.value)
    assert "3 variable(s) ['big', 'small', 'v']" in message
    assert f"checksum mismatch in chunk file {path / 'small' / 'c.1.0'}" in message
    assert f"checksum mismatch in band 1 of chunk file {path / 'big' / 'c.0.0'}" in message
    assert f"chunk file {path / 'v' / 'c.0'} is missing" in message


def test_only_missing_chunks_are_incomplete(root, mesh):
    path = save(root, mesh)
    remove_file(path / "small" / "c.0.1")
    with pytest.raises(
        ac.IncompleteCheckpointError,
        match=r"is incomplete: 1 variable\(s\) "
        r"\['small'\]",
    ):
        ac.verify(path)


def test_truncated_chunk_and_array_documents(root, mesh):
    path = save(root, mesh)
    write_file(path / "big" / "c.0.0", read_file(path / "big" / "c.0.0")[:-100])
    doc = json.loads(read_file(path / "v" / "zarr.json"))
    doc["shape"] = [6]
    write_file(path / "v" / "zarr.json", json.dumps(doc).encode())
    write_file(path / "small" / "zarr.json", b"{oops")
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.verify(path)
    message = str(info.value)
    assert "truncated or overwritten" in message and str(path / "big" / "c.0.0") in message
    assert f"{path / 'v' / 'zarr.json'} describes (6,) int32" in message
    assert f"{path / 'small' / 'zarr.json'} is not valid JSON" in message


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ac.CheckpointNotFoundError, match="the path does not exist"):
        ac.verify(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ac.CheckpointNotFoundError, match="it has no zarr.json"):
        ac.verify(tmp_path / "empty")
