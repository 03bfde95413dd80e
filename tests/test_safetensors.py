"""Hugging Face weights in (`load_safetensors`, `restore` of a `.safetensors` path) and out
(`asyncckpt export`, streamed)."""

import json
import os
import struct
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_same
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save, save_file

import asyncckpt as ac
from asyncckpt._cli import main as cli_main
from asyncckpt._storage import open_storage

WEIGHTS = {
    "model.embed.weight": np.arange(32 * 16, dtype=np.float32).reshape(32, 16),
    "model.layers.0.kernel": (np.arange(16 * 24) / 7).astype(ml_dtypes.bfloat16).reshape(16, 24),
    "model.layers.1.kernel": np.arange(24 * 8, dtype=np.float16).reshape(24, 8),
    "model.norm": np.linspace(0, 1, 8, dtype=np.float32),
    "step": np.array(12, np.int64),
}


def put(root, name, data: bytes):
    open_storage(os.fspath(root)).write(name, np.frombuffer(data, np.uint8))
    return root / name


def target(mesh, spec=None):
    spec = spec or P("x", "y")

    def sds(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))

    return {
        "model": {
            "embed": {"weight": sds(WEIGHTS["model.embed.weight"], spec)},
            "layers": [
                {"kernel": sds(WEIGHTS["model.layers.0.kernel"], P(None, "y"))},
                {"kernel": sds(WEIGHTS["model.layers.1.kernel"], P("x"))},
            ],
            "norm": sds(WEIGHTS["model.norm"], P()),
        },
        "step": 0,
    }


def check(restored, mesh, spec=None):
    spec = spec or P("x", "y")

    assert_same(restored["model"]["embed"]["weight"], WEIGHTS["model.embed.weight"])
    assert restored["model"]["embed"]["weight"].sharding == NamedSharding(mesh, spec)
    for i in (0, 1):
        assert_same(restored["model"]["layers"][i]["kernel"], WEIGHTS[f"model.layers.{i}.kernel"])
    assert restored["model"]["layers"][0]["kernel"].sharding == NamedSharding(mesh, P(None, "y"))
    assert_same(restored["model"]["norm"], WEIGHTS["model.norm"])
    assert restored["step"] == 12 and type(restored["step"]) is int


def test_one_file_onto_a_mesh_on_every_backend(root, mesh):
    path = put(root, "model.safetensors", save(WEIGHTS))
    check(ac.restore(path, target(mesh)), mesh)
    everything = ac.load_safetensors(path)  # no target: every tensor, by its name
    assert sorted(everything) == sorted(WEIGHTS)
    for name, value in WEIGHTS.items():
        assert_same(everything[name], value)


def test_sharded_files_with_an_index(root, mesh):
    first = {k: v for k, v in WEIGHTS.items() if "layers" in k}
    second = {k: v for k, v in WEIGHTS.items() if "layers" not in k}
    put(root, "model-00001-of-00002.safetensors", save(first))
    put(root, "model-00002-of-00002.safetensors", save(second))
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {
            **dict.fromkeys(first, "model-00001-of-00002.safetensors"),
            **dict.fromkeys(second, "model-00002-of-00002.safetensors"),
        },
    }
    path = put(root, "model.safetensors.index.json", json.dumps(index).encode())
    check(ac.restore(path, target(mesh, P("y", "x"))), mesh, P("y", "x"))


def test_names_map_the_target_onto_other_tensor_names(tmp_path, mesh):
    save_file({"transformer.wte": WEIGHTS["model.embed.weight"]}, tmp_path / "m.safetensors")
    tgt = {"embedding": target(mesh)["model"]["embed"]["weight"]}
    got = ac.load_safetensors(
        tmp_path / "m.safetensors", tgt, names={"embedding": "transformer.wte"}
    )
    assert_same(got["embedding"], WEIGHTS["model.embed.weight"])
    got = ac.load_safetensors(tmp_path / "m.safetensors", tgt, names=lambda n: "transformer.wte")
    assert_same(got["embedding"], WEIGHTS["model.embed.weight"])


def test_mismatches_are_named(tmp_path, mesh):
    path = tmp_path / "m.safetensors"
    save_file(WEIGHTS, path)
    tgt = target(mesh)
    del tgt["step"]
    with pytest.raises(ac.TreeMismatchError, match=r"tensors not in the target .*: step$"):
        ac.restore(path, tgt)
    assert "step" not in ac.restore(path, tgt, strict=False)
    tgt["model"]["extra"] = np.zeros(2)
    with pytest.raises(ac.TreeMismatchError, match=r"in no tensor .*\['model'\]\['extra'\]"):
        ac.restore(path, tgt, strict=False)
    tgt = target(mesh)
    tgt["model"]["norm"] = np.zeros(9, np.float32)
    with pytest.raises(
        ac.TreeMismatchError, match=r"\['norm'\]: target \(9,\), 'model.norm' \(8,\)"
    ):
        ac.restore(path, tgt)
    tgt = target(mesh)
    tgt["model"]["norm"] = np.zeros(8, np.int32)  # float -> int loses the kind of value
    with pytest.raises(ac.TreeMismatchError, match=r"'model.norm' of .*m.safetensors.*float32"):
        ac.restore(path, tgt)
    tgt = target(mesh)
    tgt["model"]["norm"] = np.zeros(8, np.float64)  # widening is fine
    assert ac.restore(path, tgt)["model"]["norm"].dtype == np.float64


def header_file(tmp_path, header, data=b"", length=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(raw) if length is None else length
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (b"", b"", None, "fewer than the 8|not JSON"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", 1 << 62, "exceeds"),
        (b"{not json", b"", None, "not JSON"),
        ([1, 2], b"", None, "not a JSON object"),
        ({"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"", None, "dtype"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"", None, "shape"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"", None, "offsets"),
        (
            {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "needs 16",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            None,
            "after the end",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
        (
            {"x": {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}},
            b"\0" * 4,
            None,
            "shape",
        ),
    ],
)
def test_hostile_headers_are_refused_before_anything_is_read(
    tmp_path, header, data, length, message
):
    path = header_file(tmp_path, header, data, length)
    with pytest.raises(ac.CorruptCheckpointError, match=rf"{path}.*({message})"):
        ac.load_safetensors(path)


def test_hostile_index_cannot_leave_its_directory(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, tmp_path / "inner.safetensors")
    for file in ("../inner.safetensors", "/etc/passwd", ".."):
        path = tmp_path / "sub" / "m.safetensors.index.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"weight_map": {"x": file}}))
        with pytest.raises(ac.CorruptCheckpointError, match="plain names"):
            ac.load_safetensors(path)
    path.write_text(json.dumps({"weight_map": {"y": "../inner.safetensors"[3:]}}))
    (tmp_path / "sub" / "inner.safetensors").write_bytes(
        (tmp_path / "inner.safetensors").read_bytes()
    )
    with pytest.raises(ac.CorruptCheckpointError, match="does not hold it"):
        ac.load_safetensors(path)


def test_a_linked_file_is_followed(tmp_path, mesh):
    """Hugging Face's cache links each file of a snapshot to a blob."""
    (tmp_path / "blobs").mkdir()
    save_file(WEIGHTS, tmp_path / "blobs" / "abc123")
    os.symlink(tmp_path / "blobs" / "abc123", tmp_path / "model.safetensors")
    check(ac.restore(tmp_path / "model.safetensors", target(mesh)), mesh)


def peak_bytes(call):
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_round_trip_and_streamed(tmp_path):
    """`asyncckpt export` writes a file the safetensors package reads, holding at most about
    max_inflight_bytes of the checkpoint at once (it held all of it before). The checkpoint is
    in memory:// so that its reads land in numpy buffers that tracemalloc sees (local chunks
    would be mapped)."""
    tree = {f"w{i:02d}": np.full((256, 1024), i, np.float32) for i in range(32)}  # 32 x 1 MiB
    tree["bf"] = np.arange(10).astype(ml_dtypes.bfloat16)
    tree["key"] = jax.random.key(3)
    src = f"memory://export-{os.urandom(4).hex()}/ck"
    ac.save(src, tree)
    out = tmp_path / "out.safetensors"

    def export(limit):
        assert cli_main(["export", src, str(out), "--max-inflight-bytes", str(limit)]) == 0

    assert peak_bytes(lambda: export(4 << 20)) < 10 << 20  # of 33 MiB
    assert peak_bytes(lambda: export(1 << 30)) > 32 << 20  # all at once: what it measures
    back = load_file(out)
    assert sorted(back) == sorted(tree)
    for name in tree:
        expected = jax.random.key_data(tree[name]) if name == "key" else tree[name]
        assert_same(back[name], expected)
    again = ac.load_safetensors(out)  # and ours reads it too
    assert_same(again["bf"], tree["bf"])
