"""`LocalStorage`: checkpoints on a local (or network-mounted) file system.

Chunks are written with one `writev` (data + 4-byte crc32c) straight from the snapshot buffer, or,
from 1 MiB on, around the page cache with `O_DIRECT` (direct.py), and read with one `preadv`
straight into the destination buffer, so the bulk bytes cross no Python object; a chunk that
is exactly one device's shard may be mapped copy-on-write instead of read. Durability comes
from one `syncfs` of the file system after all files are written (Linux), much cheaper than an
`fsync` per file, and an `fsync` of the parent after the commit rename. A save
writes into a hidden sibling directory and renames it into place; a deletion renames the
checkpoint to a hidden name first. A save may write over the files of a deleted step
(`begin_in`): creating a file costs ext4 several times what writing over one does; a file with
other links, or that anyone holds open or mapped, is replaced instead (`_open_to_write`).
Files of a checkpoint are opened without following symbolic links: a checkpoint from elsewhere
is untrusted input.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import shutil
import socket
import stat
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from .. import _format, _libc
from ..errors import CheckpointExistsError, CorruptCheckpointError, DirectoryLockedError
from . import direct
from .base import State, Storage, WriterLock, _check_bands

_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_OVER = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # None where there is no posix_fadvise
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_MAX_IO = direct.MAX_IO
_IOV_MAX = 1024  # buffers per readv/writev call (Linux IOV_MAX)
_HELD_MAX = 256
"""At most this many files a storage keeps open from `prefetch` for the reads that follow
(`_executor._run_ahead` prefetches 64 ahead); past it a prefetch closes its file."""


_direct_io: dict[str, bool] = {}  # directory -> direct_io, from configure_storage


def configure(path: str, direct_io: bool) -> None:
    """Whether large chunk files under `path` are written around the page cache
    (`asyncckpt.configure_storage`)."""
    _direct_io[os.path.abspath(path)] = bool(direct_io)


def direct_io(path: str) -> bool:
    """The setting of the closest configured directory above `path` (default: on)."""
    best, on = -1, True
    for place, value in _direct_io.items():
        if len(place) > best and (path == place or path.startswith(place.rstrip("/") + "/")):
            best, on = len(place), value
    return on


class LocalStorage(Storage):
    has_directories = True
    recycles = True

    def __init__(self, path: str) -> None:
        self.url = os.path.abspath(path)
        self._recycled = False  # a deleted step's files, written over (`begin_in`)
        self._held: dict[str, int] = {}  # path -> descriptor `prefetch` opened, for its read
        self._closes_held: weakref.finalize | None = None

    @property
    def local_path(self) -> str:
        return self.url

    def child(self, key: str) -> LocalStorage:
        return LocalStorage(os.path.join(self.url, key))

    # -- bytes -----------------------------------------------------------------------------------

    def read_small(self, key: str, limit: int) -> bytes:
        path = self.path(key)
        fd, size = self._open_file(path, "refusing a metadata document")
        try:
            if size > limit:
                raise CorruptCheckpointError(
                    f"{path} is {size} bytes, more than the {limit} allowed"
                )
            chunks, total = [], 0
            while total <= limit and (data := os.read(fd, min(max(size + 1, 1 << 16), _MAX_IO))):
                chunks.append(data)
                total += len(data)
            if total > limit:
                raise CorruptCheckpointError(f"{path} grew past the {limit} bytes allowed")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def write(self, key: str, *buffers: Any) -> None:
        """A file of `buffers` (`_open_to_write`: new, or written over in place); from 1 MiB on
        (large chunk files) around the page cache (direct.py), unless `configure_storage` said
        otherwise for this place."""
        path = f"{self.url}/{key}"
        views = [memoryview(b).cast("B") for b in buffers]
        nbytes = sum(v.nbytes for v in views)
        with self._writing(path, nbytes) as fd:
            if nbytes < direct.MIN_BYTES and len(views) <= _IOV_MAX:
                done = os.writev(fd, views)  # small files (most of them): one call
                if done < nbytes:
                    _write_all(fd, _after(views, done))
            elif not (direct_io(path) and direct.write(fd, views)):
                _write_all(fd, views)

    def _write_chunk_file(self, key: str, chunk: _format.ChunkFile, sums: _format.Sums) -> None:
        """A large chunk file around the page cache, its checksums and content hash taken on each
        piece of the data as it is copied to the device's alignment (`direct.writer`): one pass
        over the bytes instead of three."""
        path = f"{self.url}/{key}"
        nbytes = chunk.nbytes
        if nbytes < direct.MIN_BYTES or not direct_io(path):
            super()._write_chunk_file(key, chunk, sums)
            return
        with self._writing(path, nbytes) as fd:
            out = direct.writer(fd)
            if out is None:
                _write_all(fd, [memoryview(b) for b in chunk.buffers(sums)])
                return
            for part in chunk.parts:
                out.put(part, sums.update)
                out.put(memoryview(sums.crc_bytes() + chunk.gap))
            out.put(memoryview(chunk.trailer))
            out.finish()

    @contextlib.contextmanager
    def _writing(self, path: str, nbytes: int) -> Iterator[int]:
        """The file `path` open for writing (`_open_to_write`: new, or written over in place),
        cut to `nbytes` after the body's writes, closed at the end."""
        fd, held = _open_to_write(path, self._recycled)
        try:
            yield fd
            if held > nbytes:
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        os.remove(self.path(key))

    def get(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        suffix: int | None = None,
    ) -> np.ndarray:
        fd, size = self._open_file(self.path(key), "")
        try:
            lo = max(0, size - suffix) if suffix is not None else min(start or 0, size)
            hi = size if end is None or suffix is not None else min(end, size)
            out = np.empty(max(0, hi - lo), np.uint8)
            _read_all(fd, [memoryview(out)], lo, self.path(key), "")  # type: ignore[arg-type]
            return out
        finally:
            os.close(fd)

    def reuse_chunk(self, key: str, source: Storage, source_key: str) -> bool:
        """A hard link: one inode, freed when the last step that links it is deleted. In a
        recycled step (`begin_in`) the file there may be that inode already (both steps linked
        it from a third), or another, which goes (only this link of it)."""
        if not isinstance(source, LocalStorage):
            return False
        src, dest = source.path(source_key), self.path(key)
        try:
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode):  # never a link or anything odd
                return False
            try:
                os.link(src, dest, follow_symlinks=False)
            except FileExistsError:
                if os.path.samestat(st, os.lstat(dest)):
                    return True
                os.unlink(dest)
                os.link(src, dest, follow_symlinks=False)
        except OSError:
            return False
        return True

    def read_runs_into(self, key: str, runs: Sequence[tuple[int, memoryview]], where: str) -> None:
        path = self.path(key)
        fd, _ = self._open_file(path, where)
        try:
            for offset, buf in runs:
                _read_all(fd, [buf], offset, path, where)
        finally:
            os.close(fd)

    def size(self, key: str) -> int:
        return os.stat(self.path(key), follow_symlinks=False).st_size

    def kind(self) -> Literal["missing", "file", "directory"]:
        if os.path.isdir(self.url):
            return "directory"
        return "file" if os.path.lexists(self.url) else "missing"

    # -- chunk files -----------------------------------------------------------------------------

    def _open_file(self, path: str, where: str) -> tuple[int, int]:
        """`_open` of `path`, or the descriptor that `prefetch` opened for this read (one `open`
        and one `close` fewer a small chunk: 4000 of them read 9 ms sooner)."""
        fd = self._held.pop(path, None)
        if fd is None:
            return _open(path, where)
        return fd, _regular_size(fd, path, where)

    def _open_chunk(self, path: str, sizes: tuple[int, ...], where: str) -> tuple[int, int]:
        """Open the chunk file `path`, which must have one of `sizes` bytes: (descriptor,
        size)."""
        try:
            fd, size = self._open_file(path, where)
        except FileNotFoundError:
            raise _format.missing_chunk(path, where) from None
        if size not in sizes:
            os.close(fd)
            raise _format.wrong_size(path, size, sizes[0], where)
        return fd, size

    def read_chunk_into(self, key: str, out: np.ndarray, where: str) -> None:
        view = _format.bytes_view(out)
        crc = bytearray(_format.CRC_BYTES)
        path = f"{self.url}/{key}"
        fd, _ = self._open_chunk(path, (view.nbytes + _format.CRC_BYTES,), where)
        try:
            _read_all(fd, [view, memoryview(crc)], 0, path, where)
        finally:
            os.close(fd)
        _format.check_crc(view, crc, path, where)

    def read_bands_into(
        self, key: str, out: np.ndarray, first: int, nbands: int, band_nbytes: int, where: str
    ) -> None:
        path = f"{self.url}/{key}"
        view = _format.bytes_view(out)
        crcs = bytearray(_format.CRC_BYTES * (view.nbytes // band_nbytes))
        index = bytearray(_format.index_nbytes(nbands))
        nbytes = nbands * band_nbytes
        fd, size = self._open_chunk(path, _format.chunk_file_sizes(nbytes, band_nbytes), where)
        try:
            stride = _format.stride_of_size(size, nbytes, band_nbytes, path, where)
            pads = bytearray(stride - band_nbytes - _format.CRC_BYTES)
            _read_all(
                fd,
                _format.band_read_buffers(view, crcs, pads, stride, band_nbytes),
                first * stride,
                path,
                where,
            )
            _read_all(fd, [memoryview(index)], nbands * stride, path, where)
        finally:
            os.close(fd)
        _format.check_index(memoryview(index), nbands, band_nbytes, path, where, stride)
        _check_bands(view, crcs, first, band_nbytes, path, where)

    def read_chunk_file(self, key: str, sizes: tuple[int, ...], where: str) -> memoryview:
        path = f"{self.url}/{key}"
        fd, size = self._open_chunk(path, sizes, where)
        try:
            out = bytearray(size)
            _read_all(fd, [memoryview(out)], 0, path, where)
            return memoryview(out)
        finally:
            os.close(fd)

    def map_chunk(
        self, key: str, nbytes: int, band_nbytes: int | None, where: str
    ) -> np.ndarray | None:
        """Reading a chunk copies it from the page cache into fresh memory, and on a VM filling
        fresh memory costs more than the copy; a mapping does neither (the pages are the page
        cache's until someone writes to them). The array keeps the mapping; it goes with the
        array. None for a packed banded chunk, a file system without mmap, too many mappings."""
        if not _libc.available() or nbytes == 0:
            return None
        path = f"{self.url}/{key}"
        prefetched = path in self._held  # its read-ahead asked for already (`prefetch`)
        fd, size = self._open_chunk(path, _format.chunk_file_sizes(nbytes, band_nbytes), where)
        try:
            if band_nbytes is None:
                return _map_plain(fd, nbytes, path, where, not prefetched)
            stride = _format.stride_of_size(size, nbytes, band_nbytes, path, where)
            if band_nbytes % mmap.ALLOCATIONGRANULARITY or stride % mmap.ALLOCATIONGRANULARITY:
                return None  # packed bands, or pages larger than the 4 KiB bands are aligned to
            return _map_bands(fd, nbytes, band_nbytes, stride, path, where)
        finally:
            os.close(fd)

    def prefetch(self, key: str, nbytes: int) -> None:
        """The kernel's read-ahead of those bytes (`posix_fadvise(WILLNEED)` starts the reads
        and returns; never more than asked, whatever the file holds): one thread reading small
        chunks in order, prefetching some ahead, keeps the disk as busy as several reading
        threads would, without their GIL hand-offs. The file stays open for the read that
        follows (`_open_file`: opened as `_open` opens, and checked there); those never read
        are closed with this storage."""
        if _WILLNEED is None:
            return
        path = f"{self.url}/{key}"
        try:
            fd = os.open(path, _O_READ | _O_NONBLOCK)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, nbytes, _WILLNEED)
        except OSError:
            pass  # not a regular file: the read says so
        held = self._held
        if len(held) < _HELD_MAX and held.setdefault(path, fd) == fd:
            if self._closes_held is None:
                self._closes_held = weakref.finalize(self, _close_all, held)
            return
        os.close(fd)  # enough held, or one held for this file already

    def drop_prefetched(self) -> None:
        """Close the descriptors `prefetch` opened for reads that never came."""
        _close_all(self._held)

    def check_no_links(self, name: str, where: str, seen: set[str]) -> None:
        """Each directory on the way is listed once (`scandir`: the entry types come with the
        names, no `lstat` of each) and its entries that are no links go into `seen`: a restore
        of thousands of arrays in a few groups makes a few listings, not thousands of `lstat`s
        (on a cold cache each reads an inode on the caller's thread). A path is in `seen` only
        if its parent was reached this way: found there, it is checked all the way up."""
        if f"{self.url}/{name}" in seen:
            return
        parent = self.url
        for part in name.split("/"):
            path = f"{parent}/{part}"
            if path not in seen:
                listed = f"{parent}/\0"  # a marker: `parent` was listed into `seen`
                if listed not in seen:
                    seen.add(listed)
                    try:
                        with os.scandir(parent) as entries:
                            seen.update(e.path for e in entries if not e.is_symlink())
                    except FileNotFoundError:
                        return  # the read reports what is missing
                if path not in seen:  # a link, or missing (the read reports that)
                    if os.path.islink(path):
                        raise _link(path, where)
                    return
            parent = path

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the directory: a replaced checkpoint has another."""
        try:
            st = os.stat(self.url)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    # -- listing ---------------------------------------------------------------------------------

    def list_dir(self, key: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.path(key)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def checkpoint_states(self, names: list[str]) -> list[State]:
        states: list[State] = []
        for name in names:
            path = os.path.join(self.url, name)
            if _format.is_leftover(name):
                states.append("leftover")
            elif not os.path.islink(path) and os.path.isfile(os.path.join(path, _format.DOC)):
                states.append("committed")
            else:
                states.append(None)
        return states

    # -- writing a checkpoint --------------------------------------------------------------------

    def make_dirs(self, keys: Iterable[str], *, parents: bool = True) -> None:
        for key in keys:
            if parents:
                os.makedirs(self.path(key), exist_ok=True)
            else:
                try:
                    os.mkdir(self.path(key))
                except FileExistsError:  # a recycled step's (`begin_in`)
                    if not os.path.isdir(self.path(key)):
                        raise

    def check_writable(self, *, replace: bool) -> None:
        if not os.path.lexists(self.url):
            return
        if not os.path.isdir(self.url) or os.path.islink(self.url):
            raise CheckpointExistsError(
                f"cannot save to {self.url}: it exists and is not a directory; choose another path"
            )
        self._refuse_foreign(self.list_dir(), replace=replace)

    def begin(self, *, replace: bool) -> LocalStorage:
        """A fresh hidden sibling directory (same file system, so the commit's rename is
        atomic); what is at this path is checked by `check_writable` and again by `commit`."""
        parent = os.path.dirname(self.url)
        os.makedirs(parent, exist_ok=True)
        staged = LocalStorage(os.path.join(parent, _format.temporary_name(self.name)))
        os.mkdir(staged.url)
        return staged

    def begin_in(self, spare: Storage, *, replace: bool) -> LocalStorage | None:
        """`spare` renamed to a fresh hidden sibling, its root document removed: a save writes
        over its files (`write`) instead of creating as many (benchmarks/inode_reuse.py: 3x
        less kernel time a file, and nothing to remove). Only a place in the same directory."""
        if not isinstance(spare, LocalStorage) or os.path.dirname(spare.url) != os.path.dirname(
            self.url
        ):
            return None
        staged = LocalStorage(
            os.path.join(os.path.dirname(self.url), _format.temporary_name(self.name))
        )
        os.rename(spare.url, staged.url)
        try:
            os.unlink(staged.path(_format.DOC))  # so nothing there looks committed
        except FileNotFoundError:
            pass
        staged._recycled = True
        return staged

    def remove_stale(self, files: Iterable[str], dirs: Iterable[str]) -> None:
        for key in files:
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                shutil.rmtree(self.path(key))
        for key in sorted(dirs, key=lambda k: -k.count("/")):  # the deepest first
            try:
                os.rmdir(self.path(key))
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(self.path(key))  # something its document did not name

    def sync(self) -> None:
        """Linux: one `syncfs` of the file system (one call instead of thousands of fsyncs).
        Elsewhere: `fsync` of every file and directory under this place."""
        fd = os.open(self.url, _O_DIR)
        try:
            if _libc.syncfs(fd):
                return
        finally:
            os.close(fd)
        for d, _, files in os.walk(self.url):
            for name in files:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(d)

    def commit(self, staged: Storage, *, replace: bool) -> None:
        """Rename `staged` into place and `fsync` the parent. With `replace` an existing
        checkpoint is swapped out atomically where the OS allows (there is never a moment
        without a checkpoint here), then deleted."""
        tmp, dest, parent = staged.url, self.url, os.path.dirname(self.url)
        if replace and os.path.isdir(dest) and (names := self.list_dir()):
            self._refuse_foreign(names, replace=True)  # what goes must be a checkpoint
            if _libc.exchange(tmp, dest):
                _fsync_dir(parent)
                shutil.rmtree(tmp, ignore_errors=True)  # `tmp` now holds the old checkpoint
                return
            old = os.path.join(parent, _format.deleting_name(self.name))
            os.rename(dest, old)
            os.rename(tmp, dest)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, dest)  # fails unless `dest` is absent or an empty directory
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise CheckpointExistsError(
                    f"could not commit the checkpoint: {dest} already exists (it appeared while "
                    "saving: two writers must not share a path; pass `force=True` to replace a "
                    "checkpoint)"
                ) from e
            raise
        _fsync_dir(parent)

    def discard(self, staged: Storage) -> None:
        shutil.rmtree(staged.url, ignore_errors=True)  # a committed one was renamed away

    # -- deleting --------------------------------------------------------------------------------

    def unlist(self) -> LocalStorage:
        parent = os.path.dirname(self.url)
        trash = os.path.join(parent, _format.deleting_name(self.name))
        os.rename(self.url, trash)
        _fsync_dir(parent)
        return LocalStorage(trash)

    def remove(self) -> None:
        try:
            shutil.rmtree(self.url)
        except FileNotFoundError:
            pass

    def set_aside(self, name: str) -> LocalStorage:
        dest = os.path.join(os.path.dirname(self.url), name)
        os.rename(self.url, dest)
        _fsync_dir(os.path.dirname(self.url))
        return LocalStorage(dest)

    def leftovers(self) -> list[Storage]:
        return [self.child(n) for n in self.list_dir() if _format.is_leftover(n)]

    def lock(self) -> WriterLock:
        return _FileLock(self.url)

    def prepare_directory(self) -> None:
        os.makedirs(self.url, exist_ok=True)
        spread_subdirectories(self.url)


# ---------------------------------------------------------------------------------------------
# File descriptors


def _at(where: str) -> str:
    """The start of a message about a file: where it was read (if the caller said), then ": "."""
    return f"{where}: " if where else ""


def _link(path: str, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{_at(where)}{path} is a symbolic link; asyncckpt reads nothing "
        "outside a checkpoint, so a checkpoint must hold its files themselves (copy it with "
        "links resolved)"
    )


def _open(path: str, where: str) -> tuple[int, int]:
    """Open a file of a checkpoint for reading: (descriptor, size). Only a regular file is: a
    symbolic link is refused (`O_NOFOLLOW`), and so is anything else (a FIFO would block every
    reader for ever, a character device would stream without end), opened without blocking to
    tell. The size comes from the same `fstat` (thousands of small chunks are opened per
    restore)."""
    try:
        fd = os.open(path, _O_READ | _O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link(path, where) from None
        raise
    return fd, _regular_size(fd, path, where)


def _regular_size(fd: int, path: str, where: str) -> int:
    """The size of the open file `fd`, which must be a regular file (else it is closed)."""
    st = os.fstat(fd)
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a character device"
            if stat.S_ISCHR(mode)
            else "a block device"
            if stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "not a regular file"
        )
        raise CorruptCheckpointError(
            f"{_at(where)}{path} is {kind}, not a regular file; a checkpoint "
            "holds only regular files (replace it with the file it stands for, or restore "
            "another checkpoint)"
        )
    return st.st_size


def _close_all(held: dict[str, int]) -> None:
    """Close the descriptors that `LocalStorage.prefetch` opened and nothing read."""
    while held:
        try:
            os.close(held.popitem()[1])
        except (KeyError, OSError):
            pass  # taken meanwhile, or closed


def _open_to_write(path: str, recycled: bool = False) -> tuple[int, int]:
    """Open `path` to write it whole: (descriptor, bytes it holds). A new file; or, where there
    is one (a recycled step's, `begin_in`), that file to be written over in place, if nothing
    else shares it: no other step links it (incremental saves) and no process holds it open or
    mapped (a restored array may be a mapping of it). Else that name is unlinked and the file
    created anew, so whoever holds the old one keeps its bytes. `recycled`: the file is likely
    there, so that is tried first (one failed call fewer a file)."""
    if not recycled:
        try:
            return os.open(path, _O_NEW, 0o644), 0
        except FileExistsError:
            pass
    try:
        fd = os.open(path, _O_OVER | _O_NONBLOCK)
    except FileNotFoundError:
        return os.open(path, _O_NEW, 0o644), 0
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
    else:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and _alone(fd):
            return fd, st.st_size  # (O_NONBLOCK does nothing to a regular file)
        os.close(fd)
    os.unlink(path)
    return os.open(path, _O_NEW, 0o644), 0


def _alone(fd: int) -> bool:
    """Whether no other open file or mapping of this file exists, in any process: the kernel
    grants a write lease only then (taken and given back at once)."""
    setlease = getattr(fcntl, "F_SETLEASE", None)
    if setlease is None:
        return False
    try:
        fcntl.fcntl(fd, setlease, fcntl.F_WRLCK)
    except OSError:
        return False  # in use, or no leases here (another owner, a network file system)
    fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)
    return True


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


def _after(buffers: list[memoryview], done: int) -> list[memoryview]:
    """What of `buffers` is left after the first `done` bytes."""
    pending = [b for b in buffers if b.nbytes]
    _advance(pending, done)
    return pending


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    pending = [b for b in buffers if b.nbytes]
    while pending:
        _advance(pending, os.writev(fd, _next_batch(pending)))


def _shrank(path: str, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{_at(where)}{path} shrank while it was read: something changed "
        "the checkpoint meanwhile (restore it again, or another checkpoint)"
    )


def _read_all(fd: int, buffers: list[memoryview], offset: int, path: str, where: str) -> None:
    """Fill `buffers` from `offset` on; the file must hold that many bytes."""
    total = sum(b.nbytes for b in buffers)
    if 0 < total <= _MAX_IO and len(buffers) <= _IOV_MAX:
        n = os.preadv(fd, buffers, offset)  # most reads: one call fills them all
        if n == total:
            return
        if n <= 0:
            raise _shrank(path, where)
        offset, buffers = offset + n, _after(buffers, n)
    pending = [b for b in buffers if b.nbytes]
    while pending:
        n = os.preadv(fd, _next_batch(pending), offset)
        if n <= 0:
            raise _shrank(path, where)
        offset += n
        _advance(pending, n)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Restoring by mapping: a chunk's pages are mapped copy-on-write instead of copied


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


def _new_mapping(n: int, fd: int, length: int) -> mmap.mmap | None:
    """A private writable mapping of `length` bytes (of `fd`, or anonymous when `fd` is -1)
    counted as `n` mappings, or None."""
    if not _mappings.take(n):
        return None
    try:
        m = mmap.mmap(
            fd,
            length,
            flags=mmap.MAP_PRIVATE | (mmap.MAP_ANONYMOUS if fd < 0 else 0),
            prot=_libc.PROT_RW,
        )
    except (OSError, ValueError):
        _mappings.give(n)
        return None
    weakref.finalize(m, _mappings.give, n)
    return m


def _map_plain(fd: int, nbytes: int, path: str, where: str, advise: bool) -> np.ndarray | None:
    """`advise`: ask for the chunk's read-ahead (unless `prefetch` did)."""
    m = _new_mapping(1, fd, nbytes)
    if m is None:
        return None
    if advise:  # from disk: read ahead the whole chunk, not page by page
        m.madvise(mmap.MADV_WILLNEED)
    data = np.frombuffer(m, np.uint8)
    _format.check_crc(data, os.pread(fd, _format.CRC_BYTES, nbytes), path, where)
    return data


def _map_bands(
    fd: int, nbytes: int, band_nbytes: int, stride: int, path: str, where: str
) -> np.ndarray | None:
    """Map each band of an aligned banded chunk file over its place in one reserved range."""
    nbands = nbytes // band_nbytes
    m = _new_mapping(nbands + 1, -1, nbytes)
    if m is None:
        return None
    holder = (ctypes.c_char * nbytes).from_buffer(m)
    base = ctypes.addressof(holder)
    del holder
    for j in range(nbands):
        if not _libc.map_fixed(base + j * band_nbytes, band_nbytes, fd, j * stride):
            return None  # the reserved range, with what was mapped over it, goes with `m`
    m.madvise(mmap.MADV_WILLNEED)
    data = np.frombuffer(m, np.uint8)
    _format.check_index(
        memoryview(os.pread(fd, _format.index_nbytes(nbands), nbands * stride)),
        nbands,
        band_nbytes,
        path,
        where,
        stride,
    )
    for j in range(nbands):
        _format.check_band(
            data[j * band_nbytes : (j + 1) * band_nbytes],
            os.pread(fd, _format.CRC_BYTES, j * stride + band_nbytes),
            j,
            path,
            where,
        )
    return data


# ---------------------------------------------------------------------------------------------
# A manager directory: its lock, and how new directories are placed


class _FileLock(WriterLock):
    """An exclusive `flock` on `<directory>/.asyncckpt.lock`, held while a manager may write.

    The kernel drops it when the process dies, so a crash never leaves the directory locked. The
    file records who holds it, for the error message of the next writer."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, _format.LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            holder = _lock_or_holder(fd, self.path)
        except OSError:
            os.close(fd)
            raise
        if holder is not None:
            os.close(fd)
            raise DirectoryLockedError(
                f"another CheckpointManager ({holder}) is writing to {directory}; two writers "
                "would interleave their steps and deletions. Close the other one first, or open "
                "this one with read_only=True to only restore."
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd: int | None = fd
        _held_locks.add(self)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no record names a writer that let go
            # unlocked first: a process forked before this one closed its copy of the
            # descriptor (`_close_locks_in_child`), but a copy made otherwise would keep it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        _held_locks.discard(self)


_held_locks: weakref.WeakSet[_FileLock] = weakref.WeakSet()


def _close_locks_in_child() -> None:
    """In a forked child (a multiprocessing worker): close its copies of the lock descriptors,
    without unlocking (that would unlock the parent's too). The lock then lives and dies with
    the process that took it, not with the children it forked."""
    for lock in list(_held_locks):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


_HOLDER_WAIT_S = 1.0
"""How long a writer refused the lock waits for the holder's record (or for the lock)."""


def _lock_or_holder(fd: int, path: str) -> str | None:
    """Take the lock on `fd` (None), or describe who holds it (pid, host, since when).

    The holder records itself in the file just after it takes the lock, and clears the record
    before it lets go, so a writer that lost the race may find no record yet, or the record of
    a crashed holder before it. It reads again (and tries the lock again, which the holder may
    have let go meanwhile) until the record names a running process, for `_HOLDER_WAIT_S`."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        record = _holder_record(fd)
        running = record is not None and (record[1] != socket.gethostname() or _alive(record[0]))
        if running or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if record is None:
        return (
            f"pid and host unknown: it has not recorded them in {path} within "
            f"{_HOLDER_WAIT_S:g} s, as asyncckpt does at once; `fuser -v {path}` names it"
        )
    pid, host, since = record
    gone = ""
    if not running:
        gone = (
            "; that process is no longer running, so a process it started holds the lock (one "
            "that inherited it across fork or exec of an older asyncckpt)"
        )
    return f"pid {pid} on {host}, since {since}{gone}"


def _holder_record(fd: int) -> tuple[int, str, str] | None:
    """The (pid, host, since) recorded in the lock file, or None if there is no valid one."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return int(info["pid"]), str(info["host"])[:100], since
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


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
        fd = os.open(path, _O_DIR)
    except OSError:
        return False
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        flags = int.from_bytes(buf[:4], sys.byteorder)
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(
                fd, _FS_IOC_SETFLAGS, (flags | _FS_TOPDIR_FL).to_bytes(4, sys.byteorder) + bytes(4)
            )
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
