"""Training with retention, side by side: asyncckpt and Orbax each keep only the newest step
(`max_to_keep=1`) while a jitted loop trains, so every save also deletes the step before it.

Why a benchmark of its own: compare_orbax.py deletes each step explicitly and waits for the
deletion outside its timed windows. In a training run the manager deletes through retention,
right after each commit, while the loop runs, and what that costs lands in the training.
asyncckpt writes a new step over the files of the step retention deleted last
(`reuse_deleted_files=True`, the default); `asyncckpt-fresh` is asyncckpt with it off: every
file created anew, the old step's files removed on the clean-up thread.

Method: every measurement is a fresh child process (one system, one workload); runs alternate
systems. A child builds the workload tree (workloads.py) and compare_orbax.py's training loop
(~1.5 s when idle), saves steps 1 and 2 (a warm-up: step 2's retention deletes step 1), runs one
idle loop, then for each of `--reps` saves:
    cycle_cpu_s      CPU time of the process (every thread, user + system) from `save()` until
                     `wait_until_finished()` returns (the save, its commit, retention, the old
                     step's removal) minus the CPU of the loop that ran meanwhile (its idle
                     median): what a save with its retention costs the host
    train_slowdown   the loop, run right after `save()` returns, over the median idle loop (one
                     idle loop after each cycle, once everything is finished and synced)
and last, twice:
    durable_loaded_s from `save()` until the step is committed, while the loop runs between
                     polls (compare_orbax.py's "time to durable under load")
    train_lost_s     over that same time, the training time lost: the time minus the loop steps
                     it ran times one step's idle time. A save that writes slowly spreads its
                     cost thin and slows the loop right after `save()` little, a fast one slows
                     it more for less time: `train_slowdown` sees only the first 1.5 s, this the
                     whole save (not the removal of the step before, which asyncckpt-fresh
                     does after the commit, on its clean-up thread)
Medians per child, then medians over the runs. The table gives each system's figures and
asyncckpt's ratios to Orbax: CPU, slowdown excess ((slowdown - 1) / (Orbax's - 1)), durable
under load and training lost.

Usage:  python benchmarks/retention_loop.py [--runs 3] [--workloads small llm] [--reps 4]
        python benchmarks/retention_loop.py --quick      # a smoke run (its timings mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_orbax as co  # noqa: E402  (sets XLA_FLAGS before jax starts)
import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from workloads import WORKLOADS, build_tree, make_mesh, tree_nbytes, workload_specs  # noqa: E402

import asyncckpt as ac  # noqa: E402

SYSTEMS = ("asyncckpt", "asyncckpt-fresh", "orbax")
MARK = "RETENTION_RESULT "
KEYS = ("cycle_cpu_s", "train_slowdown", "durable_loaded_s", "train_lost_s")


class Asyncckpt(co.AsyncckptSystem):
    def __init__(self, root: str, options: dict) -> None:
        self.root = root
        self._mgr = ac.CheckpointManager(root, incremental=False, max_to_keep=1, **options)


class Orbax(co.OrbaxSystem):
    def __init__(self, root: str) -> None:
        self.root = root
        self._mgr = ocp.CheckpointManager(
            root,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True),
        )


def open_system(system: str, root: str, options: dict):
    if system == "orbax":
        return Orbax(root)
    return Asyncckpt(root, {**options, "reuse_deleted_files": system == "asyncckpt"})


def child(system: str, workload: str, root: str, scale: float, reps: int, options: dict) -> dict:
    specs = workload_specs(workload, scale)
    tree = build_tree(specs, 0)
    mesh = make_mesh()
    train, train_n = co.make_train_loop(mesh)
    sysobj = open_system(system, root, options)
    try:
        for step in (1, 2):
            sysobj.save(step, tree)
            sysobj.wait_until_finished()
        os.sync()
        idle, idle_cpu, busy, cycle_cpu = [], [], [], []
        c0 = co.cpu_s()
        idle.append(train())
        idle_cpu.append(co.cpu_s() - c0)
        step = 3
        for _ in range(reps):
            c0 = co.cpu_s()
            sysobj.save(step, tree)
            busy.append(train())
            sysobj.wait_until_finished()
            cycle_cpu.append(co.cpu_s() - c0)
            step += 1
            os.sync()
            c0 = co.cpu_s()
            idle.append(train())
            idle_cpu.append(co.cpu_s() - c0)
        step_s = co.idle_step_s(train_n)
        durable, lost = [], []
        for _ in range(2):
            seconds, steps = co.time_to_durable(sysobj, step, tree, co.train_steps(train_n))
            durable.append(seconds)
            lost.append(seconds - steps * step_s)
            sysobj.wait_until_finished()
            step += 1
            os.sync()
    finally:
        sysobj.close()
    loop_cpu = statistics.median(idle_cpu)
    return {
        "cycle_cpu_s": statistics.median(c - loop_cpu for c in cycle_cpu),
        "train_slowdown": statistics.median(busy) / statistics.median(idle),
        "durable_loaded_s": statistics.median(durable),
        "train_lost_s": statistics.median(lost),
        "tree_gb": tree_nbytes(specs) / 1e9,
        "leaves": len(jax.tree_util.tree_leaves(tree)),
    }


def run_child(args, system: str, workload: str, root: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system, workload]
    cmd += ["--root", root, "--scale", str(args.scale), "--reps", str(args.reps)]
    if args.asyncckpt_options:
        cmd += ["--asyncckpt-options", args.asyncckpt_options]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {args.timeout} s\n{co.tail(e.stderr)}"}
    marked = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not marked:
        return {"error": f"exit code {proc.returncode}\n{co.tail(proc.stderr)}"}
    return json.loads(marked[-1][len(MARK) :])


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def print_table(records: list[dict], workloads: list[str], systems: list[str]) -> None:
    print(
        "\n| workload | system | cycle CPU s | slowdown | durable under load s | training lost s "
        "| CPU / orbax | slowdown excess / orbax | durable / orbax | lost / orbax |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in workloads:
        o = {k: co.median_of(records, w, "orbax", k) for k in KEYS}
        for s in systems:
            m = {k: co.median_of(records, w, s, k) for k in KEYS}
            if m["cycle_cpu_s"] is None:
                print(f"| {w} | {s} | failed | | | | | | | |")
                continue
            excess = (m["train_slowdown"] - 1, (o["train_slowdown"] or 1) - 1)
            cells = [
                f"{m['cycle_cpu_s']:.3f}",
                f"{m['train_slowdown']:.3f}",
                f"{m['durable_loaded_s']:.3f}",
                f"{m['train_lost_s']:.3f}",
            ]
            if s != "orbax":
                cells += [
                    ratio(m["cycle_cpu_s"], o["cycle_cpu_s"]),
                    ratio(*excess),
                    ratio(m["durable_loaded_s"], o["durable_loaded_s"]),
                    ratio(m["train_lost_s"], o["train_lost_s"]),
                ]
            else:
                cells += ["", "", "", ""]
            print(f"| {w} | {s} | " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--reps", type=int, default=4, help="timed saves per child")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["small", "llm"])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--workdir", help="where checkpoints go (default: a new dir under /tmp)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    p.add_argument("--json", metavar="OUT", help="write every raw measurement to OUT")
    p.add_argument("--quick", action="store_true", help="1 run, 1 rep, small at scale 0.02")
    p.add_argument(
        "--asyncckpt-options",
        metavar="JSON",
        help="more keyword arguments for asyncckpt's CheckpointManager, e.g. "
        "'{\"durable_within_s\": 0}'",
    )
    p.add_argument("--child", nargs=2, metavar=("SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.runs, args.reps, args.scale, args.workloads = 1, 1, 0.02, ["small"]
    options = json.loads(args.asyncckpt_options) if args.asyncckpt_options else {}
    if args.child:
        system, workload = args.child
        result = child(system, workload, args.root, args.scale, args.reps, options)
        print(MARK + json.dumps(result), flush=True)
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="retention-loop-")
    os.makedirs(workdir, exist_ok=True)
    print(
        f"retention_loop: runs={args.runs} reps={args.reps} scale={args.scale} "
        f"options={options} jax {jax.__version__}, "
        f"orbax-checkpoint {co.version('orbax-checkpoint')}, {os.cpu_count()} CPUs, {workdir}",
        flush=True,
    )
    records = []
    for run in range(args.runs):
        for workload in args.workloads:
            systems = args.systems if run % 2 == 0 else args.systems[::-1]
            for system in systems:
                root = os.path.join(workdir, f"{workload}-{system}-run{run}")
                t0 = time.perf_counter()
                record = {"run": run, "workload": workload, "system": system}
                record.update(run_child(args, system, workload, root))
                shutil.rmtree(root, ignore_errors=True)
                os.sync()
                records.append(record)
                if "error" in record:
                    print(f"  run {run} {workload} {system}: FAILED {record['error']}", flush=True)
                else:
                    print(
                        f"  run {run} {workload:>5} {system:>15}: cycle CPU "
                        f"{record['cycle_cpu_s']:.3f} s, slowdown {record['train_slowdown']:.3f}"
                        f", durable under load {record['durable_loaded_s']:.3f} s, lost "
                        f"{record['train_lost_s']:.3f} s "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    print_table(records, args.workloads, args.systems)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
