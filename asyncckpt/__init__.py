"""asyncckpt: asynchronous checkpointing of JAX pytrees into plain Zarr v3.

The public API is stated once, in `__init__.pyi`; everything else is private. Each name is
imported from its module on first use (scientific-python's SPEC 1, `lazy_loader`), so `import
asyncckpt` does no work, and zarr-python loading asyncckpt's data types (`_zarr_dtypes`, through
entry points) does not import JAX.
"""

from typing import Any

import lazy_loader as _lazy

_getattr, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
__all__ = [*__all__, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # one version: the installed package's metadata
        from importlib.metadata import version

        return version("asyncckpt")
    return _getattr(name)
