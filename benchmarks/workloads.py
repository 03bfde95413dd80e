"""Workloads of compare_orbax.py: deterministic trees of sharded arrays on a 4x2 CPU mesh.

Every leaf's data is a pure function of (seed, leaf index), so a restore can be checked exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

WORKLOADS = ("big", "small", "llm", "small_replicated")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One array of a workload: its data comes from the seed `[seed, index]`."""

    index: int
    shape: tuple[int, ...]
    sharding: jax.sharding.Sharding
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def make_mesh() -> jax.sharding.Mesh:
    assert jax.device_count() == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"
    return jax.make_mesh((4, 2), ("x", "y"))


def big_specs(scale: float, mesh) -> dict:
    """48 layers of a 2048x2816 float32 matrix (~1 GiB in all) and a 2816-element vector.

    Matrices alternate P("x", "y") and P("x", None); vectors are replicated. `scale` scales rows.
    """
    rows = max(8, round(2048 * scale / 8) * 8)
    layers = {}
    for i in range(48):
        spec = P("x", "y") if i % 2 == 0 else P("x", None)
        layers[f"layer_{i:02d}"] = {
            "w": LeafSpec(2 * i, (rows, 2816), NamedSharding(mesh, spec)),
            "b": LeafSpec(2 * i + 1, (2816,), NamedSharding(mesh, P())),
        }
    return layers


def small_specs(scale: float, mesh, replicated: bool = False) -> dict:
    """40 groups x 100 leaves of 4096 float32 (16 KiB), on device 0, or (`small_replicated`)
    replicated over the mesh. `scale` scales the number of groups.

    `small` is the default: orbax is much slower with replicated leaves (it handles every
    replica), so `small_replicated` flatters asyncckpt; use it for information only."""
    sharding = NamedSharding(mesh, P()) if replicated else SingleDeviceSharding(jax.devices()[0])
    return {
        f"group_{g:02d}": {
            f"leaf_{j:03d}": LeafSpec(100 * g + j, (4096,), sharding) for j in range(100)
        }
        for g in range(max(1, round(40 * scale)))
    }


def llm_specs(scale: float, mesh) -> dict:
    """The train state of a small transformer, ~1.1 GB: bfloat16 params (a 32000x768 embedding
    and 12 blocks), float32 Adam moments of the same shapes, and an int32 step. `scale` scales
    the vocabulary and the number of blocks."""
    d = 768
    vocab = max(64, round(32000 * scale / 64) * 64)
    blocks = max(1, round(12 * scale))
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def shapes() -> dict:
        block = {
            "ln1": ((d,), P()),
            "qkv": ((d, 3 * d), P("y", "x")),
            "out": ((d, d), P("x", "y")),
            "ln2": ((d,), P()),
            "up": ((d, 4 * d), P(None, ("x", "y"))),
            "down": ((4 * d, d), P(("x", "y"), None)),
        }
        return {
            "embed": ((vocab, d), P("x", "y")),
            "blocks": [dict(block) for _ in range(blocks)],
            "final_ln": ((d,), P()),
        }

    counter = iter(range(1 << 30))

    def leaves(dtype: np.dtype) -> dict:
        return jax.tree.map(
            lambda sp: LeafSpec(next(counter), sp[0], NamedSharding(mesh, sp[1]), dtype),
            shapes(),
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P),
        )

    f32 = np.dtype(np.float32)
    return {
        "params": leaves(bf16),
        "opt": {"mu": leaves(f32), "nu": leaves(f32)},
        "step": LeafSpec(next(counter), (), NamedSharding(mesh, P()), np.dtype(np.int32)),
    }


def workload_specs(workload: str, scale: float) -> dict:
    if workload == "small_replicated":
        return small_specs(scale, make_mesh(), replicated=True)
    return {"big": big_specs, "small": small_specs, "llm": llm_specs}[workload](scale, make_mesh())


def leaf_values(spec: LeafSpec, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, spec.index])
    if spec.dtype.kind in "iu":
        return rng.integers(0, 1 << 20, spec.shape).astype(spec.dtype)
    return rng.standard_normal(spec.shape, dtype=np.float32).astype(spec.dtype)


def build_tree(specs: dict, seed: int) -> dict:
    tree = jax.tree.map(lambda s: jax.device_put(leaf_values(s, seed), s.sharding), specs)
    return jax.block_until_ready(tree)


def abstract_tree(specs: dict) -> dict:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), specs
    )


def tree_nbytes(specs: dict) -> int:
    return sum(s.nbytes for s in jax.tree.leaves(specs))


def verify(restored: dict, specs: dict, seed: int) -> None:
    """Raise unless `restored` has the specs' structure, dtypes, shardings and exact data."""
    got, spec_leaves = jax.tree.leaves(restored), jax.tree.leaves(specs)
    if jax.tree.structure(restored) != jax.tree.structure(specs):
        raise AssertionError("restored tree structure differs from the saved one")
    for arr, spec in zip(got, spec_leaves):
        if arr.shape != spec.shape or arr.dtype != spec.dtype:
            raise AssertionError(f"leaf {spec.index}: got {arr.shape} {arr.dtype}")
        if not arr.sharding.is_equivalent_to(spec.sharding, len(spec.shape)):
            raise AssertionError(f"leaf {spec.index}: sharding {arr.sharding} != {spec.sharding}")
        if np.asarray(arr).tobytes() != leaf_values(spec, seed).tobytes():
            raise AssertionError(f"leaf {spec.index}: restored data differs")
