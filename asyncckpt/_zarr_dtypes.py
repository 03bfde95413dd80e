"""zarr-python data types for the ml_dtypes types (bfloat16, float8_*, int4 ...).

zarr-python has no such data types, so a plain `zarr.open_group` of a checkpoint with a bfloat16
leaf would fail. This module defines one `ZDType` per type, under the names TensorStore writes,
and zarr-python finds them without anyone importing asyncckpt, through the package's entry
points (pyproject.toml):

- `zarr.data_type`: one entry per class below. zarr-python loads these from 3.4.1 on (earlier
  versions collect them but never load them).
- `zarr.buffer`: `Buffer`, which is zarr's own default CPU buffer class, unchanged. zarr-python
  (3.1 on) loads buffer entry points before its first read, so importing this module for it
  registers the data types with every zarr-python version asyncckpt supports. Registering the
  same class under its own name changes nothing in zarr.

So that a zarr-only process pays little for it, this module imports only numpy, ml_dtypes, zarr
and `asyncckpt._dtypes` (the package itself loads its API lazily: no JAX is imported), and it
must never fail to import: zarr would fail every read in this environment if it did.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import zarr.errors
from zarr.core.buffer.cpu import Buffer as Buffer
from zarr.core.dtype.common import HasEndianness, HasItemSize
from zarr.dtype import ZDType, data_type_registry

from ._dtypes import ML_DTYPE_NAMES, ml_dtype

# where zarr keeps the error a data type raises for "not me": zarr.errors from 3.4 on (importing
# it from zarr.dtype is deprecated there), zarr.dtype before
DataTypeValidationError: type[ValueError] = (
    getattr(zarr.errors, "DataTypeValidationError", None)
    or importlib.import_module("zarr.dtype").DataTypeValidationError
)


class _MLType(ZDType, HasItemSize):
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

    def to_json(self, zarr_format: Any) -> Any:
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

    def from_json_scalar(self, data: Any, *, zarr_format: Any) -> Any:
        if isinstance(data, str) and data.startswith("0x"):
            raw = int(data, 16).to_bytes(self.item_size, "little")
            return np.frombuffer(raw, self._np_dtype)[0]
        return self.cast_scalar(float(data) if isinstance(data, str) else data)

    def to_json_scalar(self, data: object, *, zarr_format: Any) -> Any:
        value = self.cast_scalar(data)
        if self._np_dtype.kind in "iu":
            return int(value)
        as_float = float(value)
        return as_float if math.isfinite(as_float) else str(as_float)

    @property
    def item_size(self) -> int:
        return self._np_dtype.itemsize


def _make(name: str) -> type[_MLType]:
    dtype = ml_dtype(name)
    # the bytes codec wants an endianness for multi-byte types
    bases = (_MLType, HasEndianness) if dtype.itemsize > 1 else (_MLType,)
    cls = type(
        name,
        bases,
        {"_zarr_v3_name": name, "_np_dtype": dtype, "__module__": __name__, "__qualname__": name},
    )
    return dataclass(frozen=True, kw_only=True)(cls)


DATA_TYPES: dict[str, type[_MLType]] = {name: _make(name) for name in ML_DTYPE_NAMES}
"""The zarr data type class of each ml_dtypes type, by Zarr name; each is also an attribute of
this module under that name (what the `zarr.data_type` entry points name)."""
globals().update(DATA_TYPES)


def register() -> None:
    """Add the data types to zarr-python's registry (idempotent)."""
    for name, cls in DATA_TYPES.items():
        if data_type_registry.contents.get(name) is not cls:
            data_type_registry.register(name, cls)


register()
