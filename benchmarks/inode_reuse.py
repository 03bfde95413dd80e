"""What a step of many small arrays costs the file system: new inodes after a delete, against
reusing the inodes of the step deleted before.

A diagnostic for issue 20 (the CPU of a save of thousands of small leaves); asyncckpt does not
write here, but the directory is prepared as a manager's is (`chattr +T` on ext4: each step is
placed in a block group of the file system's choosing; `--no-spread`: not). Each step writes
the files that a save of `--arrays` small arrays writes (in groups of 100: a directory per
array holding a ~400-byte `zarr.json` and a 16 KiB chunk file), then `sync`s, then goes away
before the next one, as under a manager keeping one step:
  fresh  every step creates its directories and files (mkdir, open O_CREAT|O_EXCL, write),
         and the step before is removed (`shutil.rmtree`);
  reuse  the step before is renamed into the new step's place (one rename) and its files are
         overwritten where they are (open O_WRONLY, write): no inode allocated or freed;
  reuse-trunc  the same, each file truncated first (O_TRUNC: blocks freed and allocated again);
  reuse-dirs   only the directories reused: each file unlinked and created again.
Reported per step: CPU seconds of the process (user + system) while writing, wall time of the
writes, of the sync and of the removal. The first `fresh` step of a run writes after the
previous run's removal.

    python benchmarks/inode_reuse.py [--arrays 4000] [--steps 4] [--dir D] [--modes M]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

DOC = b'{"zarr_format":3,"node_type":"array","shape":[4096],"data_type":"float32"}'.ljust(400)
CHUNK = os.urandom(16 * 1024 + 4)  # 16 KiB of float32 and its CRC-32C
FILES = (("zarr.json", DOC), ("c.0", CHUNK))  # what each array's directory holds
PER_GROUP = 100
MODES = ("fresh", "reuse", "reuse-trunc", "reuse-dirs")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def array_dirs(root: str, arrays: int) -> list[str]:
    return [f"{root}/g{i // PER_GROUP:03d}/a{i % PER_GROUP:03d}" for i in range(arrays)]


def put(path: str, flags: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_fresh(root: str, arrays: int) -> None:
    os.mkdir(root)
    for g in range(-(-arrays // PER_GROUP)):
        os.mkdir(f"{root}/g{g:03d}")
    for d in array_dirs(root, arrays):
        os.mkdir(d)
        for name, data in FILES:
            put(f"{d}/{name}", os.O_CREAT | os.O_EXCL, data)


def write_reused(root: str, pool: str, arrays: int, how: str) -> None:
    """`how`: "reuse" overwrites each file where it is; "reuse-trunc" truncates it first
    (O_TRUNC: its blocks are freed and allocated again); "reuse-dirs" keeps only the
    directories (each file is unlinked and created again)."""
    os.rename(pool, root)
    flags = {"reuse": 0, "reuse-trunc": os.O_TRUNC, "reuse-dirs": os.O_CREAT | os.O_EXCL}[how]
    for d in array_dirs(root, arrays):
        for name, data in FILES:
            if how == "reuse-dirs":
                os.unlink(f"{d}/{name}")
            put(f"{d}/{name}", flags, data)


def run(mode: str, base: str, args) -> list[dict]:
    pool = f"{base}/pool"
    out = []
    for step in range(args.steps):
        root = f"{base}/{mode}-{step}"
        c0, t0 = cpu_s(), time.perf_counter()
        if mode != "fresh" and os.path.exists(pool):
            write_reused(root, pool, args.arrays, mode)
        else:
            write_fresh(root, args.arrays)
        c1, t1 = cpu_s(), time.perf_counter()
        os.sync()
        t2 = time.perf_counter()
        if mode != "fresh":
            os.rename(root, pool)
        else:
            shutil.rmtree(root)
        os.sync()
        t3 = time.perf_counter()
        r = {"cpu": c1 - c0, "write": t1 - t0, "sync": t2 - t1, "remove": t3 - t2}
        print(
            f"{mode:11s} step {step}: cpu {r['cpu']:.3f} s  write {r['write']:.3f} s  "
            f"sync {r['sync']:.3f} s  remove {r['remove']:.3f} s",
            flush=True,
        )
        out.append(r)
        time.sleep(args.pause)
    shutil.rmtree(pool, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arrays", type=int, default=4000)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dir", help="where the steps go (default: a new directory in the current one)")
    p.add_argument("--pause", type=float, default=0, help="seconds between steps")
    p.add_argument("--no-spread", action="store_true", help="leave the directory as it is")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = p.parse_args()
    base = tempfile.mkdtemp(prefix="inode_reuse_", dir=args.dir or ".")
    if not args.no_spread:
        from asyncckpt._storage.local import spread_subdirectories

        print(f"chattr +T on {base}: {spread_subdirectories(base)}")
    try:
        results = {mode: run(mode, base, args) for mode in args.modes}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nmedians over steps 1-{args.steps - 1} ({args.arrays} arrays, 2 files each)")
    for mode, rs in results.items():
        later = rs[1:] or rs
        print(
            f"{mode:11s} cpu {statistics.median(r['cpu'] for r in later):.3f} s  write "
            f"{statistics.median(r['write'] for r in later):.3f} s  remove "
            f"{statistics.median(r['remove'] for r in later):.3f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
