"""The few C library calls Python's `os` and `mmap` lack (Linux): `syncfs`, `renameat2`,
`madvise` of arbitrary memory, `mmap` at a fixed address.

The library is the process's own C library (`dlopen(NULL)`), opened on first use: importing
this module runs nothing (`ctypes.util.find_library` would run `ldconfig -p` in a subprocess).
Elsewhere than Linux every call reports itself unavailable and callers take their portable path.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import sys
from typing import Any

import numpy as np

MAP_FIXED = 0x10
MADV_NOHUGEPAGE = 15
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


@functools.cache
def _libc() -> Any:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    return libc


def available() -> bool:
    return _libc() is not None


def syncfs(fd: int) -> bool:
    """Flush the whole file system holding `fd` to stable storage; False if unavailable."""
    libc = _libc()
    return libc is not None and libc.syncfs(fd) == 0


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (`renameat2(RENAME_EXCHANGE)`); False if unsupported."""
    libc = _libc()
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def refuse_huge_pages(array: np.ndarray) -> None:
    """Ask the kernel to back the whole pages inside `array` with small pages."""
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    start = -(-array.ctypes.data // page) * page
    end = (array.ctypes.data + array.nbytes) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_NOHUGEPAGE)


def map_fixed(address: int, length: int, fd: int, offset: int) -> bool:
    """Map `length` bytes of `fd` from `offset`, private and writable, exactly at `address`
    (over a mapping the caller owns)."""
    libc = _libc()
    if libc is None:
        return False
    got = libc.mmap(address, length, PROT_RW, mmap.MAP_PRIVATE | MAP_FIXED, fd, offset)
    return bool(got == address)
