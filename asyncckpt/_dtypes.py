"""NumPy / ml_dtypes data types <-> Zarr v3 data type names.

The standard Zarr v3 types (bool, int*, uint*, float16/32/64, complex64/128) keep their spec
names. The machine-learning types of ml_dtypes (bfloat16, the float8 variants, int4 ...) use the
names TensorStore's `zarr3` driver writes, one element per byte for the sub-byte types, exactly as
TensorStore stores them. zarr-python 3.1 knows none of them, so `register_with_zarr()` adds them to
its data-type registry; `import asyncckpt` calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from .errors import CorruptCheckpointError, UnsupportedTypeError

_STANDARD_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)

# ml_dtypes names; TensorStore reads all of these but uint4, uint2 and the float6 types.
_ML_NAMES = (
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "float6_e2m3fn", "float6_e3m2fn", "int2", "int4", "uint2", "uint4",
)


def _build_tables() -> tuple[dict[str, np.dtype], dict[np.dtype, str]]:
    by_name = {n: np.dtype(n) for n in _STANDARD_NAMES}
    for n in _ML_NAMES:
        if hasattr(ml_dtypes, n):  # older ml_dtypes lack some of the newest types
            by_name[n] = np.dtype(getattr(ml_dtypes, n))
    return by_name, {dt: n for n, dt in by_name.items()}


_BY_NAME, _BY_DTYPE = _build_tables()
ML_DTYPE_NAMES = tuple(n for n in _ML_NAMES if n in _BY_NAME)


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


# ---------------------------------------------------------------------------------------------
# zarr-python registration


def _zdtype_classes() -> list[type]:
    from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize
    from zarr.core.dtype.wrapper import ZDType

    class _MLBase(ZDType, HasItemSize):  # type: ignore[misc, type-arg]
        """A Zarr data type wrapping one ml_dtypes type (scalars: the ml_dtypes scalar type)."""

        _zarr_v3_name: ClassVar[str]
        _np_dtype: ClassVar[np.dtype]

        @classmethod
        def from_native_dtype(cls, dtype: Any) -> Any:
            if isinstance(dtype, np.dtype) and dtype == cls._np_dtype:
                return cls()
            raise DataTypeValidationError(f"{dtype!r} is not {cls._zarr_v3_name}")

        def to_native_dtype(self) -> np.dtype:
            return self._np_dtype

        @classmethod
        def _from_json_v2(cls, data: Any) -> Any:
            raise DataTypeValidationError(f"{cls._zarr_v3_name} exists only in Zarr v3")

        @classmethod
        def _from_json_v3(cls, data: Any) -> Any:
            if data == cls._zarr_v3_name:
                return cls()
            raise DataTypeValidationError(f"{data!r} is not {cls._zarr_v3_name}")

        def to_json(self, zarr_format: int) -> Any:
            if zarr_format != 3:
                raise ValueError(f"{self._zarr_v3_name} exists only in Zarr v3")
            return self._zarr_v3_name

        def _check_scalar(self, data: object) -> bool:
            return isinstance(data, (int, float, np.generic, str))

        def cast_scalar(self, data: object) -> Any:
            if not self._check_scalar(data):
                raise TypeError(f"cannot convert {data!r} to {self._zarr_v3_name}")
            return np.asarray(data).astype(self._np_dtype)[()]

        def default_scalar(self) -> Any:
            return np.zeros((), self._np_dtype)[()]

        def from_json_scalar(self, data: Any, *, zarr_format: int) -> Any:
            if isinstance(data, str) and data.startswith("0x"):
                raw = int(data, 16).to_bytes(self.item_size, "little")
                return np.frombuffer(raw, self._np_dtype)[0]
            return self.cast_scalar(float(data) if isinstance(data, str) else data)

        def to_json_scalar(self, data: object, *, zarr_format: int) -> Any:
            value = self.cast_scalar(data)
            if self._np_dtype.kind in "iu":
                return int(value)
            as_float = float(value)
            return as_float if math.isfinite(as_float) else str(as_float)

        @property
        def item_size(self) -> int:
            return self._np_dtype.itemsize

    classes = []
    for name in ML_DTYPE_NAMES:
        dtype = _BY_NAME[name]
        bases: tuple[type, ...] = (_MLBase,)
        if dtype.itemsize > 1:  # the bytes codec wants an endianness for multi-byte types
            bases = (_MLBase, HasEndianness)
        cls = type(f"ML_{name}", bases, {"_zarr_v3_name": name, "_np_dtype": dtype})
        classes.append(dataclass(frozen=True, kw_only=True)(cls))
    return classes


def register_with_zarr() -> None:
    """Teach zarr-python the ml_dtypes data types (idempotent)."""
    from zarr.core.dtype import data_type_registry

    for cls in _zdtype_classes():
        if cls._zarr_v3_name not in data_type_registry.contents:
            data_type_registry.register(cls._zarr_v3_name, cls)
