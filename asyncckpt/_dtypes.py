"""NumPy / ml_dtypes data types <-> Zarr v3 data type names.

The standard Zarr v3 types (bool, int*, uint*, float16/32/64, complex64/128) keep their spec
names. The machine-learning types of ml_dtypes (bfloat16, the float8 variants, int4 ...) use the
names TensorStore's `zarr3` driver writes, one element per byte for the sub-byte types, exactly as
TensorStore stores them. zarr-python knows none of them: `_zarr_dtypes` teaches it (through entry
points, so plain zarr-python readers need not import asyncckpt).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from .errors import CorruptCheckpointError, UnsupportedTypeError

_STANDARD_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)

# ml_dtypes names (all present since ml_dtypes 0.5); TensorStore reads all of these but uint4,
# uint2 and the float6 types.
_ML_NAMES = (
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
)


def _build_tables() -> tuple[dict[str, np.dtype], dict[np.dtype, str]]:
    by_name = {n: np.dtype(n) for n in _STANDARD_NAMES}
    by_name.update({n: np.dtype(getattr(ml_dtypes, n)) for n in _ML_NAMES})
    return by_name, {dt: n for n, dt in by_name.items()}


_BY_NAME, _BY_DTYPE = _build_tables()
ML_DTYPE_NAMES = _ML_NAMES


def ml_dtype(name: str) -> np.dtype:
    """The NumPy dtype of one of the `ML_DTYPE_NAMES`."""
    return _BY_NAME[name]


def is_supported(dtype: np.dtype) -> bool:
    return dtype in _BY_DTYPE


def zarr_name(dtype: np.dtype, *, where: str = "") -> str:
    """The Zarr v3 `data_type` name of a NumPy dtype; `UnsupportedTypeError` if there is none."""
    dtype = np.dtype(dtype)
    name = _BY_DTYPE.get(dtype.newbyteorder("=") if dtype.byteorder == "<" else dtype)
    if name is None:
        at = f" at {where!r}" if where else ""
        raise UnsupportedTypeError(
            f"cannot save an array of dtype {dtype}{at}: Zarr v3 has no data type for it. "
            f"Supported: {', '.join(_BY_NAME)}. Cast it (e.g. `x.astype(np.float64)`) first."
        )
    return name


def numpy_dtype(name: object, *, where: str) -> np.dtype:
    """The NumPy dtype of a Zarr v3 `data_type` name read from a checkpoint (untrusted input)."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise CorruptCheckpointError(
            f"{where}: unknown Zarr data type {name!r}; asyncckpt reads {', '.join(_BY_NAME)}"
        )
    return _BY_NAME[name]


def fill_value_json(dtype: np.dtype) -> Any:
    """The JSON fill value (zero) that Zarr v3 expects for `dtype`."""
    kind = np.dtype(dtype).kind
    if kind == "b":
        return False
    if kind == "c":
        return [0.0, 0.0]
    if kind in "iu":
        return 0
    return 0.0
