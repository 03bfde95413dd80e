"""Saves of thousands of small arrays right after a step was deleted, under the training loop:
what the file system makes of a save that must create thousands of inodes.

Why: in compare_orbax.py's small workload (4000 arrays: 8041 files and directories a step),
about a third of the saves under load with `urgent_after_s=0` (now `durable_within_s=0`) took
4-23 s instead of ~1.5 s, all of it kernel time in the writers' `mkdir` and `open(O_CREAT)`.
`perf` put it in ext4's inode allocation: on ext4 *without a journal* (`recently_deleted()`) the
allocator skips every inode freed in the last minute or so, reading each one's deletion time,
so a step created right after another was deleted searches past thousands. Journaled ext4 and
tmpfs do not check.

Each mode is a fresh child process with one `CheckpointManager(incremental=False,
durable_within_s=0)`, saving the `small` tree (workloads.py) `--saves` times, each save timed from
`save()` until committed while compare_orbax.py's loop trains between polls (its "time to
durable under load"), then, once the step is gone, `os.sync()`:
  delete        `mgr.delete(step)` after each commit (the defaults: its files wait for the next
                save, which writes over them)
  delete-fresh  the same with `reuse_deleted_files=False`: every save creates its files anew,
                the deleted step's files removed first
  retain        no explicit delete: `max_to_keep=1`, retention deletes the step before
Reported per mode: time to durable under load and the process's system CPU time over the same
window (median and max over the saves). Run it on each file system that matters (`--dir`: a
directory on it, e.g. an ext4 image mounted with and without a journal, or /dev/shm).

Usage:  python benchmarks/save_after_delete.py [--dir D] [--saves 20] [--modes ...]
        python benchmarks/save_after_delete.py --quick      # a smoke run (timings mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_orbax as co  # noqa: E402  (sets XLA_FLAGS before jax starts)
from workloads import build_tree, make_mesh, workload_specs  # noqa: E402

MODES = ("delete", "delete-fresh", "retain")
MARK = "SAVE_AFTER_DELETE "


def child(mode: str, root: str, saves: int, scale: float) -> dict:
    tree = build_tree(workload_specs("small", scale), 0)
    _, train_n = co.make_train_loop(make_mesh())
    options: dict = {"durable_within_s": 0}  # AsyncckptSystem adds incremental=False
    if mode == "delete-fresh":
        options["reuse_deleted_files"] = False
    if mode == "retain":
        options["max_to_keep"] = 1
    durable, system = [], []
    sysobj = co.AsyncckptSystem(root, options)
    try:
        for step in range(saves):
            s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            seconds, _ = co.time_to_durable(sysobj, step, tree, co.train_steps(train_n))
            system.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
            durable.append(seconds)
            if mode == "retain":
                sysobj.wait_until_finished()
            else:
                sysobj.delete(step)  # and waits until finished
            os.sync()
    finally:
        sysobj.close()
    return {"durable_loaded_s": durable, "system_cpu_s": system}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", help="where the steps go (default: a new directory under /tmp)")
    p.add_argument("--saves", type=int, default=20)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--quick", action="store_true", help="3 saves of the tree at scale 0.02")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.saves, args.scale = 3, 0.02
    if args.child:
        result = child(args.child, args.dir, args.saves, args.scale)
        print(MARK + json.dumps(result), flush=True)
        return 0
    workdir = tempfile.mkdtemp(prefix="save-after-delete-", dir=args.dir)
    print(f"save_after_delete: saves={args.saves} scale={args.scale} in {workdir}", flush=True)
    print("\n| mode | durable under load s: median | max | system CPU s: median | max |")
    print("|---|---|---|---|---|")
    failed = False
    for mode in args.modes:
        root = os.path.join(workdir, mode)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--dir", root]
        cmd += ["--saves", str(args.saves), "--scale", str(args.scale)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        shutil.rmtree(root, ignore_errors=True)
        os.sync()
        if proc.returncode != 0 or not lines:
            print(f"| {mode} | failed: {proc.stderr[-2000:]} | | | |", flush=True)
            failed = True
            continue
        r = json.loads(lines[-1][len(MARK) :])
        d, s = r["durable_loaded_s"], r["system_cpu_s"]
        cells = [statistics.median(d), max(d), statistics.median(s), max(s)]
        print(f"| {mode} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
