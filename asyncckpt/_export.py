"""Writing the arrays of a checkpoint to a `.safetensors` or `.npz` file for other tools.

Arrays are keyed by their variable names (`params/dense/kernel`). safetensors holds bfloat16 and
float8 as they are; `.npz` only holds NumPy's own dtypes, so those need `cast`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import numpy as np

from ._executor import Workers
from ._restore import read_arrays, read_root
from ._storage import Storage
from .errors import CheckpointError, UnsupportedTypeError

FORMATS = (".safetensors", ".npz")


def export(
    ckpt: Storage,
    out: str,
    names: list[str],
    workers: Workers,
    *,
    cast: np.dtype | None = None,
    max_inflight_bytes: int,
) -> int:
    """Write the variables `names` of the checkpoint `ckpt` to the local file `out`; return the
    bytes written. `cast`: convert floating-point arrays of another dtype to this one."""
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in FORMATS:
        raise CheckpointError(
            f"cannot export to {out}: the file name must end in {' or '.join(FORMATS)}"
        )
    info = read_root(ckpt)
    # typed PRNG keys go out as their raw key data (uint32)
    specs = [dataclasses.replace(info.arrays[n], prng_impl=None) for n in names]
    arrays = read_arrays(
        ckpt, [(s, None) for s in specs], workers, max_inflight_bytes=max_inflight_bytes
    )
    tensors: dict[str, np.ndarray] = {}
    for spec, value in zip(specs, arrays):
        value = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
        if cast is not None and _is_float(value.dtype) and value.dtype != cast:
            value = value.astype(cast)
        tensors[spec.name] = value
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if suffix == ".npz":
        _write_npz(out, tensors)
    else:
        _write_safetensors(out, tensors, {"source": ckpt.url})
    return sum(v.nbytes for v in tensors.values())


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def _write_npz(out: str, tensors: dict[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        if value.dtype.type.__module__.startswith("ml_dtypes") or value.dtype.kind == "V":
            raise UnsupportedTypeError(
                f"cannot export {name!r} ({value.dtype}) to {out}: .npz files only hold NumPy's "
                "own dtypes. Export to .safetensors instead, or cast, e.g. `--cast float32`"
            )
    tmp = out + ".partial.npz"
    np.savez(tmp, **tensors)  # type: ignore[arg-type]
    os.replace(tmp, out)


def _write_safetensors(out: str, tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    from safetensors import SafetensorError, TensorSpec, serialize_file

    specs = {}
    for name, value in tensors.items():
        if value.dtype.byteorder == ">":
            value = tensors[name] = value.astype(value.dtype.newbyteorder("<"))
        specs[name] = TensorSpec(
            dtype=value.dtype.name,
            shape=list(value.shape),
            data_ptr=value.ctypes.data,
            data_len=value.nbytes,
        )
    tmp = out + ".partial"
    try:
        serialize_file(specs, tmp, metadata=metadata)  # `tensors` keeps the data alive
    except (SafetensorError, ValueError, TypeError) as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise UnsupportedTypeError(f"cannot export to {out}: {e}") from None
    os.replace(tmp, out)
