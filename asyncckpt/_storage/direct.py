"""Writing a file around the page cache (`O_DIRECT`), for `LocalStorage`'s large chunk files.

A buffered `write` copies every byte into the page cache, and the kernel then spends more CPU
allocating those pages, writing them back and reclaiming them. 1 GiB of 64 MiB chunk files on this
project's 2-core test machine: 0.43 CPU s and durable in 0.67 s buffered, 0.10 CPU s (most of it
the checksums) and 0.53 s with `O_DIRECT`; 1.01 s against 0.55 s beside two busy processes
(`benchmarks/direct_writes.py`; benchmarks/README.md, "Writes around the page cache").

`O_DIRECT` wants the memory address, the file offset and the length of each write to be
multiples of the device's block size: `ALIGN` (4 KiB) covers every common device. Buffers that are
aligned (the snapshot arena hands out 4 KiB-aligned slices for large chunks) go to the device as
they are; the bytes in between (a band's checksum and padding), and buffers that are not aligned
(arrays on CPU devices, which the snapshot holds as views of XLA's buffers, 64 bytes past a
page), are copied through an aligned bounce buffer, a piece at a time, and written when it is
full: one copy, still without the page cache's allocation and write-back. The last partial block
(the file's tail, e.g. the chunk's checksum) is written through the page cache, so the file has
exactly its size. Durability still comes from the save's `syncfs`, which also writes the files'
metadata.

A file system that refuses `O_DIRECT` (`EINVAL` on open or on a write) gets the buffered write.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

from .. import _format

ALIGN = 4096
MIN_BYTES = 1 << 20  # smaller files gain little and pay one synchronous device write each
_BOUNCE_BYTES = 4 << 20
"""Each writing thread's bounce buffer: every write of it is one synchronous device write, and
under a busy training loop the thread then waits its turn for a CPU again (1 GiB from memory 64
bytes past a page, checksums and hash taken on the copies: 0.25-0.27 CPU s per GB with 1 MiB,
0.18-0.21 with 4 MiB; `benchmarks/chunk_passes.py`)."""
MAX_IO = 1 << 30  # bytes per syscall; Linux caps one write at ~2 GiB
O_DIRECT: int = getattr(os, "O_DIRECT", 0)

_local = threading.local()


def _bounce() -> np.ndarray:
    """This thread's aligned bounce buffer (anonymous memory: page-aligned)."""
    buf = getattr(_local, "bounce", None)
    if buf is None:
        buf = _local.bounce = np.frombuffer(mmap.mmap(-1, _BOUNCE_BYTES), np.uint8)
    return buf


def writer(fd: int) -> _Writer | None:
    """A writer of the file open for writing as `fd`, from its start, switched to `O_DIRECT`
    (and back, for the tail); None, with nothing changed, when the file system refuses
    `O_DIRECT`: the caller writes the file its usual way."""
    if not O_DIRECT:
        return None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    return _Writer(fd)


def write(fd: int, buffers: Sequence[memoryview]) -> bool:
    """Write `buffers`, one after another, through `writer(fd)`; False, with nothing written,
    when the file system refuses `O_DIRECT`."""
    out = writer(fd)
    if out is None:
        return False
    for view in buffers:
        out.put(view)
    out.finish()
    return True


def _show(view: memoryview, seen: Callable[[memoryview], None] | None) -> None:
    if seen is not None:
        for piece in _format.pieces(view):
            seen(piece)


class _Writer:
    """Sequential writes into one file descriptor opened with `O_DIRECT`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0  # where the next write lands; a multiple of ALIGN while `direct`
        self.direct = True
        self.bounce = _bounce()
        self.fill = 0  # bytes waiting in the bounce buffer

    def put(self, view: memoryview, seen: Callable[[memoryview], None] | None = None) -> None:
        """Write `view` next. `seen`, if given, is called on each of its pieces in order (at most
        `_format.PIECE` bytes each) before they are written: on the bounce buffer's copy of a piece,
        while it is in the cache, for bytes that are copied."""
        n = view.nbytes
        if not n:
            return
        address = np.frombuffer(view, np.uint8).ctypes.data
        pos = 0
        while pos < n:
            if not self.direct:  # through the page cache from here on: no bounce needed
                self.finish()
                _show(view[pos:], seen)
                self._write(view[pos:])
                return
            if not self.fill and (address + pos) % ALIGN == 0 and n - pos >= ALIGN:
                size = min((n - pos) // ALIGN * ALIGN, MAX_IO)
                _show(view[pos : pos + size], seen)
                self._write(view[pos : pos + size])
                pos += size
                continue
            take = min(_format.PIECE, _BOUNCE_BYTES - self.fill, n - pos)
            part = np.frombuffer(view[pos : pos + take], np.uint8)
            self.bounce[self.fill : self.fill + take] = part
            if seen is not None:
                seen(memoryview(self.bounce[self.fill : self.fill + take]))  # type: ignore[arg-type]
            self.fill += take
            pos += take
            if self.fill == _BOUNCE_BYTES or (
                self.fill % ALIGN == 0 and (pos == n or (address + pos) % ALIGN == 0)
            ):  # full, or whole blocks: out, so the next aligned buffer goes direct
                self._write(memoryview(self.bounce[: self.fill]))  # type: ignore[arg-type]
                self.fill = 0

    def finish(self) -> None:
        """Write what the bounce buffer still holds: its whole blocks directly, the last partial
        block through the page cache."""
        whole = self.fill // ALIGN * ALIGN
        if whole:
            self._write(memoryview(self.bounce[:whole]))  # type: ignore[arg-type]
        if self.fill > whole:
            self._buffered()
            self._write(memoryview(self.bounce[whole : self.fill]))  # type: ignore[arg-type]
        self.fill = 0

    def _write(self, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            try:
                n = os.pwrite(self.fd, view[done:], self.offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # refused after all (an odd block size): the rest is buffered
                continue
            done += n
            self.offset += n
            if self.direct and n % ALIGN:  # a short write: later offsets are no longer aligned
                self._buffered()

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~O_DIRECT)
            self.direct = False
