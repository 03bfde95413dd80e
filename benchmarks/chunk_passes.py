"""The CPU that writing large chunk files costs, with the content hash taken in the checksums'
pass or in a pass of its own before the write.

`LocalStorage.write_chunk` writes a chunk file of 1 MiB or more around the page cache
(`O_DIRECT`); the data passes through a bounce buffer when it does not start on a page (arrays on
CPU devices start 64 bytes past one). Its CRC-32C and, unless the caller hashed the chunk first
(a save whose step before may hold the same content: `Reuse.worth_hashing_first`), its xxh3-128
content hash are taken on each 1 MiB piece while it is in the CPU's cache (`_format.Sums`). This
script writes the same chunks each way (`WAYS`), from page-aligned memory (the snapshot arena of
GPU/TPU saves) and from memory 64 bytes past a page (XLA's CPU buffers), and reports process CPU
seconds per GB (user + system: the kernel's work for the device writes counts), medians of the
rounds, each round writing every chunk once per way, the ways taking turns.

    python benchmarks/chunk_passes.py [--gib 1] [--chunk-mib 64] [--rounds 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncckpt import _format  # noqa: E402
from asyncckpt._storage import open_storage  # noqa: E402

WAYS = ("one pass", "hash first", "three passes")
"""one pass: `write_chunk` takes checksums and hash on each piece (as it copies it, where the
memory is not aligned); hash first: the hash in a pass of its own, then `write_chunk` (the
checksums on each piece); three passes: the hash, then the checksums, then the write (copying
unaligned memory through the bounce buffer), as asyncckpt did before."""


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def chunks(nbytes: int, chunk: int, offset: int) -> list[np.ndarray]:
    """Random data at `offset` bytes past a page, cut into chunks."""
    buf = np.frombuffer(mmap.mmap(-1, nbytes + 4096), np.uint8)[offset : offset + nbytes]
    buf[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    return [buf[i : i + chunk] for i in range(0, nbytes, chunk)]


def write_all(place, data: list[np.ndarray], band: int | None, way: str) -> list[str]:
    out = []
    for i, chunk in enumerate(data):
        key = f"w/c.{i}"
        digest = _format.chunk_hash(chunk) if way != "one pass" else None
        if way == "three passes":  # as before session 20: hash, checksums, then the write
            place.write(key, *_format.chunk_file(chunk, band).buffers(_format.Sums(False)))
            out.append(digest)
        else:
            out.append(place.write_chunk(key, chunk, band, digest))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--chunk-mib", type=int, default=64)
    p.add_argument("--band-mib", type=int, default=4, help="row bands of banded chunks")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", help="where the files go (default: a new dir under /tmp)")
    args = p.parse_args()
    nbytes = int(args.gib * (1 << 30)) // (args.chunk_mib << 20) * (args.chunk_mib << 20)
    work = tempfile.mkdtemp(prefix="chunk_passes-", dir=args.dir)
    try:
        place = open_storage(work)
        place.make_dirs(["w"])
        print(f"{nbytes / 1e9:.2f} GB in {args.chunk_mib} MiB chunks, {args.rounds} rounds")
        for offset, where in ((0, "page-aligned"), (64, "64 B past a page")):
            data = chunks(nbytes, args.chunk_mib << 20, offset)
            for band, layout in ((None, "plain"), (args.band_mib << 20, "banded")):
                times: dict[str, list[float]] = {w: [] for w in WAYS}
                digests = {}
                for _ in range(args.rounds):
                    for way in WAYS:
                        t = cpu_s()
                        digests[way] = write_all(place, data, band, way)
                        times[way].append((cpu_s() - t) / (nbytes / 1e9))
                assert len(set(map(tuple, digests.values()))) == 1, "the ways disagree"
                cells = "  ".join(f"{w}: {statistics.median(t):.3f}" for w, t in times.items())
                print(f"{where:>17}, {layout:6}  CPU s per GB  {cells}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
