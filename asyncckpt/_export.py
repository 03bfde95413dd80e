"""Writing the arrays of a checkpoint to a `.safetensors` or `.npz` file for other tools.

Arrays are keyed by their variable names (`params/dense/kernel`). safetensors holds bfloat16 and
float8 as they are; `.npz` only holds NumPy's own dtypes, so those need `cast`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import numpy as np

from . import _safetensors
from ._executor import Workers
from ._format import ArraySpec
from ._restore import groups_by_size, read_arrays, read_root
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
    bytes written. `cast`: convert floating-point arrays of another dtype to this one.

    A `.safetensors` file is written streamed: its header first (every shape and dtype is known
    from the checkpoint's metadata), then the variables in groups of at most
    `max_inflight_bytes`, each group read, written at its offsets and dropped. An `.npz` file
    (numpy's writer) holds every array in memory at once."""
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in FORMATS:
        raise CheckpointError(
            f"cannot export to {out}: the file name must end in {' or '.join(FORMATS)}"
        )
    info = read_root(ckpt)
    # typed PRNG keys go out as their raw key data (uint32)
    specs = [dataclasses.replace(info.arrays[n], prng_impl=None) for n in names]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def read(group: list[ArraySpec]) -> list[np.ndarray]:
        arrays = read_arrays(
            ckpt, [(s, None) for s in group], workers, max_inflight_bytes=max_inflight_bytes
        )
        return [_converted(value, cast) for value in arrays]

    if suffix == ".npz":
        tensors = dict(zip(names, read(specs)))
        _write_npz(out, tensors)
        return sum(v.nbytes for v in tensors.values())
    return _write_safetensors(out, specs, read, cast, max_inflight_bytes, {"source": ckpt.url})


def _converted(value: np.ndarray, cast: np.dtype | None) -> np.ndarray:
    """`value` in its `_out_dtype`, C-contiguous (0-d arrays stay 0-d)."""
    value = np.require(value, requirements="C")
    dtype = _out_dtype(value.dtype, cast)
    return value if value.dtype == dtype else value.astype(dtype)


def _out_dtype(dtype: np.dtype, cast: np.dtype | None) -> np.dtype:
    """What a variable of `dtype` is exported as: `cast` for floats, little-endian always."""
    dtype = cast if cast is not None and _is_float(dtype) else dtype
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


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


def _write_safetensors(
    out: str,
    specs: list[ArraySpec],
    read: Callable[[list[ArraySpec]], list[np.ndarray]],
    cast: np.dtype | None,
    limit: int,
    metadata: dict[str, str],
) -> int:
    entries = [(s.name, _out_dtype(s.dtype, cast), s.shape) for s in specs]
    try:
        header, offsets = _safetensors.header_for(entries, metadata)
    except TypeError as e:
        raise UnsupportedTypeError(f"cannot export to {out}: {e}") from None
    tmp = out + ".partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        written = 0
        for group in groups_by_size(specs, lambda s: s.nbytes, limit):
            for spec, value in zip(group, read(group)):
                _pwrite_all(fd, memoryview(value.reshape(-1).view(np.uint8)), offsets[spec.name])  # type: ignore[arg-type]
                written += value.nbytes
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.close(fd)
    os.replace(tmp, out)
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data[: 1 << 30], offset)
        data, offset = data[n:], offset + n
