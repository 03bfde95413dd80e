"""Importing Orbax checkpoints (the migration path from orbax-checkpoint), without loss.

A step of an Orbax `CheckpointManager` is a directory of items. Each one is converted or the
import is refused naming it; nothing is dropped silently:
- PyTree / `StandardSave` items (OCDBT or not) are read by orbax-checkpoint itself, every array
  as NumPy on the host. Typed PRNG keys, which Orbax stores as their key data with the key's
  implementation beside it (`array_metadatas/`), become typed keys again. One such item is the
  checkpoint's tree; several become `{item: tree}`.
- `JsonSave` items go into the metadata, under `orbax_items`; the manager's `metrics` item (or
  the metrics in `_CHECKPOINT_METADATA`) become the step's metrics, and the step number comes
  from the directory name, so a manager ranks and lists the step as its own.
- Anything else is refused unless listed in `skip_items`.
Names follow the tree: Orbax's `params.dense.kernel` becomes `params/dense/kernel`. Host memory:
the whole tree, plus the copy `save` takes. absl's log lines and Python warnings that
orbax-checkpoint emits while reading are kept off the user's console.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _format, _tree
from ._checkpointer import save_fields
from ._storage import open_storage
from .errors import CheckpointError, CheckpointNotFoundError

_ITEM_MARKERS = ("_METADATA", "manifest.ocdbt")
_STEP_METADATA = "_CHECKPOINT_METADATA"
_COMMIT_MARKER = "commit_success.txt"


@dataclass(frozen=True, slots=True)
class _Item:
    name: str
    path: str
    kind: str  # "pytree", "json" or "metrics"


def import_orbax(
    src: Any, dest: Any, *, force: bool = False, skip_items: Sequence[str] = ()
) -> tuple[int, int]:
    """Convert an Orbax checkpoint into an asyncckpt checkpoint at `dest`.

    `src` is a step directory of an Orbax `CheckpointManager` (`<root>/<step>`: every item of it
    is converted, see the module's rules), or one PyTree item directory (holding `_METADATA`).
    Items that cannot be converted raise `CheckpointError` naming them; `skip_items` leaves
    those named out on purpose. Names, dtypes (bfloat16 too), typed PRNG keys, JSON items and
    metrics are kept; arrays come back unsharded. Returns (arrays, bytes).
    Needs orbax-checkpoint (`pip install 'asyncckpt[orbax]'`).
    """
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise CheckpointError(
            f"importing an Orbax checkpoint needs orbax-checkpoint ({e}); "
            "install it with `pip install 'asyncckpt[orbax]'`"
        ) from None
    path = _local_dir(os.fspath(src))
    items, step_meta = _items(path, set(skip_items))
    trees: dict[str, Any] = {}
    json_items: dict[str, Any] = {}
    metrics = step_meta.get("metrics") or None
    with _quiet():
        for item in items:
            if item.kind == "pytree":
                trees[item.name] = _read_pytree(ocp, item.path)
            elif item.kind == "metrics":
                metrics = _read_json(item.path)
            else:
                json_items[item.name] = _read_json(item.path)
    if not trees:
        raise CheckpointError(f"{path} holds no PyTree item to import (items: {_names(items)})")
    tree = next(iter(trees.values())) if len(trees) == 1 else trees
    metadata: dict[str, Any] = {"imported_from": path, "format": "orbax"}
    if json_items:
        metadata["orbax_items"] = json_items
    name = os.path.basename(path.rstrip("/"))
    step = int(name) if name.isdigit() and step_meta is not _NO_STEP else None
    if metrics is not None and step is None:
        metadata["metrics"] = metrics
    where = f"while importing {path}"
    fields = _format.root_fields(
        metadata, _format.StepFields(step, metrics) if step is not None else None, where
    )
    save_fields(open_storage(dest), tree, fields, force)
    leaves = _leaves(tree)
    return len(leaves), sum(int(np.asarray(x).nbytes) for x in leaves)


_NO_STEP: dict[str, Any] = {}  # `src` was an item directory: no step, no step metadata


def _items(path: str, skip: set[str]) -> tuple[list[_Item], dict[str, Any]]:
    """The items of the step (or the one item) at `path`, and the step's metadata document."""
    if _is_pytree(path):
        return [_Item(os.path.basename(path), path, "pytree")], _NO_STEP
    step_meta = _step_metadata(path)
    handlers = step_meta.get("item_handlers")
    handlers = handlers if isinstance(handlers, dict) else {}
    items, refused = [], []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not entry.is_dir() or entry.name in skip:
            continue
        handler = str(handlers.get(entry.name, ""))
        pytree_handler = handler.endswith(("PyTreeCheckpointHandler", "StandardCheckpointHandler"))
        if (pytree_handler or not handler) and _is_pytree(entry.path):
            items.append(_Item(entry.name, entry.path, "pytree"))
        elif handler.endswith("JsonCheckpointHandler"):
            kind = "metrics" if entry.name == "metrics" else "json"
            items.append(_Item(entry.name, entry.path, kind))
        else:
            refused.append(f"{entry.name!r} ({handler.rsplit('.', 1)[-1] or 'unknown handler'})")
    if not items:
        raise CheckpointNotFoundError(
            f"{path} is not an Orbax PyTree checkpoint: it has no _METADATA, and no item "
            "directory (like `default/`) with one"
        )
    unknown = sorted(skip - {e.name for e in os.scandir(path) if e.is_dir()})
    if unknown:
        raise CheckpointError(f"skip_items names {unknown}, which {path} does not hold")
    if refused:
        raise CheckpointError(
            f"cannot import {path}: asyncckpt converts PyTree/StandardSave and JsonSave items, "
            f"and this step also holds {', '.join(refused)}. Nothing was written; pass "
            f"skip_items=[...] (--skip on the command line) to import the step without them"
        )
    return items, step_meta


def _is_pytree(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in _ITEM_MARKERS)


def _step_metadata(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, _STEP_METADATA), "rb") as f:
            doc = json.loads(f.read(_format.MAX_ARRAY_DOC_BYTES))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {os.path.join(path, _STEP_METADATA)}: {e}") from e
    return doc if isinstance(doc, dict) else {}


def _json_file(item: str) -> str | None:
    """The one data file of a JsonSave item directory, or None."""
    files = [e.path for e in os.scandir(item) if e.is_file() and e.name != _COMMIT_MARKER]
    return files[0] if len(files) == 1 else None


def _read_json(item: str) -> Any:
    file = _json_file(item)
    if file is None:
        raise CheckpointError(f"the JSON item {item} should hold one file; it holds several")
    try:
        with open(file, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the JSON item {file}: {e}") from e


def _read_pytree(ocp: Any, item: str) -> Any:
    import jax

    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(item)
        tree_meta = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree_meta is None:
            raise ValueError("no tree metadata")
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
        tree = ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the Orbax checkpoint {item}: {e}") from e
    impls = _key_impls(item)
    if not impls:
        return tree

    def typed(keypath: tuple[Any, ...], leaf: Any) -> Any:
        impl = impls.get(".".join(_tree.key_part(k) for k in keypath))
        return leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)

    return jax.tree_util.tree_map_with_path(typed, tree)


def _key_impls(item: str) -> dict[str, str]:
    """Orbax's parameter name -> PRNG implementation of the typed keys it saved as key data."""
    impls: dict[str, str] = {}
    folder = os.path.join(item, "array_metadatas")
    if not os.path.isdir(folder):
        return impls
    for entry in os.scandir(folder):
        try:
            with open(entry.path, "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {entry.path}: {e}") from e
        for record in doc.get("array_metadatas", []) if isinstance(doc, dict) else []:
            meta = record.get("array_metadata", {}) if isinstance(record, dict) else {}
            ext = meta.get("ext_metadata") or {}
            impl = ext.get("random_key_impl") if isinstance(ext, dict) else None
            if isinstance(impl, str) and isinstance(meta.get("param_name"), str):
                impls[meta["param_name"]] = impl
    return impls


def _leaves(tree: Any) -> list[Any]:
    import jax

    return [
        jax.random.key_data(x) if isinstance(x, jax.Array) and _is_key(x) else x
        for x in jax.tree.leaves(tree)
    ]


def _is_key(x: Any) -> bool:
    import jax

    return bool(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _names(items: list[_Item]) -> str:
    return ", ".join(f"{i.name} ({i.kind})" for i in items) or "none"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """orbax-checkpoint logs through absl (e.g. "Metadata file does not exist" for an item
    read on its own) and may warn; none of it is about the user's import."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl.setLevel(level)


def _local_dir(path: str) -> str:
    src = open_storage(path).local_path
    if src is None:
        raise CheckpointError(
            f"cannot import {path}: importing Orbax checkpoints from object "
            "stores is not supported; copy it to disk first"
        )
    if not os.path.isdir(src):
        raise CheckpointNotFoundError(f"no Orbax checkpoint at {src}: not a directory")
    return src
