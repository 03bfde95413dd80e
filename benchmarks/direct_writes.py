"""Chunk files written through the page cache against around it (`O_DIRECT`), measured the way
asyncckpt writes them: `LocalStorage.write_chunk` from page-aligned host memory on 2 threads, then
the save's one `syncfs`. Reports, medians of `--runs` alternating runs, the seconds until the
files are durable, the CPU seconds the writing process spent (user + system, every thread) and
how much the page cache grew; on an idle machine and beside 2 processes that keep every core
busy (the training loop's share of the CPU).

    python benchmarks/direct_writes.py --runs 3 [--dir /path/on/the/disk] [--gib 1]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import asyncckpt as ac
from asyncckpt._storage import open_storage

CHUNK = 64 << 20


def cached_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def one_run(directory: str, data: np.ndarray, direct: bool) -> dict[str, float]:
    place = open_storage(os.path.join(directory, f"run-{time.monotonic_ns()}"))
    ac.configure_storage(place.url, direct_io=direct)
    place.prepare_directory()
    chunks = [data[i : i + CHUNK] for i in range(0, data.nbytes, CHUNK)]
    cached0, t0, cpu0 = cached_bytes(), time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda ic: place.write_chunk(f"c{ic[0]}", ic[1], None), enumerate(chunks)))
    place.sync()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    grown = cached_bytes() - cached0
    shutil.rmtree(place.url)
    return {"durable_s": seconds, "cpu_s": cpu, "page_cache_gib": grown / 2**30}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dir", help="where to write (default: a new directory under /tmp)")
    args = p.parse_args()
    directory = tempfile.mkdtemp(prefix="direct_writes_", dir=args.dir or "/tmp")
    nbytes = int(args.gib * 2**30) // CHUNK * CHUNK
    data = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)
    data[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for load in ("idle", "loaded"):
            busy = []
            if load == "loaded":
                loop = "while True: pass"
                busy = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2)]
                time.sleep(0.5)
            try:
                for _ in range(args.runs):
                    for mode in ("buffered", "direct"):
                        run = one_run(directory, data, mode == "direct")
                        results.setdefault((load, mode), []).append(run)
            finally:
                for b in busy:
                    b.kill()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{nbytes / 2**30:.2f} GiB in {CHUNK >> 20} MiB chunk files, medians of {args.runs}")
    print(f"{'':16}{'durable s':>10}{'CPU s':>8}{'page cache GiB':>16}")
    for (load, mode), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row = f"{med['durable_s']:>10.2f}{med['cpu_s']:>8.2f}{med['page_cache_gib']:>16.2f}"
        print(f"{load + ' ' + mode:16}{row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
