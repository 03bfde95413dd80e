"""Blocking I/O of one checkpoint on a local (or network-mounted) file system.

Plain functions over paths, called from worker threads; no threads of their own. An object-store
URL (`s3://...`) instead of a path goes to `_remote`, whose objects hold the same bytes. Chunks are
written with one `writev` (data + 4-byte crc32c) straight from the snapshot buffer and read with
one `preadv` straight into the destination buffer, so the bulk bytes cross no Python object.
Durability comes from one `syncfs` of the file system after all files are written (Linux), which
is much cheaper than an `fsync` per file, and an `fsync` of the parent after the commit rename.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import shutil
import stat
import sys
import threading
import uuid
import weakref

import crc32c as _crc32c
import numpy as np

from . import _format, _remote
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)

_O_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_MAX_IO = 1 << 30  # bytes per syscall; Linux caps one write at ~2 GiB
_libc = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


_MADV_NOHUGEPAGE = 15


def refuse_huge_pages(array: np.ndarray) -> None:
    """Ask the kernel to back the whole pages inside `array` with small pages (Linux)."""
    if _libc is None:
        return
    page = mmap.PAGESIZE
    start = -(-array.ctypes.data // page) * page
    end = (array.ctypes.data + array.nbytes) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_NOHUGEPAGE)


def crc32c(buf: memoryview) -> int:
    return _crc32c.crc32c(buf)


_IOV_MAX = 1024  # buffers per readv/writev call (Linux IOV_MAX)


def _next_batch(pending: list[memoryview]) -> list[memoryview]:
    """The first buffers of `pending`, at most _IOV_MAX of them and _MAX_IO bytes."""
    batch, size = [], 0
    for b in pending[:_IOV_MAX]:
        if size >= _MAX_IO:
            break
        batch.append(b[: _MAX_IO - size] if size + b.nbytes > _MAX_IO else b)
        size += batch[-1].nbytes
    return batch


def _advance(pending: list[memoryview], done: int) -> None:
    while pending and done >= pending[0].nbytes:
        done -= pending[0].nbytes
        pending.pop(0)
    if done:
        pending[0] = pending[0][done:]


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    pending = [b for b in buffers if b.nbytes]
    while pending:
        _advance(pending, os.writev(fd, _next_batch(pending)))


def _read_all(fd: int, buffers: list[memoryview], offset: int, path: str, where: str) -> None:
    """Fill `buffers` from `offset` on; the file must hold that many bytes."""
    pending = [b for b in buffers if b.nbytes]
    while pending:
        n = os.preadv(fd, _next_batch(pending), offset)
        if n <= 0:
            raise CorruptCheckpointError(f"{where}: chunk file {path} shrank while reading")
        offset += n
        _advance(pending, n)


def write_file(path: str, *buffers: memoryview | bytes, fsync: bool = False) -> None:
    """Create or replace `path` with the concatenation of `buffers`."""
    if _remote.is_url(path):
        return _remote.put(path, *buffers)
    fd = os.open(path, _O_WRITE, 0o644)
    try:
        _write_all(fd, [memoryview(b).cast("B") for b in buffers])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _bytes_view(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array (any dtype, bfloat16 too) without a copy."""
    return memoryview(a.reshape(-1).view(np.uint8))


def write_chunk(path: str, data: np.ndarray) -> None:
    """Write one chunk: its bytes, then their crc32c (the Zarr `crc32c` codec, little endian)."""
    view = _bytes_view(data)
    write_file(path, view, crc32c(view).to_bytes(4, "little"))


def _missing(path: str, where: str) -> IncompleteCheckpointError:
    return IncompleteCheckpointError(
        f"{where}: chunk file {path} is missing; the checkpoint is incomplete")


def _wrong_size(path: str, size: int, expected: int, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: chunk file {path} has {size} bytes, expected {expected} "
        "(truncated or overwritten)")


def _open(path: str, where: str) -> int:
    """Open a file of a checkpoint for reading; a symbolic link is refused (`O_NOFOLLOW`)."""
    try:
        return os.open(path, _O_READ)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link(path, where) from None
        raise


def _open_chunk(path: str, sizes: tuple[int, ...], where: str) -> tuple[int, int]:
    """Open a chunk file that must have one of `sizes` bytes: (descriptor, size)."""
    try:
        fd = _open(path, where)
    except FileNotFoundError:
        raise _missing(path, where) from None
    size = os.fstat(fd).st_size
    if size not in sizes:
        os.close(fd)
        raise _wrong_size(path, size, sizes[0], where)
    return fd, size


def _get(path: str, where: str, expected: int | None = None, **request: int) -> np.ndarray:
    """An object (or part of one) of an object-store checkpoint, of `expected` bytes."""
    try:
        data = _remote.get(path, **request)
    except FileNotFoundError:
        raise _missing(path, where) from None
    if expected is not None and data.nbytes != expected:
        raise _wrong_size(path, data.nbytes, expected, where)
    return data


def _link(path: str, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: {path} is a symbolic link; asyncckpt reads nothing outside a checkpoint, so "
        "a checkpoint must hold its files themselves (copy it with links resolved)")


def check_no_links(root: str, name: str, where: str, seen: set[str]) -> None:
    """Refuse a variable whose directory inside the checkpoint `root` is, or passes through, a
    symbolic link (which could point anywhere). `seen`: directories already checked."""
    if _remote.is_url(root):
        return
    path = root
    for part in name.split("/"):
        path = os.path.join(path, part)
        if path in seen:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # the read reports what is missing
        if stat.S_ISLNK(st.st_mode):
            raise _link(path, where)
        seen.add(path)


def read_chunk_into(path: str, out: np.ndarray, where: str) -> None:
    """Fill the C-contiguous array `out` from a chunk file and verify its checksum and size."""
    view = _bytes_view(out)
    crc = bytearray(4)
    if _remote.is_url(path):
        data = _get(path, where, view.nbytes + 4)
        np.frombuffer(view, np.uint8)[:] = data[:-4]
        crc[:] = data[-4:].tobytes()
    else:
        fd, _ = _open_chunk(path, (view.nbytes + 4,), where)
        try:
            _read_all(fd, [view, memoryview(crc)], 0, path, where)
        finally:
            os.close(fd)
    if crc32c(view) != int.from_bytes(crc, "little"):
        raise CorruptCheckpointError(f"{where}: checksum mismatch in chunk file {path}")


# A banded chunk (Zarr `sharding_indexed` with row bands as inner chunks) is
#   band 0 | crc 0 | pad | band 1 | crc 1 | pad | ... | index | index crc
# with the index holding (offset, nbytes) as 2 x uint64 per band. Band i starts at i * stride.
# When a band is a whole number of 4 KiB pages, stride is band + 4 rounded up to 4 KiB ("aligned":
# every band starts on a page, so a restore can map the bands next to each other in memory instead
# of copying them); otherwise stride is band + 4 and there is no padding ("packed", also what
# asyncckpt wrote before aligned bands). The file size tells the two apart.

BAND_ALIGN = 4096


def band_stride(band_nbytes: int) -> int:
    """The distance between the starts of two bands in the files asyncckpt writes."""
    if band_nbytes % BAND_ALIGN:
        return band_nbytes + 4
    return -(-(band_nbytes + 4) // BAND_ALIGN) * BAND_ALIGN


def _band_index(nbands: int, band_nbytes: int, stride: int) -> bytes:
    index = np.empty((nbands, 2), "<u8")
    index[:, 0] = np.arange(nbands, dtype=np.uint64) * stride
    index[:, 1] = band_nbytes + 4
    return index.tobytes()


def _strides(band_nbytes: int) -> tuple[int, ...]:
    """The strides a reader accepts: the one asyncckpt writes now, and the packed one."""
    return tuple(dict.fromkeys((band_stride(band_nbytes), band_nbytes + 4)))


def _stride_of_size(size: int, nbytes: int, band_nbytes: int, path: str, where: str) -> int:
    """The stride of a banded chunk file of `size` bytes (it must be one of the known layouts)."""
    nbands = nbytes // band_nbytes
    for stride in _strides(band_nbytes):
        if size == nbands * stride + 16 * nbands + 4:
            return stride
    raise _wrong_size(path, size, chunk_file_sizes(nbytes, band_nbytes)[0], where)


def write_banded_chunk(path: str, data: np.ndarray, band_nbytes: int) -> None:
    view = _bytes_view(data)
    stride = band_stride(band_nbytes)
    pad = bytes(stride - band_nbytes - 4)
    buffers: list[memoryview | bytes] = []
    for start in range(0, view.nbytes, band_nbytes):
        band = view[start : start + band_nbytes]
        buffers += [band, crc32c(band).to_bytes(4, "little"), pad]
    index = _band_index(view.nbytes // band_nbytes, band_nbytes, stride)
    write_file(path, *buffers, index, crc32c(memoryview(index)).to_bytes(4, "little"))


def _band_buffers(view: memoryview, crcs: bytearray, pads: bytearray, stride: int,
                  band_nbytes: int) -> list[memoryview]:
    """The buffers one `preadv` fills from consecutive bands: data, checksum, padding, ..."""
    buffers = []
    for j in range(view.nbytes // band_nbytes):
        buffers += [view[j * band_nbytes : (j + 1) * band_nbytes],
                    memoryview(crcs)[4 * j : 4 * j + 4]]
        if stride > band_nbytes + 4 and (j + 1) * band_nbytes < view.nbytes:
            buffers.append(memoryview(pads))
    return buffers


def read_bands_into(path: str, out: np.ndarray, first: int, nbands: int, band_nbytes: int,
                    where: str) -> None:
    """Fill the C-contiguous `out` with bands `first`, `first + 1`, ... of a banded chunk file
    of `nbands` bands, verifying each band's checksum and the shard index."""
    view = _bytes_view(out)
    count = view.nbytes // band_nbytes
    index_size = 16 * nbands + 4
    crcs = bytearray(4 * count)
    index = bytearray(index_size)
    if _remote.is_url(path):  # the index first (as a suffix): it says where the bands are
        index[:] = _get(path, where, index_size, suffix=index_size).tobytes()
        try:
            stride = _check_index(memoryview(index), nbands, band_nbytes, path, where)
        except CorruptCheckpointError:  # say so if the object is simply too short or long
            _stride_of_size(_remote.size(path), nbands * band_nbytes, band_nbytes, path, where)
            raise
        pads = bytearray(stride - band_nbytes - 4)
        buffers = _band_buffers(view, crcs, pads, stride, band_nbytes)
        start = first * stride
        length = sum(b.nbytes for b in buffers)
        data = _get(path, where, length, start=start, end=start + length)
        offset = 0
        for b in buffers:
            np.frombuffer(b, np.uint8)[:] = data[offset : offset + b.nbytes]
            offset += b.nbytes
    else:
        fd, size = _open_chunk(path, chunk_file_sizes(nbands * band_nbytes, band_nbytes), where)
        try:
            stride = _stride_of_size(size, nbands * band_nbytes, band_nbytes, path, where)
            pads = bytearray(stride - band_nbytes - 4)
            _read_all(fd, _band_buffers(view, crcs, pads, stride, band_nbytes), first * stride,
                      path, where)
            _read_all(fd, [memoryview(index)], nbands * stride, path, where)
        finally:
            os.close(fd)
        _check_index(memoryview(index), nbands, band_nbytes, path, where, stride)
    for j in range(count):
        _check_band(view[j * band_nbytes : (j + 1) * band_nbytes], crcs[4 * j : 4 * j + 4],
                    first + j, path, where)


def _check_index(index: memoryview, nbands: int, band_nbytes: int, path: str, where: str,
                 stride: int | None = None) -> int:
    """Check a shard index (and its checksum) against the layouts asyncckpt reads; its stride."""
    body = bytes(index[:-4])
    if crc32c(memoryview(body)) == int.from_bytes(index[-4:], "little"):
        for s in _strides(band_nbytes) if stride is None else (stride,):
            if body == _band_index(nbands, band_nbytes, s):
                return s
    raise CorruptCheckpointError(f"{where}: the shard index of chunk file {path} is damaged")


def _check_band(band: memoryview, crc: bytes | bytearray | memoryview, number: int, path: str,
                where: str) -> None:
    if crc32c(band) != int.from_bytes(crc, "little"):
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch in band {number} of chunk file {path}")


def chunk_file_sizes(nbytes: int, band_nbytes: int | None) -> tuple[int, ...]:
    """Every size a readable chunk file holding `nbytes` of data may have; the first is the
    layout asyncckpt writes now."""
    if band_nbytes is None:
        return (nbytes + 4,)
    nbands = nbytes // band_nbytes
    return tuple(nbands * s + 16 * nbands + 4 for s in _strides(band_nbytes))


def check_chunk_file(data: memoryview, nbytes: int, band_nbytes: int | None, path: str,
                     where: str) -> None:
    """Verify the size and every checksum of a whole chunk file's bytes, as read back."""
    if band_nbytes is None:
        if data.nbytes != nbytes + 4:
            raise _wrong_size(path, data.nbytes, nbytes + 4, where)
        if crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
            raise CorruptCheckpointError(f"{where}: checksum mismatch in chunk file {path}")
        return
    stride = _stride_of_size(data.nbytes, nbytes, band_nbytes, path, where)
    nbands = nbytes // band_nbytes
    _check_index(data[nbands * stride :], nbands, band_nbytes, path, where, stride)
    for j in range(nbands):
        start = j * stride
        _check_band(data[start : start + band_nbytes],
                    data[start + band_nbytes : start + band_nbytes + 4], j, path, where)


# ---------------------------------------------------------------------------------------------
# Restoring by mapping: a chunk's pages are mapped copy-on-write instead of copied


_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10  # Linux
if _libc is not None:
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_long]


class _MappingBudget:
    """Counts the mappings restored arrays hold, so that a process stays far below the kernel's
    limit on mappings (`vm.max_map_count`, 65530 by default): beyond a quarter of it, chunks are
    read instead of mapped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live = 0
        self._limit: int | None = None

    def take(self, n: int) -> bool:
        with self._lock:
            if self._limit is None:
                try:
                    with open("/proc/sys/vm/max_map_count") as f:
                        self._limit = int(f.read()) // 4
                except (OSError, ValueError):
                    self._limit = 16384
            if self._live + n > self._limit:
                return False
            self._live += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._live -= n


_mappings = _MappingBudget()


def map_chunk(path: str, nbytes: int, band_nbytes: int | None, where: str) -> np.ndarray | None:
    """The `nbytes` of data of a local chunk file as a private copy-on-write mapping of its pages
    (a uint8 array), every checksum verified; None where the file cannot be mapped (a packed
    banded chunk, a file system without mmap, too many mappings): the caller reads it instead.

    Reading a chunk copies it from the page cache into fresh memory, and on a VM filling fresh
    memory costs more than the copy; a mapping does neither (the pages are the page cache's
    until someone writes to them). The array keeps the mapping; it goes with the array."""
    if _libc is None or _remote.is_url(path) or nbytes == 0:
        return None
    fd, size = _open_chunk(path, chunk_file_sizes(nbytes, band_nbytes), where)
    try:
        if band_nbytes is None:
            return _map_plain(fd, nbytes, path, where)
        stride = _stride_of_size(size, nbytes, band_nbytes, path, where)
        if band_nbytes % mmap.ALLOCATIONGRANULARITY or stride % mmap.ALLOCATIONGRANULARITY:
            return None  # packed bands, or pages larger than the 4 KiB bands are aligned to
        return _map_bands(fd, nbytes, band_nbytes, stride, path, where)
    finally:
        os.close(fd)


def _new_mapping(n: int, fd: int, length: int) -> mmap.mmap | None:
    """A private writable mapping of `length` bytes (of `fd`, or anonymous when `fd` is -1)
    counted as `n` mappings, or None."""
    if not _mappings.take(n):
        return None
    try:
        m = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE | (mmap.MAP_ANONYMOUS if fd < 0 else 0),
                      prot=_PROT_RW)
    except (OSError, ValueError):
        _mappings.give(n)
        return None
    weakref.finalize(m, _mappings.give, n)
    return m


def _map_plain(fd: int, nbytes: int, path: str, where: str) -> np.ndarray | None:
    m = _new_mapping(1, fd, nbytes)
    if m is None:
        return None
    m.madvise(mmap.MADV_WILLNEED)  # from disk: read ahead the whole chunk, not page by page
    data = np.frombuffer(m, np.uint8)
    if crc32c(data) != int.from_bytes(os.pread(fd, 4, nbytes), "little"):
        raise CorruptCheckpointError(f"{where}: checksum mismatch in chunk file {path}")
    return data


def _map_bands(fd: int, nbytes: int, band_nbytes: int, stride: int, path: str,
               where: str) -> np.ndarray | None:
    """Map each band of an aligned banded chunk file over its place in one reserved range."""
    nbands = nbytes // band_nbytes
    m = _new_mapping(nbands + 1, -1, nbytes)
    if m is None:
        return None
    holder = (ctypes.c_char * nbytes).from_buffer(m)
    base = ctypes.addressof(holder)
    del holder
    for j in range(nbands):
        want = base + j * band_nbytes
        got = _libc.mmap(want, band_nbytes, _PROT_RW, mmap.MAP_PRIVATE | _MAP_FIXED, fd,
                         j * stride)
        if got != want:
            return None  # the reserved range, with what was mapped over it, goes with `m`
    m.madvise(mmap.MADV_WILLNEED)
    data = np.frombuffer(m, np.uint8)
    index_size = 16 * nbands + 4
    _check_index(memoryview(os.pread(fd, index_size, nbands * stride)), nbands, band_nbytes,
                 path, where, stride)
    for j in range(nbands):
        _check_band(memoryview(data[j * band_nbytes : (j + 1) * band_nbytes]),
                    os.pread(fd, 4, j * stride + band_nbytes), j, path, where)
    return data


def read_file(path: str, sizes: tuple[int, ...], where: str) -> memoryview:
    """The whole of a chunk file (or object) that must hold one of `sizes` bytes."""
    if _remote.is_url(path):
        data = _get(path, where)
        if data.nbytes not in sizes:
            raise _wrong_size(path, data.nbytes, sizes[0], where)
        return memoryview(data).cast("B")
    fd, size = _open_chunk(path, sizes, where)
    try:
        out = bytearray(size)
        _read_all(fd, [memoryview(out)], 0, path, where)
        return memoryview(out)
    finally:
        os.close(fd)


def read_small_file(path: str, limit: int) -> bytes:
    """Read a metadata document, refusing anything larger than `limit` bytes."""
    if _remote.is_url(path):
        data = _remote.get(path, start=0, end=limit + 1)
        if data.nbytes > limit:
            raise CorruptCheckpointError(
                f"{path} is {data.nbytes} bytes, more than the {limit} allowed")
        return data.tobytes()
    fd = _open(path, "refusing a metadata document")
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(f"{path} is {size} bytes, more than the {limit} allowed")
        chunks, total = [], 0
        while total <= limit and (data := os.read(fd, min(size + 1, _MAX_IO))):
            chunks.append(data)
            total += len(data)
        if total > limit:
            raise CorruptCheckpointError(f"{path} grew past the {limit} bytes allowed")
        return b"".join(chunks)
    finally:
        os.close(fd)


def exists(path: str) -> bool:
    """A file (or object) exists at `path`."""
    return _remote.exists(path) if _remote.is_url(path) else os.path.exists(path)


def identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a local directory, to tell whether it was replaced; None for object
    stores (there the root document tells) and for a path that does not exist."""
    if _remote.is_url(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def makedirs(path: str) -> None:
    if not _remote.is_url(path):  # an object store has no directories
        os.makedirs(path, exist_ok=True)


def mkdir(path: str) -> None:
    if not _remote.is_url(path):
        os.mkdir(path)


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: str) -> bool:
    """Mark `path` as the top of directory hierarchies (`chattr +T`, ext2/3/4), so the file
    system places each new subdirectory, and what is created inside it, in a block group of its
    own choosing instead of next to `path`.

    Why: ext4 without a journal never reuses an inode freed in the last 60 to 360 s, and every
    inode allocation scans past all such inodes of its block group again. A manager that
    deletes a step of thousands of files and then saves the next one next to it paid up to
    0.8 ms of kernel time per created file on this project's machine, against ~0.05 ms in a
    block group without such inodes (benchmarks/README.md). Elsewhere (other file systems, no
    permission) this does nothing and returns False."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        return False
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        flags = int.from_bytes(buf[:4], sys.byteorder)
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, (flags | _FS_TOPDIR_FL).to_bytes(4, sys.byteorder)
                        + bytes(4))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Commit: temporary directory -> durable -> atomic rename (local); in place, root document last
# (object stores)


def is_asyncckpt(path: str) -> bool:
    """Whether `path` holds a committed asyncckpt checkpoint (its root document says so)."""
    try:
        raw = read_small_file(os.path.join(path, _format.DOC), _format.MAX_ROOT_DOC_BYTES)
        attrs = _format.parse_json(raw, path, "root zarr.json").get("attributes", {})
        return isinstance(attrs, dict) and _format.ATTR in attrs
    except (OSError, AttributeError, CheckpointError):
        return False


def _check_replaceable(dest: str, names: list[str], replace: bool) -> None:
    """Refuse to write over what is at the prefix `dest` (its `names`) unless it is nothing, an
    uncommitted leftover of asyncckpt, or (with `replace`) an asyncckpt checkpoint."""
    if _format.DOC in names:
        if not is_asyncckpt(dest):
            raise CheckpointExistsError(
                f"cannot save to {dest}: it holds a Zarr hierarchy that is not an asyncckpt "
                "checkpoint; choose another path (asyncckpt never overwrites foreign data)")
        if not replace:
            raise CheckpointExistsError(
                f"a checkpoint already exists at {dest}; pass `force=True` to replace it "
                "(in an object store the old one is deleted before the new one is committed)")
    elif names and _remote.UNCOMMITTED not in names:
        raise CheckpointExistsError(
            f"cannot save to {dest}: it holds files or objects that are not a checkpoint; "
            "choose another path (asyncckpt never deletes data it did not write)")


def begin(dest: str, *, replace: bool) -> str:
    """Where a save to `dest` writes before `publish`: a fresh hidden sibling directory, or, in
    an object store, `dest` itself, marked uncommitted. There the leftovers of an interrupted
    save are removed first, and with `replace` an existing checkpoint too (an object store
    cannot swap prefixes, so its old checkpoint is gone before the new one is committed);
    anything else at `dest` is refused with `CheckpointExistsError`. On disk the same check
    happens when `publish` swaps the directories."""
    if _remote.is_url(dest):
        marker = _remote.join(dest, _remote.UNCOMMITTED)
        names = _remote.list_dir(dest)
        _check_replaceable(dest, names, replace)
        if names:
            _remote.put(marker, b"")
            _remote.delete(_remote.join(dest, _format.DOC))  # uncommitted from here on
            _remote.delete_prefix(dest)
        _remote.put(marker, b"")
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = temporary_sibling(dest)
    os.mkdir(tmp)
    return tmp


def temporary_sibling(dest: str) -> str:
    """A fresh hidden directory next to `dest` (same file system, so rename is atomic)."""
    parent, base = os.path.split(dest)
    return os.path.join(parent, f".{base}.asyncckpt-tmp-{uuid.uuid4().hex[:12]}")


def sync_tree(root: str) -> None:
    """Make every file and directory written under `root` durable.

    Linux: one `syncfs` of the file system holding `root` (one call instead of thousands of
    fsyncs). Elsewhere: `fsync` of every file and directory under `root`. In an object store
    every acknowledged write is durable already.
    """
    if _remote.is_url(root):
        return
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if _libc is not None and _libc.syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(d)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if _libc is None or not hasattr(_libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def publish(tmp: str, dest: str, *, replace: bool) -> None:
    """Make the finished directory `tmp` visible at `dest` in one step, durably.

    With `replace`, an existing checkpoint at `dest` is swapped out atomically where the OS allows
    (there is never a moment without a checkpoint at `dest`) and then deleted. In an object store
    the root document written last committed the checkpoint: only the marker goes.
    """
    if _remote.is_url(dest):
        try:
            _remote.delete(_remote.join(dest, _remote.UNCOMMITTED))
        except OSError:
            pass  # committed all the same; the marker is ignored where a root document exists
        return
    parent = os.path.dirname(dest)
    if replace and os.path.isdir(dest) and os.listdir(dest):
        _check_replaceable(dest, os.listdir(dest), replace)  # what goes must be a checkpoint
    if replace and os.path.isdir(dest) and _exchange(tmp, dest):
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # `tmp` now holds the old checkpoint
        return
    if replace and os.path.isdir(dest):
        old = temporary_sibling(dest)
        os.rename(dest, old)
        os.rename(tmp, dest)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, dest)  # fails unless `dest` is absent or an empty directory
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise CheckpointExistsError(
                f"could not commit the checkpoint: {dest} already exists (it appeared while "
                "saving: two writers must not share a path; pass `force=True` to replace a "
                "checkpoint)") from e
        raise
    fsync_dir(parent)


def remove_tree(path: str) -> None:
    if _remote.is_url(path):
        try:
            _remote.delete_prefix(path)
        except OSError:
            pass  # still marked uncommitted: the next writer removes it
        return
    shutil.rmtree(path, ignore_errors=True)
