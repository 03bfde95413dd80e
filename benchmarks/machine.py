"""This machine's limits, measured in the same run as the comparison: memcpy bandwidth, durable
write bandwidth (large files, fsync'd) and page-cache read bandwidth; and a process's peak
memory while it runs something (`PeakRss`)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

GB = 1e9


def memcpy_gbps(nbytes: int) -> float:
    """Copy between two buffers already touched (the snapshot's case: reused host memory)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / GB


def write_read_gbps(directory: str, nbytes: int) -> tuple[float, float]:
    """(durable write, page-cache read) bandwidth of one file of `nbytes` in `directory`, one
    stream each, best of two."""
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    path = os.path.join(directory, "machine-limits.bin")
    try:
        write = 0.0
        for _ in range(2):  # the first large write after a while can be several times slower
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for offset in range(0, nbytes, block.nbytes):
                    os.write(fd, memoryview(block)[: min(block.nbytes, nbytes - offset)])
                os.fsync(fd)
            finally:
                os.close(fd)
            write = max(write, nbytes / (time.perf_counter() - t0) / GB)
        out = np.empty(nbytes, np.uint8)
        out.fill(0)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                f.readinto(memoryview(out))
            best = min(best, time.perf_counter() - t0)
        return write, nbytes / best / GB
    finally:
        os.unlink(path)


def drop_caches() -> str | None:
    """Flush dirty pages and drop the page cache; return the error, or None if it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        return str(e)
    return None


def measure(directory: str, nbytes: int) -> dict:
    write, read = write_read_gbps(directory, nbytes)
    return {
        "memcpy_gbps": memcpy_gbps(nbytes),
        "durable_write_gbps": write,
        "cached_read_gbps": read,
    }


def rss() -> int:
    """This process's resident memory now, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


class PeakRss:
    """Context manager sampling this process's RSS every `interval` s; `.peak` is the max."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = 0

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
