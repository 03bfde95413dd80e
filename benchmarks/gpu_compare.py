"""asyncckpt vs orbax-checkpoint on whatever accelerator JAX finds (one device), side by side.

Each measurement is a fresh child process; runs alternate systems. A child builds the workload on
the default device, makes a warm-up save (excluded, deleted), then times a second save:
blocking time of the save call (device to host) and time until committed. Right after the save
call returns it donates the arrays to a jitted step (as a training loop would), then restores
the checkpoint in the same process (`restore_s`, host to device: a warm process, not a resuming
job) and checks every byte against the values the tree had when it was saved. Host memory:
the peak RSS above the baseline during the save (until committed) and during the restore,
sampled every 5 ms (pinned staging buffers are host memory and count there once touched).

The same child measures the link first: one `jax.device_get` of the whole tree (device to host)
and one `jax.device_put` of it back (host to device), GB/s. The table then gives the blocking
time over the device-to-host copy of the tree and the restore's throughput as a share of the
host-to-device bandwidth (issue 20's targets: blocking <= 0.2x Orbax's, restore >= 50 %).

    python benchmarks/gpu_compare.py [--runs 2] [--scale 1.0] [--workloads big small]
    python benchmarks/gpu_compare.py --quick     # 1 run at 1/16 scale: the CPU smoke test

Prints the device, medians and ratios asyncckpt / orbax.
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

RESULT_MARK = "GPU-RESULT "
METRICS = (
    "save_blocking_s",
    "save_commit_s",
    "restore_s",
    "save_peak_host_gb",
    "restore_peak_host_gb",
)


def link_gbps(tree) -> tuple[float, float]:
    """GB/s of one device-to-host copy of `tree` and of one host-to-device copy back."""
    import jax
    import numpy as np

    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    t0 = time.perf_counter()
    host = jax.tree.map(np.asarray, jax.device_get(tree))
    t1 = time.perf_counter()
    jax.block_until_ready(jax.device_put(host, jax.devices()[0]))
    t2 = time.perf_counter()
    return nbytes / (t1 - t0) / 1e9, nbytes / (t2 - t1) / 1e9


def build(workload: str, scale: float):
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    if workload == "big":  # ~1 GiB float32: 48 matrices + 48 vectors
        rows = max(8, int(2048 * scale))
        tree = {
            f"layer_{i:02d}": {
                "w": jax.random.normal(jax.random.fold_in(key, i), (rows, 2816)),
                "b": jnp.full((2816,), i, jnp.float32),
            }
            for i in range(48)
        }
    else:  # 4000 leaves of 16 KiB
        groups = max(1, int(40 * scale))
        tree = {
            f"g{g}": {f"l{j}": jnp.full((4096,), 100 * g + j, jnp.float32) for j in range(100)}
            for g in range(groups)
        }
    return jax.block_until_ready(tree)


class Asyncckpt:
    def __init__(self, root):
        import asyncckpt as ac

        self.ac, self.root, self.ckptr = ac, root, ac.AsyncCheckpointer()

    def save(self, step, tree):
        self.ckptr.save(os.path.join(self.root, str(step)), tree)

    def wait(self):
        self.ckptr.wait_until_finished()

    def delete(self, step):
        shutil.rmtree(os.path.join(self.root, str(step)))

    def restore(self, step, target):
        return self.ac.restore(os.path.join(self.root, str(step)), target)

    def close(self):
        self.ckptr.close()


class Orbax:
    def __init__(self, root):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.mgr = ocp.CheckpointManager(
            root, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
        )

    def save(self, step, tree):
        self.mgr.save(step, args=self.ocp.args.StandardSave(tree))

    def wait(self):
        self.mgr.wait_until_finished()

    def delete(self, step):
        self.mgr.delete(step)

    def restore(self, step, target):
        return self.mgr.restore(step, args=self.ocp.args.StandardRestore(target))

    def close(self):
        self.mgr.close()


def child(system: str, workload: str, root: str, scale: float) -> dict:
    import jax
    import machine
    import numpy as np

    tree = build(workload, scale)
    expected = [np.asarray(x) for x in jax.tree.leaves(tree)]
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    step = jax.jit(lambda t: jax.tree.map(lambda x: x * 2 + 1, t), donate_argnums=0)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    d2h, h2d = link_gbps(tree)
    ckpt = {"asyncckpt": Asyncckpt, "orbax": Orbax}[system](root)
    try:
        ckpt.save(0, tree)
        ckpt.wait()
        ckpt.delete(0)
        os.sync()
        base = machine.rss()
        with machine.PeakRss() as saving:
            t0 = time.perf_counter()
            ckpt.save(1, tree)
            t1 = time.perf_counter()
            tree = jax.block_until_ready(step(tree))  # donates the saved arrays while writing
            ckpt.wait()
            t2 = time.perf_counter()
        base_restore = machine.rss()
        with machine.PeakRss() as restoring:
            t3 = time.perf_counter()
            restored = jax.block_until_ready(ckpt.restore(1, target))
            t4 = time.perf_counter()
    finally:
        ckpt.close()
    for got, want in zip(jax.tree.leaves(restored), expected):
        if not np.array_equal(np.asarray(got), want):
            raise AssertionError("restored data differs from the values at save time")
    return {
        "save_blocking_s": t1 - t0,
        "save_commit_s": t2 - t0,
        "restore_s": t4 - t3,
        "save_peak_host_gb": (saving.peak - base) / 2**30,
        "restore_peak_host_gb": (restoring.peak - base_restore) / 2**30,
        "d2h_gbps": d2h,
        "h2d_gbps": h2d,
        "tree_bytes": nbytes,
        "device": str(jax.devices()[0].device_kind),
    }


def run_child(system, workload, root, scale, timeout):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        system,
        workload,
        root,
        "--scale",
        str(scale),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    marked = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not marked:
        return {"error": "\n".join(proc.stderr.splitlines()[-15:])}
    return json.loads(marked[-1][len(RESULT_MARK) :])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--workloads", nargs="+", default=["big", "small"])
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--quick", action="store_true", help="1 run at 1/16 scale (smoke test)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(RESULT_MARK + json.dumps(child(*args.child, args.scale)), flush=True)
        return 0
    if args.quick:
        args.runs, args.scale = 1, 1 / 16
    work = tempfile.mkdtemp(prefix="gpu_compare_", dir=os.environ.get("BENCH_DIR"))
    records = []
    try:
        for run in range(args.runs):
            for workload in args.workloads:
                for system in ("asyncckpt", "orbax"):
                    root = os.path.join(work, f"{workload}-{system}-{run}")
                    r = run_child(system, workload, root, args.scale, args.timeout)
                    shutil.rmtree(root, ignore_errors=True)
                    records.append({"run": run, "workload": workload, "system": system, **r})
                    print(json.dumps(records[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = next((r["device"] for r in records if "device" in r), "?")
    print(f"\ndevice: {device}; medians over {args.runs} runs; restore in a warm process")
    for workload in args.workloads:
        print(f"== {workload} ==\n{'metric':<22}{'asyncckpt':>11}{'orbax':>11}{'ratio':>8}")
        for m in METRICS:
            vals = [
                [r[m] for r in records if r["workload"] == workload and r["system"] == s and m in r]
                for s in ("asyncckpt", "orbax")
            ]
            a, o = (statistics.median(v) if v else float("nan") for v in vals)
            print(f"{m:<22}{a:>11.3f}{o:>11.3f}{a / o if o else float('nan'):>8.2f}")
        for system in ("asyncckpt", "orbax"):
            mine = [r for r in records if r["workload"] == workload and r["system"] == system]
            mine = [r for r in mine if "error" not in r]
            if not mine:
                continue
            med = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "device"}
            d2h_s = med["tree_bytes"] / (med["d2h_gbps"] * 1e9)
            restore_gbps = med["tree_bytes"] / med["restore_s"] / 1e9
            print(
                f"{system}: link {med['d2h_gbps']:.1f} GB/s to host, {med['h2d_gbps']:.1f} GB/s "
                f"to device; blocking = {med['save_blocking_s'] / d2h_s:.2f}x one device-to-host "
                f"copy of the tree; restore {restore_gbps:.1f} GB/s = "
                f"{restore_gbps / med['h2d_gbps']:.0%} of host-to-device"
            )
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
