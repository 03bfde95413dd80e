"""Where asyncckpt's restore time goes: resume and warm restores in fresh processes, by phase.

A diagnostic for single changes (asyncckpt only; the side-by-side figures come from
compare_orbax.py). Saves one checkpoint of a compare_orbax workload, then runs `--runs` fresh
processes, each restoring it `--restores` times onto the saved shardings and printing
`last_restore_stats()`: plan (root document, buffers), read (chunks), place (device_put).

    python benchmarks/restore_phases.py --workload big --runs 3
    python benchmarks/restore_phases.py --workload llm --src /path/to/other/checkout
    python benchmarks/restore_phases.py --workload small --drop-caches   # resume from disk
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import machine  # noqa: E402


def child(args) -> None:
    import jax
    from workloads import abstract_tree, verify, workload_specs

    import asyncckpt as ac

    specs = workload_specs(args.workload, args.scale)
    target = abstract_tree(specs)
    with ac.CheckpointManager(args.root, read_only=True) as mgr:
        for i in range(args.restores):
            t0 = time.perf_counter()
            restored = jax.block_until_ready(mgr.restore(1, target))
            total = time.perf_counter() - t0
            s = mgr.last_restore_stats()
            if i == 0:
                verify(restored, specs, args.seed)
            del restored
            print(
                json.dumps(
                    {
                        "restore": i,
                        "total_s": total,
                        "plan_s": s.plan_s,
                        "read_s": s.read_s,
                        "place_s": s.place_s,
                        "bytes": s.bytes,
                    }
                ),
                flush=True,
            )


def save(args) -> None:
    from workloads import build_tree, workload_specs

    import asyncckpt as ac

    tree = build_tree(workload_specs(args.workload, args.scale), args.seed)
    with ac.CheckpointManager(args.root) as mgr:
        mgr.save(1, tree)
    os.sync()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("big", "small", "llm", "small_replicated"), default="big")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=3, help="fresh processes")
    p.add_argument("--restores", type=int, default=3, help="restores per process")
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache before each fresh process (needs root)",
    )
    p.add_argument("--src", help="import asyncckpt from this checkout (to compare two)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child or args.save:
        (child if args.child else save)(args)
        return 0
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.path.abspath(args.src) + os.pathsep + env.get("PYTHONPATH", "")
    base = [
        sys.executable,
        os.path.abspath(__file__),
        "--workload",
        args.workload,
        "--scale",
        str(args.scale),
        "--seed",
        str(args.seed),
    ]
    workdir = tempfile.mkdtemp(prefix="restore_phases_")
    root = os.path.join(workdir, "run")
    try:
        subprocess.run([*base, "--save", "--root", root], env=env, check=True)
        for run in range(args.runs):
            if args.drop_caches and (error := machine.drop_caches()):
                sys.exit(f"--drop-caches: {error}")  # a warm restore must not pass for a cold one
            out = subprocess.run(
                [*base, "--child", "--root", root, "--restores", str(args.restores)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for line in out.splitlines():
                r = json.loads(line)
                kind = "resume" if r["restore"] == 0 else "warm"
                print(
                    f"run {run} {kind:6s} total {r['total_s']:.3f} s  plan {r['plan_s']:.3f}"
                    f"  read {r['read_s']:.3f} ({r['bytes'] / r['read_s'] / 1e9:.2f} GB/s)"
                    f"  place {r['place_s']:.3f}"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
