"""Variable names: any dict key round-trips and no name ever leaves the checkpoint directory."""

import os

import numpy as np
import pytest
from conftest import assert_same
from hypothesis import given
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt import _format

HOSTILE_KEYS = [
    "a/b",
    "..",
    ".",
    "",
    "../../etc",
    "/abs",
    "zarr.json",
    "__x",
    "ünï©ødé",
    "%2E",
    "~",
    "c",
    "x" * 1000,
    "a\\b",
    "\x00nul",
    "  ",
    "A",
    "a",
]


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_hostile_keys_round_trip_inside_the_checkpoint(tmp_path):
    tree = {k: np.full(2, i) for i, k in enumerate(HOSTILE_KEYS)}
    tree["nested"] = {k: {"deeper": np.full(1, i)} for i, k in enumerate(HOSTILE_KEYS[:6])}
    ac.save(tmp_path / "out" / "ck", tree)
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(tmp_path / "out") == ["ck"]
    back = ac.restore(tmp_path / "out" / "ck")
    assert set(back) == set(tree)
    for k in HOSTILE_KEYS:
        assert_same(back[k], tree[k])
    for k in HOSTILE_KEYS[:6]:
        assert_same(back["nested"][k]["deeper"], tree["nested"][k]["deeper"])
    for path in _files(tmp_path / "out" / "ck"):
        parts = path.split(os.sep)
        assert ".." not in parts and "." not in parts and all(len(p) <= 255 for p in parts)


def test_names_of_ordinary_keys_are_readable():
    assert _format.escape_part("kernel") == "kernel"
    assert _format.escape_part("a/b") == "a%2Fb"
    assert _format.escape_part("..") == "%2E."
    assert _format.escape_part("") == "~"


@given(st.lists(st.text(max_size=300), min_size=1, max_size=30, unique=True))
def test_escaping_is_injective_and_valid(keys):
    names = [_format.escape_part(k) for k in keys]
    assert len(set(names)) == len(names)
    for n in names:
        assert n and "/" not in n and n not in (".", "..") and not n.startswith("__")
        assert len(n.encode()) <= 255


def _full_check(name):
    """The rule for names read from disk, as stated."""
    parts = name.split("/")
    return (
        0 < len(name) < 4096
        and "\\" not in name
        and "\x00" not in name
        and all(p not in ("", ".", "..") and not p.startswith("__") for p in parts)
    )


@given(st.text(alphabet="ab_._~%-/\\\x00é", max_size=12))
def test_the_fast_name_check_accepts_only_what_the_full_one_does(name):
    if _format._plain_name(name):
        assert _full_check(name)
    if _full_check(name):
        assert _format.check_name(name, "w") == name
    else:
        with pytest.raises(ac.CorruptCheckpointError, match="invalid variable name"):
            _format.check_name(name, "w")


@given(st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_escaped_names_take_the_fast_name_check(keys):
    assert _format._plain_name(_format.variable_name(keys))


def test_unsupported_dict_key_names_keypath(tmp_path):
    with pytest.raises(ac.UnsupportedTypeError, match=r"dict key \(1, 2\)"):
        ac.save(tmp_path / "ck", {(1, 2): np.ones(1)})
    assert not (tmp_path / "ck").exists()
