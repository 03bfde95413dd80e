"""Multi-process side by side: asyncckpt and orbax-checkpoint in real `jax.distributed` jobs
(gloo collectives, a loopback coordinator, CPU devices, 8 devices per job), ~1 GiB of float32
state: 32 matrices sharded by rows over every device (FSDP-like).

Each phase is a fresh job, for each system (runs alternate systems; medians):
- save: 4 processes x 2 devices. Step 1 is saved and committed (warm-up), then step 2 is timed:
  commit = from `save()` to `wait_until_finished()` returning (the slowest process).
- same: 4 processes restore step 2 onto the saved mesh and sharding.
- other: 2 processes x 4 devices restore it onto a (4, 2) mesh, sharded by columns.
- replicated: 4 processes restore it onto a (2, 4) mesh ("replica", "x"): sharded by rows
  within a replica of 2 processes, replicated across the 2 replicas, so every byte is needed by
  two processes. asyncckpt twice: with its default (`read_once` off for files on CPU devices)
  and with `read_once=True`.
A restore is timed from building the manager to the arrays being ready (the slowest process)
and checked value by value. `read_gb`: bytes all processes of the job read through system calls
during the restore (`rchar` of /proc/self/io, summed: file reads; the collectives' sockets do
not show there), against the checkpoint's size; for asyncckpt also its own count
(`RestoreStats.bytes`), which includes the chunk files it maps instead of reading.
Checkpoints are on local disk (`BENCH_DIR=/dev/shm` puts them on a RAM disk). Restores read
what the page cache holds of the save just made (Orbax's writes leave all of it there,
asyncckpt's large files none, since they skip the page cache); `--drop-caches` drops it before
every restore job, for both (a job resuming on fresh hosts, or after the cache was reused).
The values' low bits look random, as trained weights' do, so that Orbax's zstd compression
gains on them what it would on a real checkpoint.

    python benchmarks/multiprocess.py --runs 3 [--scale 1.0] [--drop-caches]
    python benchmarks/multiprocess.py --quick      # 1 run, 1/16 of the state (smoke)
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import machine  # noqa: E402

MARK = "MULTIPROCESS-RESULT "
ARRAYS = 32
SYSTEMS = ("asyncckpt", "orbax")
# phase -> (processes, restore layout); "save" writes with the "rows" layout
PHASES = {
    "save": (4, "rows"),
    "same": (4, "rows"),
    "other": (2, "columns"),
    "replicated": (4, "replicas"),
    "replicated-read-once": (4, "replicas"),
}


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def child(args) -> None:
    processes = PHASES[args.phase][0]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=processes,
        process_id=args.process,
    )
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from multitier import Workload

    class Noisy(Workload):
        """Values whose low bits look random, as trained weights' do: zstd (Orbax's default)
        gains little on them, as on real checkpoints (an arange compresses to 2/3)."""

        def value(self, i: int, step: int, index):
            return np.sin(super().value(i, step, index) * np.float32(0.37))

    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    layout = PHASES[args.phase][1]
    if layout == "rows":
        sharding = NamedSharding(Mesh(devices, ("x",)), P("x"))
    elif layout == "columns":
        sharding = NamedSharding(Mesh(devices.reshape(4, 2), ("a", "b")), P(None, ("a", "b")))
    else:  # the first replica is processes 0-1, the second 2-3
        sharding = NamedSharding(Mesh(devices.reshape(2, 4), ("replica", "x")), P("x"))
    rows, cols = max(64, int(2048 * args.scale)), 4096
    work = Noisy([f"w{i:02d}" for i in range(ARRAYS)], (rows, cols), sharding)
    root = os.path.join(args.dir, args.system)

    if args.system == "asyncckpt":
        import asyncckpt as ac

        # imported before timing, as Orbax is (below): `asyncckpt` loads its modules on first
        # use, which would count its import (and here, where PYTHONDONTWRITEBYTECODE may be
        # set, compiling them: ~0.2 s) in the restore
        manager = ac.CheckpointManager
        read_once = True if args.phase == "replicated-read-once" else None
        t0 = time.perf_counter()
        mgr = manager(root, incremental=False, read_once=read_once)

        def save(step: int, tree: dict) -> None:
            mgr.save(step, tree)

        def restore() -> dict:
            return mgr.restore(2, work.abstract())
    else:
        import orbax.checkpoint as ocp

        t0 = time.perf_counter()
        mgr = ocp.CheckpointManager(
            root, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
        )

        def save(step: int, tree: dict) -> None:
            mgr.save(step, args=ocp.args.StandardSave(tree))

        def restore() -> dict:
            return mgr.restore(2, args=ocp.args.StandardRestore(work.abstract()))

    out: dict = {}
    if args.phase == "save":
        save(1, work.state(1))
        mgr.wait_until_finished()
        tree = work.state(2)
        multihost_utils.sync_global_devices("ready")
        t1 = time.perf_counter()
        save(2, tree)
        t2 = time.perf_counter()
        mgr.wait_until_finished()
        out = {"blocking_s": t2 - t1, "commit_s": time.perf_counter() - t1}
        if args.system == "asyncckpt":  # where the time went (the slowest process's)
            stats = mgr.last_save_stats()
            out.update(write_s=stats.write_s, sync_rename_s=stats.commit_s)
    else:
        before = rchar()
        restored = restore()
        jax.block_until_ready(restored)
        out = {"restore_s": time.perf_counter() - t0, "read_bytes": rchar() - before}
        if args.system == "asyncckpt":  # its own count: chunk bytes from storage, mapped too
            out["counted_bytes"] = mgr.last_restore_stats().bytes
        work.check(restored, 2)
    mgr.close()
    from multitier import finish_child

    finish_child(MARK, out)


def run_job(system: str, phase: str, directory: str, args) -> dict:
    from multitier import run_phase

    return run_phase(__file__, MARK, system, phase, directory, args, PHASES[phase][0])


def one_run(system: str, args) -> dict:
    size = size_of(args)
    directory = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
    try:
        out = {}
        saved = run_job(system, "save", directory, args)
        out.update(blocking=saved["blocking_s"], commit=saved["commit_s"])
        phases = ["same", "other", "replicated"]
        if system == "asyncckpt":
            phases.append("replicated-read-once")
        for phase in phases:
            if args.drop_caches and (error := machine.drop_caches()):
                sys.exit(f"--drop-caches: {error}")
            r = run_job(system, phase, directory, args)
            out[phase] = r["restore_s"]
            out[f"{phase} read"] = r["read_bytes"] / size
            if "counted_bytes" in r:
                out[f"{phase} counted"] = r["counted_bytes"] / size
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def size_of(args) -> int:
    return ARRAYS * max(64, int(2048 * args.scale)) * 4096 * 4


def main() -> None:
    from multitier import side_by_side

    def header(args) -> str:
        gib = size_of(args) / 2**30
        return f"{ARRAYS} float32 matrices, {gib:.2f} GiB, 8 CPU devices per job"

    def arguments(parser) -> None:
        parser.add_argument(
            "--drop-caches",
            action="store_true",
            help="sync and drop the page cache before each restore job (needs root)",
        )

    args, results = side_by_side(__doc__, child, one_run, header, arguments)

    def median(system: str, key: str) -> float:
        return statistics.median(r[key] for r in results[system])

    print(f"\nmedians of {args.runs} runs (alternating)")
    print("| | asyncckpt | orbax | ratio |")
    print("|---|---|---|---|")
    rows_out = [
        ("blocking, 4 processes", "blocking", "blocking"),
        ("commit, 4 processes", "commit", "commit"),
        ("restore, same mesh (4 processes)", "same", "same"),
        ("restore, other mesh, 2 processes", "other", "other"),
        ("restore, replicated across processes", "replicated", "replicated"),
        ("restore, replicated, read_once=True", "replicated-read-once", "replicated"),
    ]
    for label, ours, theirs in rows_out:
        a, o = median("asyncckpt", ours), median("orbax", theirs)
        print(f"| {label} | {a:.3f} s | {o:.3f} s | {a / o:.2f} |")
    print("\nbytes read by all processes together, x the checkpoint's size (asyncckpt: system")
    print("calls; in brackets its own count, which includes the chunks it maps)")
    print("| | asyncckpt | orbax |")
    print("|---|---|---|")
    for label, ours, theirs in rows_out[2:]:
        a, c = median("asyncckpt", f"{ours} read"), median("asyncckpt", f"{ours} counted")
        o = median("orbax", f"{theirs} read")
        print(f"| {label.removeprefix('restore, ')} | {a:.2f} ({c:.2f}) | {o:.2f} |")


if __name__ == "__main__":
    main()
