"""Checkpoints from elsewhere are untrusted input: hostile metadata gives a clear error, never an
absurd allocation, a read outside the checkpoint, or an exception of another kind."""

import ast
import json
import os
import pathlib
import re
import shutil
import stat

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt import _format


def saved(tmp_path):
    path = tmp_path / "ck"
    ac.save(
        path,
        {
            "w": np.arange(12, dtype=np.float32).reshape(3, 4),
            "nested": {"v": np.arange(3, dtype=np.int64)},
        },
    )
    return path


def edit_root(path, fn):
    """Apply `fn` to the root document's JSON and write it back."""
    doc = json.loads((path / "zarr.json").read_text())
    fn(doc)
    (path / "zarr.json").write_text(json.dumps(doc))


def node(doc, name):
    return doc["consolidated_metadata"]["metadata"][name]


def set_shape(name, shape, chunk):
    def fn(doc):
        node(doc, name)["shape"] = shape
        node(doc, name)["chunk_grid"]["configuration"]["chunk_shape"] = chunk

    return fn


def test_absurd_shape_is_not_allocated(tmp_path):
    path = saved(tmp_path)
    edit_root(path, set_shape("w", [10**12], [10**12]))
    rss = psutil.Process().memory_info().rss
    with pytest.raises(ac.CheckpointError, match="'w'") as info:
        ac.restore(path)
    # refused by the chunk file's size or absence (a whole chunk is only allocated once its file
    # is found to be mappable or not); nothing near 4 TB was touched
    assert re.search(r"w/c\.0 is missing|expected 4000000000004", str(info.value))
    assert psutil.Process().memory_info().rss - rss < 256 << 20
    with pytest.raises(ac.TreeMismatchError):
        ac.restore(
            path, {"w": np.zeros((3, 4), np.float32), "nested": {"v": np.zeros(3, np.int64)}}
        )


@pytest.mark.parametrize(
    "shape, chunk, message",
    [
        ([3, 4], [30, 4], r"chunk shape \(30, 4\) is larger than the array \(3, 4\)"),
        ([10**7], [1], "10000000 chunks of"),
        ([3, -4], [3, 4], "`shape` must be a list of non-negative integers"),
        ([3, 4], [0, 4], "`chunk_shape` must be a list of positive integers"),
        ([3, 4], [3], r"chunk shape \(3,\) does not match shape \(3, 4\)"),
        ([3, 4.5], [3, 4], "`shape` must be a list"),
        ([[3], 4], [3, 4], "`shape` must be a list"),
        ("3,4", [3, 4], "`shape` must be a list"),
        ([1] * 65, [1] * 65, "`shape` must be a list"),
    ],
)
def test_bad_shapes_and_chunks(tmp_path, shape, chunk, message):
    path = saved(tmp_path)
    edit_root(path, set_shape("w", shape, chunk))
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        ac.restore(path)
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        ac.list_variables(path)


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../outside", "a/../../b", "a//b", "a\\..\\b", "__proto__/x", ""]
)
def test_names_that_would_leave_the_checkpoint(tmp_path, name):
    path = saved(tmp_path)

    def rename(doc):
        nodes = doc["consolidated_metadata"]["metadata"]
        nodes[name] = nodes.pop("w")

    edit_root(path, rename)
    with pytest.raises(ac.CorruptCheckpointError, match="invalid variable name"):
        ac.restore(path)


def test_symlinked_directory_out_of_the_checkpoint(tmp_path):
    path = saved(tmp_path)
    outside = tmp_path / "outside"
    shutil.move(path / "nested", outside)  # valid chunks, but outside the checkpoint
    os.symlink(outside, path / "nested")
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=f"{path / 'nested'} is a symbolic link; asyncckpt reads nothing",
    ):
        ac.restore(path)
    with pytest.raises(ac.CorruptCheckpointError, match="is a symbolic link"):
        ac.verify(path)
    with pytest.raises(ac.CorruptCheckpointError, match="is a symbolic link"):
        ac.load_variable(path, "nested/v")


def test_symlinked_chunk_and_document(tmp_path):
    path = saved(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * 52)  # the size of w's chunk: only the link gives it away
    (path / "w" / "c.0.0").unlink()
    os.symlink(secret, path / "w" / "c.0.0")
    with pytest.raises(ac.CorruptCheckpointError, match="c.0.0 is a symbolic link"):
        ac.restore(path)
    other = saved(tmp_path / "b")
    (other / "zarr.json").rename(tmp_path / "root.json")
    os.symlink(tmp_path / "root.json", other / "zarr.json")
    with pytest.raises(ac.CorruptCheckpointError, match="zarr.json is a symbolic link"):
        ac.restore(other)


def nest(depth):
    tree = {"t": "array", "v": "w"}
    for _ in range(depth):
        tree = {"t": "dict", "k": ["x"], "c": [tree]}
    return tree


def test_deeply_nested_tree_and_json(tmp_path):
    path = saved(tmp_path)
    edit_root(path, lambda doc: doc["attributes"]["asyncckpt"].update(tree=nest(300)))
    with pytest.raises(ac.CorruptCheckpointError, match="nested"):
        ac.restore(path)
    (path / "zarr.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ac.CorruptCheckpointError, match="nested too deeply"):
        ac.restore(path)


def test_huge_root_document_is_not_read(tmp_path):
    path = saved(tmp_path)
    with open(path / "zarr.json", "r+b") as f:  # sparse: costs no disk
        f.truncate(_format.MAX_ROOT_DOC_BYTES + 1)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(ac.CorruptCheckpointError, match="more than the 268435456 allowed"):
        ac.restore(path)
    assert psutil.Process().memory_info().rss - rss < 64 << 20


def test_no_pickle_or_eval_in_the_package():
    """Loading never unpickles or evaluates anything read from a checkpoint."""
    banned_modules = {
        "pickle",
        "cPickle",
        "_pickle",
        "marshal",
        "shelve",
        "dill",
        "cloudpickle",
        "joblib",
    }
    banned_calls = {"eval", "exec", "compile", "__import__", "load", "loads"}
    package = pathlib.Path(ac.__file__).parent
    for source in sorted(package.glob("*.py")):
        tree = ast.parse(source.read_text(), str(source))
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                assert not {a.name.split(".")[0] for a in n.names} & banned_modules, source
            elif isinstance(n, ast.ImportFrom):
                assert (n.module or "").split(".")[0] not in banned_modules, source
            elif isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Name):
                    assert f.id not in banned_calls, (source, n.lineno)
                if isinstance(f, ast.Attribute) and f.attr in ("load", "loads"):
                    # only json.loads and orjson.loads; never np.load / pickle.load / yaml.load
                    assert (
                        isinstance(f.value, ast.Name)
                        and f.value.id in ("json", "orjson")
                        and f.attr == "loads"
                    ), (source, n.lineno, ast.unparse(n))
            elif isinstance(n, ast.keyword) and n.arg == "allow_pickle":
                raise AssertionError(f"{source}:{n.value.lineno}: allow_pickle")


# --------------------------------------------------------------------------- fuzzing the parser

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


def paths_of(value, prefix=()):
    """Every location inside a JSON value, as a tuple of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_of(v, (*prefix, i))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


VALID = None


def valid_root_doc():
    global VALID
    if VALID is None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            ac.save(
                os.path.join(d, "ck"),
                {"w": np.zeros((4, 4), np.float32), "l": [np.ones(3, np.int8), 2.5], "s": "x"},
            )
            with open(os.path.join(d, "ck", "zarr.json"), "rb") as f:
                VALID = json.loads(f.read())
    return VALID


def parse(raw: bytes):
    info = _format.parse_root_doc(raw, "fuzz")
    from asyncckpt import _tree

    _tree.spec_values(info.tree)
    names = _tree.spec_leaf_names(info.tree)
    _tree.unflatten(info.tree, dict.fromkeys(names))


def _decoded_alike(a, b):
    """Equal, with NaN equal to NaN, and of the same types all the way down (1 is not 1.0).
    Without recursion: Python 3.13's `json` decodes nestings deeper than its recursion limit."""
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
            continue
        if type(a) is not type(b):
            return False
        if isinstance(a, dict):
            if list(a) != list(b):
                return False
            pending.extend((a[k], b[k]) for k in a)
        elif isinstance(a, list):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b))
        elif a != b:
            return False
    return True


_JSON_TEXTS = st.sampled_from(
    [
        b"123456789012345678901234567890",
        b"-9999999999999999999",
        b'{"a": -   12345678901234567890123}',
        b'[1, 18446744073709551616, "1234567890123456789012"]',
        b'{"h": "00112233445566778899001122334455", "x": 0.12345678901234567890123}',
        b"1e400",
        b"[NaN, Infinity, -Infinity]",
        b'"\\ud800"',
        b'{"a": 1, "a": 2}',
        b"\xef\xbb\xbf[1]",
        b"[" * 3000 + b"]" * 3000,
    ]
)


@settings(max_examples=300, deadline=None)
@given(raw=_JSON_TEXTS | json_values.map(lambda v: json.dumps(v, indent=None).encode()))
def test_documents_decode_as_the_json_module_decodes_them(raw):
    """`parse_json` decodes through orjson where it can and through `json` for the rest (what
    orjson refuses, and integers it would make floats); the result is always `json`'s."""
    try:
        want = json.loads(raw)
    except RecursionError:
        with pytest.raises(ac.CorruptCheckpointError, match="nested too deeply"):
            _format.parse_json(raw, "w", "doc")
        return
    except ValueError:
        with pytest.raises(ac.CorruptCheckpointError, match="not valid JSON"):
            _format.parse_json(raw, "w", "doc")
        return
    assert _decoded_alike(_format.parse_json(raw, "w", "doc"), want)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), new=json_values)
def test_fuzz_mutated_root_document(data, new):
    """Any one value of a valid root document replaced by any JSON value: the parser accepts it
    or raises a CheckpointError, nothing else."""
    doc = valid_root_doc()
    locations = list(paths_of(doc))
    path = data.draw(st.sampled_from(locations))
    try:
        parse(json.dumps(replaced(doc, path, new)).encode())
    except ac.CheckpointError:
        pass


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_arbitrary_bytes(raw):
    try:
        parse(raw)
    except ac.CheckpointError:
        pass


FUZZ_SECONDS = float(os.environ.get("ASYNCCKPT_FUZZ_SECONDS", "5"))


def test_fuzz_raw_mutations_for_a_fixed_time():
    """Byte-level mutations of a valid root document (flips, cuts, splices, duplicated spans)
    for a fixed time budget (ASYNCCKPT_FUZZ_SECONDS, default 5 s): only CheckpointErrors."""
    import random
    import time

    raw = json.dumps(valid_root_doc()).encode()
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    deadline = time.monotonic() + FUZZ_SECONDS
    cases = 0
    while time.monotonic() < deadline:
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randint(1, 40))
            kind = rng.randrange(4)
            if kind == 0:
                data[i] = rng.randrange(256)
            elif kind == 1:
                del data[i:j]
            elif kind == 2:
                data[i:i] = data[rng.randrange(len(data)) :][: rng.randint(1, 40)]
            else:
                data[i:j] = rng.choice(
                    [
                        b"[",
                        b"]",
                        b"{",
                        b"}",
                        b'"',
                        b"-1",
                        b"1e999",
                        b"null",
                        b"0",
                        b"99999999999999999999",
                        b'"..\\/x"',
                    ]
                )
        try:
            parse(bytes(data))
        except ac.CheckpointError:
            pass
        except Exception as e:
            raise AssertionError(
                f"seed {seed}, case {cases}: {type(e).__name__}: {e}\n{bytes(data)[:2000]!r}"
            ) from e
        cases += 1
    assert cases > 100


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["w/c.0.0", "zarr.json", "w/zarr.json"])
@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_a_fifo_or_device_in_a_checkpoint_is_refused_not_waited_on(tmp_path, victim, kind):
    """Issue 21: a FIFO hung every reader for ever; a character device (size 0 to fstat) was
    read a byte per call up to 256 MiB. Every reader now refuses anything but a regular file."""
    path = saved(tmp_path)
    target = path / victim
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        try:
            os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
        except PermissionError:
            pytest.skip("mknod needs root")
    what = "a FIFO" if kind == "fifo" else "a character device"
    match = rf"{re.escape(victim)} is {what}, not a regular file"
    readers = {  # the readers that open this file
        "w/c.0.0": [
            lambda: ac.restore(path),
            lambda: ac.restore(path, map_files=False),
            lambda: ac.load_variable(path, "w"),
        ],
        "zarr.json": [lambda: ac.restore(path), lambda: ac.list_variables(path)],
        "w/zarr.json": [lambda: ac.load_variable(path, "w")],
    }[victim] + [lambda: ac.verify(path)]
    for read in readers:
        with pytest.raises(ac.CorruptCheckpointError, match=match):
            read()


def test_load_variable_checks_the_array_document_against_the_root_document(tmp_path):
    """Issue 21: load_variable trusted `w/zarr.json` alone, so a dtype changed there (float32
    to int32, same size) returned reinterpreted bytes where restore and verify see the saved
    float32."""
    path = saved(tmp_path)
    doc = json.loads((path / "w" / "zarr.json").read_text())
    doc["data_type"] = "int32"
    (path / "w" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(
        ac.CorruptCheckpointError,
        match=r"w/zarr.json says shape \(3, 4\), dtype int32.*the root document .* says shape "
        r"\(3, 4\), dtype float32",
    ):
        ac.load_variable(path, "w")
    np.testing.assert_array_equal(ac.load_variable(path, "nested/v"), np.arange(3))


def test_arrays_alike_but_one_field_are_each_read_as_their_own_document(tmp_path):
    """A root document's array documents are parsed once for each distinct one (thousands of
    small leaves share a few): documents of one shape and data type that differ elsewhere are
    still told apart, and a bad name or a damaged document among many alike is refused."""
    leaves = {f"a{i}": np.full((4, 4), i, np.float32) for i in range(6)}
    path = tmp_path / "ck"
    ac.save(path, leaves)

    def a_key(doc):
        node(doc, "a3")["attributes"] = {"asyncckpt": {"prng_impl": "threefry2x32"}}

    edit_root(path, a_key)
    info = _format.parse_root_doc((path / "zarr.json").read_bytes(), "ck")
    impls = [info.arrays[f"a{i}"].prng_impl for i in range(6)]
    assert impls == [None, None, None, "threefry2x32", None, None]
    assert [info.arrays[f"a{i}"].name for i in range(6)] == [f"a{i}" for i in range(6)]

    def damaged(doc):
        node(doc, "a4")["codecs"] = [{"name": "gzip"}]

    ac.save(path, leaves, force=True)
    edit_root(path, damaged)
    with pytest.raises(ac.CorruptCheckpointError, match="array 'a4'.*unsupported codecs"):
        ac.restore(path)

    def renamed(doc):
        nodes = doc["consolidated_metadata"]["metadata"]
        nodes["../a5"] = nodes.pop("a5")

    ac.save(path, leaves, force=True)
    edit_root(path, renamed)
    with pytest.raises(ac.CorruptCheckpointError, match=r"\.\./a5"):
        ac.restore(path)
