"""Pure pytree logic: keypaths -> variable names, the JSON description of a tree, rebuilding.

A variable's name is its keypath's parts, escaped and joined by `/` (`_format.variable_name`: any
dict key, with `/`, `..`, unicode, empty or very long, gives a valid, collision-free Zarr node name
that can never leave the checkpoint directory). The name depends on the keypath alone, so a
target tree (or a subset of one) finds its variables without knowing the rest of the saved tree.
The tree description written here is the one docs/FORMAT.md specifies.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from . import _format
from .errors import CorruptCheckpointError, TreeMismatchError, UnsupportedTypeError

MAX_TREE_DEPTH = 256


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection meanwhile. Taking apart or putting together a tree of
    thousands of leaves makes ~10 objects per leaf (and a restore parses a root document of as
    many), which triggers full collections that walk every object of the process: 70 ms of a
    4000-leaf snapshot, 0.15 s of a 0.5 s restore of one. Nothing made here is cyclic."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def key_part(entry: Any) -> str:
    """The unescaped text of one keypath entry."""
    if isinstance(entry, jax.tree_util.DictKey):
        key = entry.key
        if isinstance(key, (str, int)):  # bool is an int
            return str(key)
        raise UnsupportedTypeError(
            f"dict key {key!r} of type {type(key).__name__} cannot be saved: "
            "use str, int or bool keys"
        )
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


_DictKey = jax.tree_util.DictKey


def variable_name(keypath: tuple[Any, ...]) -> str:
    """The storage name of the leaf at `keypath` (`params/dense/kernel`)."""
    return _format.variable_name(
        [  # a dict's str key, the most common part, without `key_part`'s checks
            e.key if type(e) is _DictKey and type(e.key) is str else key_part(e) for e in keypath
        ]
    )


def keystr(keypath: tuple[Any, ...]) -> str:
    """A readable keypath for error messages."""
    return jax.tree_util.keystr(keypath) if keypath else "<root>"


@dataclass(frozen=True, slots=True)
class Leaf:
    """One leaf of a flattened tree."""

    keypath: tuple[Any, ...]
    """The JAX keypath of the leaf."""
    name: str
    """Its variable name in the checkpoint."""
    value: Any
    """The leaf itself."""


def _children(node: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """One level of flattening: ([(key entry, child)], is_leaf)."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(pairs) == 1 and pairs[0][0] == ():
        return [], True
    return [(path[0], child) for path, child in pairs], False


def _class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": value}
    if isinstance(value, float):
        return {"t": "float", "v": repr(value)}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if value is None:
        return {"t": "none"}
    raise TypeError(value)


def is_python_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def python_value(array: Any, target: bool | int | float) -> Any:
    """A 0-d array restored for a python-scalar target leaf, as that python type."""
    if getattr(array, "shape", None) != ():
        return array
    return type(target)(np.asarray(array).item())


def is_array_leaf(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def is_code_leaf(value: Any) -> bool:
    """A callable leaf (a function, a class, a `functools.partial`): part of the program, not
    of its state. Saving records only its name; a restore takes it from the target."""
    return callable(value) and not isinstance(value, (jax.Array, jax.ShapeDtypeStruct))


def is_stateful_leaf(value: Any) -> bool:
    """An object with `get_state()` and `set_state(state)` (grain's data iterators): its state,
    JSON or bytes, is saved in the tree description, and a restore hands it to the target's
    `set_state`."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "get_state", None))
        and callable(getattr(value, "set_state", None))
    )


@dataclass(frozen=True, slots=True)
class SavedState:
    """A state node of the description, decoded when a target asks for it (`decode_state`)."""

    spec: dict[str, Any]


def _encode_state(node: Any, where: str) -> dict[str, Any]:
    state = node.get_state()
    if isinstance(state, bytes):
        return {"t": "state", "b": base64.b64encode(state).decode("ascii")}
    try:
        json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedTypeError(
            f"cannot save the state of the {type(node).__qualname__} at {where}: its "
            f"get_state() returned a {type(state).__name__} that is not JSON or bytes ({e})"
        ) from None
    return {"t": "state", "v": state}


def decode_state(spec: dict[str, Any]) -> Any:
    """The state saved in a state node; under `jax.distributed` (a node per process, in
    `processes`) this process's, which needs as many processes as saved it."""
    if "processes" in spec:
        nodes = spec["processes"]
        if not isinstance(nodes, list) or not all(
            isinstance(n, dict) and "processes" not in n for n in nodes
        ):
            raise _bad(f"bad state leaf {str(spec)[:100]}")
        if len(nodes) != jax.process_count():
            raise TreeMismatchError(
                f"a data iterator's state was saved by {len(nodes)} processes, one each, and "
                f"this job has {jax.process_count()}: restore it with as many processes, or "
                "restore the arrays with strict=False and a target without the iterator"
            )
        return decode_state(nodes[jax.process_index()])
    if isinstance(b := spec.get("b"), str):
        try:
            return base64.b64decode(b, validate=True)
        except ValueError:
            pass
    elif "v" in spec and "b" not in spec:
        return spec["v"]
    raise _bad(f"bad state leaf {str(spec)[:100]}")


def code_ref(value: Any) -> str:
    """`module:qualname` of a code leaf, for people reading the tree description."""
    module = getattr(value, "__module__", None) or "?"
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{module}:{name}"[:200]


def flatten(tree: Any) -> tuple[list[Leaf], dict[str, Any]]:
    """Flatten `tree` into its leaves and a JSON description of its structure.

    Array leaves appear in the description as `{"t": "array", "v": name}`; python scalars are
    stored inline. Raises `UnsupportedTypeError` naming the keypath of any other leaf.
    """
    leaves: list[Leaf] = []
    spec = _describe(tree, (), leaves)
    seen: dict[str, tuple[Any, ...]] = {}
    for leaf in leaves:
        if leaf.name in seen:  # only a sha256 collision of two over-long keys can get here
            raise UnsupportedTypeError(
                f"keypaths {keystr(seen[leaf.name])} and {keystr(leaf.keypath)} map to the same "
                f"variable name {leaf.name!r}: rename one of the keys"
            )
        seen[leaf.name] = leaf.keypath
    return leaves, spec


def _describe(node: Any, keypath: tuple[Any, ...], leaves: list[Leaf]) -> dict[str, Any]:
    if len(keypath) > MAX_TREE_DEPTH:
        raise UnsupportedTypeError(f"tree deeper than {MAX_TREE_DEPTH} levels at {keystr(keypath)}")
    if node is None:
        return {"t": "none"}
    children, is_leaf = _children(node)
    if is_leaf:
        if is_array_leaf(node):
            leaf = Leaf(keypath, variable_name(keypath), node)
            leaves.append(leaf)
            return {"t": "array", "v": leaf.name}
        if isinstance(node, (bool, int, float, str)):
            leaves.append(Leaf(keypath, variable_name(keypath), node))
            return _encode_value(node)
        if is_stateful_leaf(node):  # e.g. a grain data iterator
            return _encode_state(node, keystr(keypath))
        if is_code_leaf(node):  # e.g. an Equinox module's activation: code, not state
            return {"t": "code", "v": code_ref(node)}
        raise UnsupportedTypeError(
            f"cannot save the leaf at {keystr(keypath)} of type {type(node).__qualname__}: "
            "leaves must be jax.Array, numpy arrays, python int/float/bool/str or callables "
            "(register custom classes as pytree nodes, or convert them)"
        )
    described = [_describe(child, (*keypath, key), leaves) for key, child in children]
    keys = [key_part(k) for k, _ in children]
    if type(node) is dict or isinstance(node, dict) and type(node).__name__ == "defaultdict":
        return {"t": "dict", "k": [k.key for k, _ in children], "c": described}
    if isinstance(node, dict):  # OrderedDict and other registered mappings keep their order
        return {"t": "odict", "k": [k.key for k, _ in children], "c": described}
    if type(node) is list:
        return {"t": "list", "c": described}
    if type(node) is tuple:
        return {"t": "tuple", "c": described}
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):
        return {"t": "namedtuple", "cls": _class_ref(type(node)), "f": keys, "c": described}
    if dataclasses.is_dataclass(node):
        meta = {}
        for field in dataclasses.fields(node):
            if field.name not in keys:
                try:
                    meta[field.name] = _encode_value(getattr(node, field.name))
                except TypeError:
                    pass  # restorable with a target only
        return {
            "t": "dataclass",
            "cls": _class_ref(type(node)),
            "f": keys,
            "meta": meta,
            "c": described,
        }
    return {"t": "node", "cls": _class_ref(type(node)), "f": keys, "c": described}


_LEAF_NODES = frozenset(("array", "bool", "int", "float", "str", "code", "state"))


def with_states(spec: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """A copy of the description `spec` of a tree with the current states of its stateful
    leaves; `values` are the tree's leaves in JAX's flatten order (its leaf nodes' order)."""
    position = 0

    def fill(node: dict[str, Any]) -> dict[str, Any]:
        nonlocal position
        t = node["t"]
        if t in _LEAF_NODES:
            value = values[position]
            position += 1
            where = f"leaf {position - 1} (in flatten order)"
            return _encode_state(value, where) if t == "state" else node
        if "c" not in node:
            return node
        return {**node, "c": [fill(child) for child in node["c"]]}

    out = fill(spec)
    assert position == len(values)
    return out


def state_nodes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The state nodes of a description, in order (what a process sends process 0)."""
    if spec["t"] == "state":
        return [spec]
    return [n for child in spec.get("c", ()) for n in state_nodes(child)]


def with_process_states(spec: dict[str, Any], per_process: list[list[dict[str, Any]]]) -> Any:
    """The description `spec` with each state node replaced by `{"t": "state", "processes":
    [node of process 0, node of process 1, ...]}` (`per_process[p]`: `state_nodes` of p's)."""
    position = 0

    def fill(node: dict[str, Any]) -> dict[str, Any]:
        nonlocal position
        if node["t"] == "state":
            position += 1
            return {"t": "state", "processes": [nodes[position - 1] for nodes in per_process]}
        if "c" not in node:
            return node
        return {**node, "c": [fill(child) for child in node["c"]]}

    return fill(spec)


# ---------------------------------------------------------------------------------------------
# Rebuilding a tree from its description (no target). The description is untrusted input.


def _bad(msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"the tree description in the root zarr.json is invalid: {msg}")


def decode_value(spec: Any) -> Any:
    if not isinstance(spec, dict):
        raise _bad(f"bad value leaf {str(spec)[:100]}")
    t, v = spec.get("t"), spec.get("v")
    if t == "bool" and isinstance(v, bool):
        return v
    if t == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t == "float" and isinstance(v, str) and len(v) < 40:
        try:
            return float(v)
        except ValueError:
            pass
    if t == "str" and isinstance(v, str):
        return v
    if t == "none":
        return None
    raise _bad(f"bad value leaf {str(spec)[:100]}")


def _lookup_class(ref: Any) -> type | None:
    """The class named `module:qualname`, only if its module is already imported (no imports)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        return None
    module_name, qualname = ref.split(":")
    obj: Any = sys.modules.get(module_name)
    for attr in qualname.split("."):
        obj = getattr(obj, attr, None) if obj is not None else None
    return obj if isinstance(obj, type) else None


def unflatten(spec: Any, arrays: dict[str, Any], depth: int = 0) -> Any:
    """Rebuild the saved tree from its description; arrays come from `arrays[name]`.

    Namedtuples and dataclasses become their class when it is already imported and has the saved
    fields; otherwise (and for other custom nodes) they come back as dicts keyed by field.
    """
    if depth > MAX_TREE_DEPTH:
        raise _bad(f"nested deeper than {MAX_TREE_DEPTH} levels")
    if not isinstance(spec, dict):
        raise _bad(f"node {str(spec)[:100]} is not an object")
    t = spec.get("t")
    if t == "array":
        return arrays[_array_name(spec)]
    if t in ("bool", "int", "float", "str", "none"):
        return decode_value(spec)
    if t == "code":  # a function is not state: only a target can give it back
        return None
    if t == "state":  # another number of processes: every process's state, for a look
        nodes = spec.get("processes")
        if isinstance(nodes, list) and len(nodes) != jax.process_count():
            if not all(isinstance(n, dict) and "processes" not in n for n in nodes):
                raise _bad(f"bad state leaf {str(spec)[:100]}")
            return [decode_state(n) for n in nodes]
        return decode_state(spec)
    children = [unflatten(c, arrays, depth + 1) for c in _spec_children(spec)]
    if t == "list":
        return children
    if t == "tuple":
        return tuple(children)
    keys = spec.get("k") if t in ("dict", "odict") else spec.get("f")
    if (
        not isinstance(keys, list)
        or len(keys) != len(children)
        or not all(isinstance(k, (str, int, float, bool)) or k is None for k in keys)
    ):
        raise _bad(f"node of type {t!r} has {len(children)} children but keys {str(keys)[:100]}")
    if t in ("dict", "odict"):
        return dict(zip(keys, children))
    cls = _lookup_class(spec.get("cls"))
    fields = dict(zip(keys, children))
    if t == "namedtuple" and cls is not None and list(getattr(cls, "_fields", ())) == keys:
        return cls(*children)
    if t == "dataclass" and cls is not None and dataclasses.is_dataclass(cls):
        meta = raw if isinstance(raw := spec.get("meta"), dict) else {}
        if not all(isinstance(k, str) for k in meta):
            raise _bad(f"bad dataclass fields {str(meta)[:100]}")
        values = {**{k: decode_value(v) for k, v in meta.items()}, **fields}
        if set(values) == {f.name for f in dataclasses.fields(cls) if f.init}:
            try:
                return cls(**values)
            except Exception:  # a class whose __init__ is its own (an Equinox module): a dict
                pass
    if t in ("namedtuple", "dataclass", "node"):
        return fields
    raise _bad(f"unknown node type {t!r}")


def spec_leaf_names(spec: Any, depth: int = 0) -> list[str]:
    """The array variable names referenced by a tree description, in tree order."""
    if depth > MAX_TREE_DEPTH or not isinstance(spec, dict):
        raise _bad("malformed or too deeply nested")
    if spec.get("t") == "array":
        return [_array_name(spec)]
    names: list[str] = []
    for child in _spec_children(spec, leaf_ok=True):
        names.extend(spec_leaf_names(child, depth + 1))
    return names


def _array_name(spec: dict[str, Any]) -> str:
    name = spec.get("v")
    if not isinstance(name, str):
        raise _bad(f"array leaf without a variable name: {str(spec)[:100]}")
    return name


def _spec_children(spec: dict[str, Any], leaf_ok: bool = False) -> list[Any]:
    """The child list of a container node (`leaf_ok`: none for a scalar or `None` leaf)."""
    kids = spec.get("c")
    if kids is None and leaf_ok:
        return []
    if not isinstance(kids, list):
        raise _bad(f"node of type {str(spec.get('t'))[:50]!r} has no child list")
    return kids


def spec_values(spec: Any, keypath: tuple[str, ...] = (), depth: int = 0) -> dict[str, Any]:
    """The python-scalar leaves (and `SavedState`s) of a tree description, by variable name."""
    if depth > MAX_TREE_DEPTH or not isinstance(spec, dict):
        raise _bad("malformed or too deeply nested")
    t = spec.get("t")
    if t in ("bool", "int", "float", "str"):
        name = _format.variable_name(list(keypath))
        return {name: decode_value(spec)}
    if t == "state":
        return {_format.variable_name(list(keypath)): SavedState(spec)}
    out: dict[str, Any] = {}
    kids = _spec_children(spec, leaf_ok=True)
    keys = spec.get("k") if t in ("dict", "odict") else spec.get("f")
    for i, child in enumerate(kids):
        if type(child) is dict and child.get("t") == "array":
            continue  # most leaves, without a call each (4000 leaves: 5 ms of a restore)
        part = str(keys[i]) if isinstance(keys, list) and i < len(keys) else str(i)
        out.update(spec_values(child, (*keypath, part), depth + 1))
    return out


# ---------------------------------------------------------------------------------------------
# Structural diff between a target and a checkpoint


def check_match(
    target_leaves: list[Leaf],
    saved_shapes: dict[str, tuple[int, ...]],
    *,
    strict: bool,
    where: str,
) -> None:
    """Raise `TreeMismatchError` when the target's leaves and the saved ones differ.

    `saved_shapes` maps every saved name to its shape (`()` for python scalars, which also
    stand for 0-d arrays in the target: the restore follows the target's kind).
    """
    target_names = {leaf.name for leaf in target_leaves}
    missing = [keystr(leaf.keypath) for leaf in target_leaves if leaf.name not in saved_shapes]
    extra = sorted(n for n in saved_shapes if n not in target_names) if strict else []
    shapes = []
    for leaf in target_leaves:
        saved = saved_shapes.get(leaf.name)
        shape = () if is_python_scalar(leaf.value) else getattr(leaf.value, "shape", None)
        if saved is not None and shape is not None and tuple(shape) != saved:
            shapes.append(f"{keystr(leaf.keypath)}: target {tuple(shape)}, checkpoint {saved}")
    if missing or extra or shapes:
        raise mismatch(
            f"the target tree does not match the checkpoint {where}:",
            [
                ("in the target but not in the checkpoint", missing),
                (
                    "in the checkpoint but not in the target (pass `strict=False` to skip them)",
                    extra,
                ),
                ("shape differs", shapes),
            ],
        )


def mismatch(head: str, sections: list[tuple[str, list[str]]]) -> TreeMismatchError:
    """A `TreeMismatchError` listing, under `head`, each non-empty section (20 items at most)."""
    lines = [head]
    for title, items in sections:
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title}: " + ", ".join(shown))
    return TreeMismatchError("\n".join(lines))
