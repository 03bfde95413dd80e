"""Side-by-side benchmark of asyncckpt and orbax-checkpoint (save and restore of sharded trees).

Method
------
Every measurement runs in its own fresh Python process (a child of this script), with 8 simulated
CPU devices on a 4x2 mesh ("x", "y"). Runs alternate systems: for each run, for each workload,
asyncckpt then orbax each do a save child and then a restore child; the checkpoint is deleted
right after its restore child.

Save child (a training job after its first save):
  builds the workload tree deterministically from a seed, samples RSS (the baseline), makes one
  warm-up save (step 0, deleted afterwards; it is NOT reported), then times a second save (step 1):
    save_blocking_s    time spent inside the save call (asyncckpt `save`, orbax `mgr.save`)
    save_commit_s      from the start of the save call until `wait_until_finished` returns
    save_peak_rss_gb   peak RSS during the timed save minus the baseline taken right after
                       building the tree, i.e. before the warm-up save: host memory a system
                       keeps between saves counts. RSS is sampled with psutil every 5 ms.
    train_slowdown     a fixed jitted step loop (~1.5 s when idle) run right after a save
                       returns, divided by the same loop on a quiet machine: how much a save in
                       the background slows training down. Measured over SLOWDOWN_REPS further
                       saves, each followed (once committed and deleted) by an idle loop; the
                       median busy loop over the median of the idle loops (one more idle loop
                       runs before the first save)
    save_cpu_s_per_gb  CPU time of the process (every thread, user + system, so the kernel's
                       copies into the page cache count) from the timed save's call until it
                       committed, per GB of the tree; beside it, memcpy_cpu_s_per_gb, the CPU
                       time of one copy of the tree into touched memory, the floor
    durable_idle_s     from `save()` until the step is committed, found by polling every 10 ms
    durable_loaded_s   the same while the jitted training loop runs between the polls, keeping
                       both cores busy for the whole save (issue 20's "time to durable under
                       load"); neither waits inside the library (no `wait_until_finished`)
    train_lost_s       over that loaded time, the training time the save cost: the time minus
                       the loop steps run meanwhile times one step's idle time. train_slowdown
                       sees the first 1.5 s after `save()`; this sees the whole save, so a save
                       that spreads its work thin and one that finishes fast compare fairly
  Each system uses one `CheckpointManager` for all saves (orbax's with asynchronous checkpointing
  and `args.StandardSave`), with their default options (orbax's include zstd compression of the
  data; asyncckpt writes it uncompressed). A delete is timed until its files are gone, or for
  asyncckpt on a file system (`reuse_deleted_files`, the default) until they are out of the listing,
  kept for the next save to write over: each save here follows a deletion, as under retention.

Restore child (a job resuming from the checkpoint):
  builds the abstract target (`jax.ShapeDtypeStruct` with the saved shardings, no data), then
    restore_resume_s     first restore in the fresh process, until `jax.block_until_ready`
    restore_warm_s       a second restore of the same checkpoint in the same process
    restore_peak_rss_gb  peak RSS during the first restore minus RSS just before it
                         (the restored arrays themselves are part of it)
    restore_cpu_s_per_gb CPU time of the process during the first restore, per GB
  after each restore every leaf's shape, dtype, sharding and bytes are checked against the
  seeded values, so a broken restore fails loudly.
  orbax: `CheckpointManager(root).restore(1, args=StandardRestore(target))`; asyncckpt:
  `CheckpointManager(root).restore(1, target)` (both managers built before timing).

Workloads (workloads.py): big (~1 GiB float32, 48 sharded matrices + replicated vectors), small
(4000 leaves of 16 KiB), llm (~1.1 GB: bfloat16 transformer params, float32 Adam moments, int32
step). Before the runs, the driver measures this machine's limits (machine.py): memcpy, durable
write and page-cache read bandwidth, and prints asyncckpt's throughput as a fraction of them.
The tables mark each ratio against issue 5's targets.

Without --drop-caches the restore reads come from the page cache (the save just wrote them).

Usage:  python benchmarks/compare_orbax.py [--runs 3] [--scale 1.0] [--json OUT] [--drop-caches]
        python benchmarks/compare_orbax.py --quick      # the smoke run CI makes
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from workloads import (  # noqa: E402
    WORKLOADS,
    abstract_tree,
    build_tree,
    make_mesh,
    tree_nbytes,
    verify,
    workload_specs,
)

import asyncckpt as ac  # noqa: E402

SYSTEMS = ("asyncckpt", "orbax")
METRICS = (
    "save_blocking_s",
    "save_commit_s",
    "save_peak_rss_gb",
    "delete_s",
    "restore_resume_s",
    "restore_warm_s",
    "restore_peak_rss_gb",
    "train_slowdown",
    "save_cpu_s_per_gb",
    "restore_cpu_s_per_gb",
    "durable_idle_s",
    "durable_loaded_s",
    "train_lost_s",
)
# issue 5's targets: the largest acceptable ratio asyncckpt / orbax of each metric's median
TARGETS = {
    "big": {
        "save_blocking_s": 0.75,
        "save_commit_s": 0.5,
        "restore_resume_s": 0.2,
        "restore_warm_s": 0.3,
        "save_peak_rss_gb": 1.05,
        "restore_peak_rss_gb": 0.75,
        "slowdown_excess": 0.5,
    },
    "small": {
        "save_blocking_s": 0.1,
        "save_commit_s": 0.25,
        "restore_resume_s": 0.2,
        "restore_warm_s": 0.2,
        "slowdown_excess": 0.5,
    },
}
TARGETS["llm"] = dict(TARGETS["big"])
# issue 20's targets, on top
for _w, _loaded in (("big", 0.35), ("llm", 0.35), ("small", 0.2)):
    TARGETS[_w].update(save_cpu_s_per_gb=0.3, restore_cpu_s_per_gb=0.3, durable_loaded_s=_loaded)
TRAIN_LOOP_S = 1.5
SLOWDOWN_STEP = 2  # and the steps after it, one per repetition
SLOWDOWN_REPS = 5
WARMUP_STEP, TIMED_STEP = 0, 1
RESULT_MARK = "BENCH-RESULT "
GIB, MIB = 1 << 30, 1 << 20


# ------------------------------------------------------------------------------ measurement


def cpu_s() -> float:
    """CPU time of this process so far, every thread, user and system (the kernel's copies into
    and out of the page cache count; its write-back threads do not)."""
    return time.process_time()  # CLOCK_PROCESS_CPUTIME_ID: every thread, to the nanosecond


def memcpy_cpu_s(tree) -> float:
    """CPU seconds of one copy of the tree's bytes into memory already touched: the floor."""
    host = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")]
    dst = [np.ones_like(h) for h in host]
    t0 = cpu_s()
    for d, h in zip(dst, host):
        np.copyto(d, h)
    return cpu_s() - t0


def rss() -> int:
    gc.collect()
    return machine.rss()


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes, files) of all regular files under `path`."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(os.path.join(root, name))
            files += 1
    return total, files


class AsyncckptSystem:
    """One `CheckpointManager` over `root`, like orbax's side; step N lives in `root/N`."""

    def __init__(self, root: str, options: dict | None = None) -> None:
        self.root = root
        # every save here writes the same tree: an incremental save would link all of it from
        # the step before, which is not what this comparison measures (benchmarks/incremental.py
        # does). Both sides write everything.
        self._mgr = ac.CheckpointManager(root, incremental=False, **(options or {}))

    def save(self, step: int, tree) -> None:
        self._mgr.save(step, tree)

    def wait_until_finished(self) -> None:
        self._mgr.wait_until_finished()

    def delete(self, step: int) -> None:
        self._mgr.delete(step)
        # its files wait for the next save, and those deleted before are removed in the
        # background: count that
        self._mgr.wait_until_finished()

    def restore(self, step: int, target):
        return self._mgr.restore(step, target)

    def committed(self, step: int) -> bool:
        stats = self._mgr.last_save_stats()
        return stats is not None and stats.step == step

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, str(step))

    def close(self) -> None:
        self._mgr.close()


class OrbaxSystem:
    """One async `CheckpointManager` over `root`; step N lives in `root/N`."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._mgr = ocp.CheckpointManager(
            root, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
        )

    def save(self, step: int, tree) -> None:
        self._mgr.save(step, args=ocp.args.StandardSave(tree))

    def wait_until_finished(self) -> None:
        self._mgr.wait_until_finished()

    def delete(self, step: int) -> None:
        self._mgr.delete(step)

    def restore(self, step: int, target):
        return self._mgr.restore(step, args=ocp.args.StandardRestore(target))

    def committed(self, step: int) -> bool:
        return not self._mgr.is_saving_in_progress() and step in self._mgr.all_steps()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, str(step))

    def close(self) -> None:
        self._mgr.close()


def open_system(system: str, root: str):
    if system == "asyncckpt":
        return AsyncckptSystem(root, json.loads(os.environ.get("ASYNCCKPT_OPTIONS", "{}")))
    return OrbaxSystem(root)


def make_train_loop(mesh):
    """A fixed jitted step loop of about TRAIN_LOOP_S seconds on an idle machine: the training
    that a save in the background slows down. Returns `run() -> seconds` and `run_n`."""
    x = jax.device_put(np.full((1024, 1024), 1e-3, np.float32), NamedSharding(mesh, P("x", None)))
    w = jax.device_put(np.eye(1024, dtype=np.float32), NamedSharding(mesh, P()))
    step = jax.jit(lambda v: jnp.tanh(v @ w))

    def run_n(n: int) -> float:
        t0 = time.perf_counter()
        y = x
        for _ in range(n):
            y = step(y)
        jax.block_until_ready(y)
        return time.perf_counter() - t0

    run_n(2)  # compile
    iters = max(3, round(TRAIN_LOOP_S / (run_n(5) / 5)))
    return (lambda: run_n(iters)), run_n


def time_to_durable(sysobj, step: int, tree, between) -> tuple[float, int]:
    """Seconds from `save()` until the step is committed, found by polling with `between()` in
    between (a few training steps, or a short sleep), and the training steps `between` ran (it
    returns how many it ran each time); the caller never waits inside the library."""
    steps = 0
    t0 = time.perf_counter()
    sysobj.save(step, tree)
    while not sysobj.committed(step):
        steps += between()
    return time.perf_counter() - t0, steps


def idle_step_s(train_n) -> float:
    """One training step's time on a quiet machine (median of three loops of 30)."""
    return statistics.median(train_n(30) / 30 for _ in range(3))


def nap() -> int:
    time.sleep(0.01)
    return 0


def train_steps(train_n, n: int = 3):
    """A `between` for `time_to_durable`: `n` training steps."""

    def run() -> int:
        train_n(n)
        return n

    return run


def save_child(
    system: str, workload: str, root: str, scale: float, seed: int, slowdown_reps: int
) -> dict:
    specs = workload_specs(workload, scale)
    tree = build_tree(specs, seed)
    train, train_n = make_train_loop(make_mesh())
    baseline = rss()
    sysobj = open_system(system, root)
    try:
        sysobj.save(WARMUP_STEP, tree)
        sysobj.wait_until_finished()
        t_del = time.perf_counter()
        sysobj.delete(WARMUP_STEP)
        delete_s = time.perf_counter() - t_del
        os.sync()  # the timed save starts on a quiet file system, not behind the deletion
        with machine.PeakRss() as mem:
            c0 = cpu_s()
            t0 = time.perf_counter()
            sysobj.save(TIMED_STEP, tree)
            t1 = time.perf_counter()
            sysobj.wait_until_finished()
            t2 = time.perf_counter()
            save_cpu = cpu_s() - c0
        os.sync()
        idle, busy = [train()], []
        for rep in range(slowdown_reps):
            step = SLOWDOWN_STEP + rep
            sysobj.save(step, tree)  # the loop runs while this save is in the background
            busy.append(train())
            sysobj.wait_until_finished()
            sysobj.delete(step)
            sysobj.wait_until_finished()
            os.sync()
            idle.append(train())
        step_s = idle_step_s(train_n)
        durable, steps = {}, {}
        for label, between in (("idle", nap), ("loaded", train_steps(train_n))):
            step = SLOWDOWN_STEP + slowdown_reps + len(durable)
            durable[label], steps[label] = time_to_durable(sysobj, step, tree, between)
            sysobj.delete(step)
            sysobj.wait_until_finished()
            os.sync()
    finally:
        sysobj.close()
    gb = tree_nbytes(specs) / 1e9
    disk_bytes, files = disk_usage(sysobj.step_dir(TIMED_STEP))
    return {
        "save_blocking_s": t1 - t0,
        "save_commit_s": t2 - t0,
        "save_peak_rss_gb": (mem.peak - baseline) / GIB,
        "delete_s": delete_s,
        "train_slowdown": statistics.median(busy) / statistics.median(idle),
        "save_cpu_s_per_gb": save_cpu / gb,
        "memcpy_cpu_s_per_gb": memcpy_cpu_s(tree) / gb,
        "durable_idle_s": durable["idle"],
        "durable_loaded_s": durable["loaded"],
        "train_lost_s": durable["loaded"] - steps["loaded"] * step_s,
        "train_busy_s": busy,
        "train_idle_s": idle,
        "tree_bytes": tree_nbytes(specs),
        "disk_bytes": disk_bytes,
        "disk_files": files,
    }


def timed_restore(sysobj, target) -> tuple[float, float, dict]:
    """Seconds, CPU seconds, the restored tree."""
    c0, t0 = cpu_s(), time.perf_counter()
    restored = jax.block_until_ready(sysobj.restore(TIMED_STEP, target))
    return time.perf_counter() - t0, cpu_s() - c0, restored


def restore_child(system: str, workload: str, root: str, scale: float, seed: int) -> dict:
    specs = workload_specs(workload, scale)
    target = abstract_tree(specs)
    sysobj = open_system(system, root)
    try:
        baseline = rss()
        with machine.PeakRss() as mem:
            resume_s, resume_cpu, restored = timed_restore(sysobj, target)
        verify(restored, specs, seed)
        del restored
        gc.collect()
        warm_s, _, restored = timed_restore(sysobj, target)
        verify(restored, specs, seed)
    finally:
        sysobj.close()
    return {
        "restore_resume_s": resume_s,
        "restore_warm_s": warm_s,
        "restore_peak_rss_gb": (mem.peak - baseline) / GIB,
        "restore_cpu_s_per_gb": resume_cpu / (tree_nbytes(specs) / 1e9),
    }


def child_main(args) -> None:
    phase, system, workload = args.child
    if phase == "save":
        result = save_child(system, workload, args.root, args.scale, args.seed, args.slowdown_reps)
    else:
        result = restore_child(system, workload, args.root, args.scale, args.seed)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- driver


class ChildFailed(Exception):
    pass


def run_child(args, phase: str, system: str, workload: str, root: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        phase,
        system,
        workload,
        "--root",
        root,
        "--scale",
        str(args.scale),
        "--seed",
        str(args.seed),
        "--slowdown-reps",
        str(args.slowdown_reps),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        raise ChildFailed(f"timed out after {args.timeout} s\n{tail(e.stderr)}") from None
    marked = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not marked:
        raise ChildFailed(f"exit code {proc.returncode}\n{tail(proc.stderr)}")
    return json.loads(marked[-1][len(RESULT_MARK) :])


def tail(text: str | bytes | None, lines: int = 40) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def measure(args, run: int, workload: str, system: str) -> dict:
    """One save child and one restore child; the checkpoint is removed afterwards."""
    root = os.path.join(args.workdir, f"{workload}-{system}-run{run}")
    record = {"run": run, "workload": workload, "system": system}
    try:
        record.update(run_child(args, "save", system, workload, root))
        if args.drop_caches:
            record["drop_caches_error"] = machine.drop_caches()
        record.update(run_child(args, "restore", system, workload, root))
    except ChildFailed as e:
        record["error"] = str(e)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.sync()  # the root file system is mounted with `discard`: settle the deletion here
    return record


def log_record(r: dict) -> None:
    head = f"  run {r['run']} {r['workload']:>5} {r['system']:>9}:"
    if "error" in r:
        print(f"{head} FAILED: {r['error'].splitlines()[0]}", flush=True)
        return
    print(head + " ".join(f" {m}={r[m]:.3f}" for m in METRICS if m in r), flush=True)


def median_of(records: list[dict], workload: str, system: str, key: str) -> float | None:
    values = [
        r[key] for r in records if r["workload"] == workload and r["system"] == system and key in r
    ]
    return statistics.median(values) if values else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "failed" if x is None else format(x, spec)


def verdict(ratio: float | None, target: float | None) -> str:
    if target is None:
        return ""
    return f"<= {target:g} " + ("ok" if ratio is not None and ratio <= target else "MISS")


def print_tables(records: list[dict], workloads: list[str], limits: dict | None) -> None:
    for workload in workloads:
        targets = TARGETS.get(workload, {})
        tree = median_of(records, workload, SYSTEMS[0], "tree_bytes") or median_of(
            records, workload, SYSTEMS[1], "tree_bytes"
        )
        print(f"\n== {workload}: tree {fmt(tree and tree / MIB, '.1f')} MiB ==")
        print(
            f"{'metric (median)':<22}{'asyncckpt':>12}{'orbax':>12}{'ratio a/o':>12}{'target':>14}"
        )
        for metric in METRICS:
            a, o = (median_of(records, workload, s, metric) for s in SYSTEMS)
            ratio = a / o if a is not None and o else None
            print(
                f"{metric:<22}{fmt(a):>12}{fmt(o):>12}{fmt(ratio, '.2f'):>12}"
                f"{verdict(ratio, targets.get(metric)):>14}"
            )
        a, o = (median_of(records, workload, s, "train_slowdown") for s in SYSTEMS)
        excess = (a - 1) / (o - 1) if a is not None and o is not None and o > 1 else None
        print(
            f"{'slowdown excess':<22}{fmt(a and a - 1):>12}{fmt(o and o - 1):>12}"
            f"{fmt(excess, '.2f'):>12}{verdict(excess, targets.get('slowdown_excess')):>14}"
        )
        for system in SYSTEMS:
            size = median_of(records, workload, system, "disk_bytes")
            files = median_of(records, workload, system, "disk_files")
            on_disk = "failed" if size is None else f"{size / MIB:.1f} MiB in {files:.0f} files"
            print(f"on disk, {system}: {on_disk}")
        floor = median_of(records, workload, SYSTEMS[0], "memcpy_cpu_s_per_gb")
        print(f"one memcpy of the tree (the floor): {fmt(floor)} CPU s per GB")
        print_limits(records, workload, tree, limits)


def print_limits(
    records: list[dict], workload: str, tree: float | None, limits: dict | None
) -> None:
    """asyncckpt's throughput against this machine's limits, for this workload."""
    if not limits or not tree:
        return
    med = {m: median_of(records, workload, SYSTEMS[0], m) for m in METRICS}
    memcpy_s = tree / (limits["memcpy_gbps"] * 1e9)
    rss = med["save_peak_rss_gb"]
    print(
        f"asyncckpt vs this machine: save blocking {fmt(med['save_blocking_s'])} s = "
        f"{fmt(med['save_blocking_s'] and med['save_blocking_s'] / memcpy_s, '.2f')} x the "
        f"memcpy time of the tree ({memcpy_s:.3f} s); save +RSS = "
        f"{fmt(rss and rss * GIB / tree, '.2f')} x the tree"
    )
    for metric, limit, what in (
        ("save_commit_s", "durable_write_gbps", "durable write"),
        ("restore_warm_s", "cached_read_gbps", "page-cache read"),
    ):
        if med[metric]:
            gbps = tree / med[metric] / 1e9
            print(
                f"  {metric}: {gbps:.2f} GB/s = {gbps / limits[limit]:.0%} of {what} "
                f"({limits[limit]:.2f} GB/s)"
            )


def print_cache_note(records: list[dict], dropped: bool) -> None:
    errors = {r["drop_caches_error"] for r in records if r.get("drop_caches_error")}
    if not dropped:
        print("\nrestores read from the page cache (no --drop-caches)")
    elif errors:
        print(f"\ndropping the page cache failed ({'; '.join(errors)}): restores read from it")
    else:
        print("\npage cache dropped before each restore child: restore_resume_s reads from disk")


def print_failures(records: list[dict]) -> None:
    for r in records:
        if "error" in r:
            print(f"\n-- FAILED: run {r['run']} {r['workload']} {r['system']}: {r['error']}")


def driver_main(args) -> int:
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="compare_orbax_", dir="/tmp")
    os.makedirs(args.workdir, exist_ok=True)
    print(
        f"asyncckpt {version('asyncckpt')}, orbax-checkpoint {version('orbax-checkpoint')}, "
        f"jax {jax.__version__}, {os.cpu_count()} CPUs; runs={args.runs} scale={args.scale} "
        f"workdir={args.workdir} drop_caches={args.drop_caches}"
    )
    print("each save child times its 2nd save; the 1st (warm-up) save is excluded", flush=True)
    limits = None
    if not args.no_limits:
        limits = machine.measure(args.workdir, 64 * MIB if args.quick else GIB)
        print("this machine: " + ", ".join(f"{k} {v:.2f}" for k, v in limits.items()), flush=True)
    records = []
    try:
        for run in range(args.runs):
            for workload in args.workloads:
                for system in args.systems:
                    records.append(measure(args, run, workload, system))
                    log_record(records[-1])
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print_tables(records, args.workloads, limits)
    print_cache_note(records, args.drop_caches)
    print_failures(records)
    if args.json:
        with open(args.json, "w") as f:
            config = {k: v for k, v in vars(args).items() if k not in ("child", "root")}
            json.dump({"config": config, "limits": limits, "records": records}, f, indent=1)
    return 1 if any("error" in r for r in records) else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="measurements per system and workload")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="size factor (big: rows; small: number of leaf groups); 0.05 gives a smoke run",
    )
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["big", "small", "llm"])
    p.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="(experiments)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where checkpoints go (default: a new dir under /tmp)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache before each restore child (needs root)",
    )
    p.add_argument("--json", metavar="OUT", help="write every raw measurement to OUT")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 run at scale 0.02 of "
        "big, small and llm (what CI runs; its timings mean nothing)",
    )
    p.add_argument(
        "--slowdown-reps",
        type=int,
        default=SLOWDOWN_REPS,
        help="saves per save child that a training loop runs behind (default "
        f"{SLOWDOWN_REPS}; --quick: 1)",
    )
    p.add_argument(
        "--no-limits",
        action="store_true",
        help="skip measuring memcpy, durable write and page-cache read bandwidth",
    )
    p.add_argument(
        "--child", nargs=3, metavar=("PHASE", "SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS
    )
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument(
        "--asyncckpt-options",
        metavar="JSON",
        help="keyword arguments for asyncckpt's CheckpointManager, "
        "e.g. '{\"durable_within_s\": 0}'",
    )
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.quick:
        args.runs, args.scale, args.slowdown_reps = 1, 0.02, 1
    if args.asyncckpt_options is not None:  # the children read it from their environment
        os.environ["ASYNCCKPT_OPTIONS"] = json.dumps(json.loads(args.asyncckpt_options))
    if args.child:
        child_main(args)
        return 0
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
