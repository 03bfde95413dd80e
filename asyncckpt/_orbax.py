"""Importing Orbax PyTree checkpoints (the migration path from orbax-checkpoint).

The Orbax checkpoint is read by orbax-checkpoint itself (OCDBT or plain zarr layouts alike),
every array onto host memory as NumPy, and written as an asyncckpt checkpoint. Names follow the
tree: Orbax's `params.dense.kernel` becomes `params/dense/kernel`; list items keep their index.
Host memory: the whole tree, plus the copy `save` takes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._checkpointer import save
from ._storage import open_storage
from .errors import CheckpointError, CheckpointNotFoundError

_ITEM_MARKERS = ("_METADATA", "manifest.ocdbt")


def import_orbax(src: Any, dest: Any, *, force: bool = False) -> tuple[int, int]:
    """Convert the Orbax PyTree checkpoint `src` into an asyncckpt checkpoint at `dest`.

    `src` is an Orbax item directory (holding `_METADATA`), or a step directory of an Orbax
    `CheckpointManager` holding exactly one item (e.g. `<root>/<step>/default`). Names, dtypes
    (bfloat16 too) and values are kept; arrays come back unsharded. Returns (arrays, bytes).
    Needs orbax-checkpoint (`pip install 'asyncckpt[orbax]'`).
    """
    try:
        import jax
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise CheckpointError(
            f"importing an Orbax checkpoint needs orbax-checkpoint ({e}); "
            "install it with `pip install 'asyncckpt[orbax]'`"
        ) from None
    item = _item_dir(os.fspath(src))
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
    leaves = jax.tree.leaves(tree)
    save(dest, tree, metadata={"imported_from": item, "format": "orbax"}, force=force)
    return len(leaves), sum(int(np.asarray(x).nbytes) for x in leaves)


def _item_dir(path: str) -> str:
    src = open_storage(path).local_path
    if src is None:
        raise CheckpointError(
            f"cannot import {path}: importing Orbax checkpoints from object "
            "stores is not supported; copy it to disk first"
        )
    if not os.path.isdir(src):
        raise CheckpointNotFoundError(f"no Orbax checkpoint at {src}: not a directory")
    if any(os.path.exists(os.path.join(src, m)) for m in _ITEM_MARKERS):
        return src
    items = sorted(
        e.path
        for e in os.scandir(src)
        if e.is_dir() and any(os.path.exists(os.path.join(e.path, m)) for m in _ITEM_MARKERS)
    )
    if len(items) == 1:
        return items[0]
    if items:
        raise CheckpointError(
            f"{src} holds several Orbax items ({', '.join(items)}); import one of them"
        )
    raise CheckpointNotFoundError(
        f"{src} is not an Orbax PyTree checkpoint: it has no _METADATA, and no item directory "
        "(like `default/`) with one"
    )
