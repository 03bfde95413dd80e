"""Property test: random pytrees round-trip exactly (structure, dtypes, bytes, python leaves)."""

import jax
import numpy as np
from conftest import assert_same
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_roundtrip import ML_DTYPES, NUMPY_DTYPES, _values

import asyncckpt as ac

_dtypes = st.sampled_from(NUMPY_DTYPES + ML_DTYPES)
_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
_arrays = st.builds(lambda d, s, seed: _values(d, s, seed), _dtypes, _shapes, st.integers(0, 99))
_numpy_scalars = st.builds(lambda v: np.float64(v), st.floats(allow_nan=True))
_python = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=20))
_keys = st.one_of(st.text(max_size=12), st.sampled_from(["..", ".", "/", "a/b", "zarr.json"]))


def _trees(leaves):
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.dictionaries(_keys, kids, max_size=4),
            st.dictionaries(st.integers(0, 9), kids, max_size=3),
            st.lists(kids, max_size=4),
            st.lists(kids, max_size=3).map(tuple),
            st.just(None),
        ),
        max_leaves=12,
    )


def _same_leaf(a, b):
    if isinstance(a, (np.ndarray, np.generic)):
        assert_same(a, b)
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b))


@given(tree=_trees(st.one_of(_arrays, _python, _numpy_scalars)))
def test_random_trees_round_trip(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("prop") / "ck"
    ac.save(path, tree)
    back = ac.restore(path)
    leaves_a, def_a = jax.tree_util.tree_flatten(tree)
    leaves_b, def_b = jax.tree_util.tree_flatten(back)
    assert def_a == def_b
    for a, b in zip(leaves_a, leaves_b):
        _same_leaf(a, b)
    # ... and restoring onto the tree itself as target gives the same again
    again = ac.restore(path, tree)
    for a, b in zip(leaves_a, jax.tree_util.tree_leaves(again)):
        _same_leaf(a, b)
