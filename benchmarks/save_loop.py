"""What each save of a training loop costs: CPU time and time to commit, save after save.

A diagnostic for single changes to the save path (asyncckpt only; the side-by-side figures
come from compare_orbax.py). Each fresh process opens one `CheckpointManager` (`max_to_keep=1`,
so every save reuses the chunks of the step before where they are the same, and writes over
the files of the step deleted before it), changes the tree (`x + 1` on every leaf, as training
does), saves, and polls every 10 ms until the step is committed, without waiting inside the
library; `--load` runs the jitted training loop of compare_orbax.py between the polls instead,
keeping every core busy, and reports the training time each save cost (`lost`: the time to
commit minus the loop steps run meanwhile times an idle step). The first two saves of a process
are left out. With several `--src`, the checkouts take turns, process by process.

    python benchmarks/save_loop.py --workload small
    python benchmarks/save_loop.py --workload small --src /tmp/before --src . --rounds 4
    python benchmarks/save_loop.py --load --asyncckpt-options '{"durable_within_s": 0}'
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SKIPPED = 2  # saves of each process left out: the first writes every file, the second links


def child(args) -> None:
    import jax
    from compare_orbax import make_train_loop
    from workloads import build_tree, make_mesh, workload_specs

    import asyncckpt as ac

    tree = build_tree(workload_specs(args.workload, args.scale), args.seed)
    _, train = make_train_loop(make_mesh())  # compare_orbax.py's training loop: train(n steps)
    step_s = statistics.median(train(30) / 30 for _ in range(3))

    def bump(t):
        return jax.tree.map(lambda a: a + 1, t)

    options = json.loads(args.asyncckpt_options)
    with ac.CheckpointManager(args.root, max_to_keep=1, **options) as mgr:
        for step in range(args.saves):
            tree = jax.block_until_ready(bump(tree))
            trained = 0
            c0 = time.process_time()
            t0 = time.perf_counter()
            mgr.save(step, tree)
            blocking = time.perf_counter() - t0
            while (stats := mgr.last_save_stats()) is None or stats.step != step:
                if args.load:
                    train(3)
                    trained += 3
                else:
                    time.sleep(0.01)
            commit = time.perf_counter() - t0
            cpu = time.process_time() - c0
            record = {"step": step, "blocking_s": blocking, "commit_s": commit, "cpu_s": cpu}
            if args.load:  # the process's CPU time is mostly the loop's then
                record = {**record, "cpu_s": None, "lost_s": commit - trained * step_s}
            print(json.dumps(record), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("big", "small", "llm"), default="small")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--saves", type=int, default=10, help="saves per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per checkout")
    p.add_argument("--load", action="store_true", help="the training loop runs between polls")
    p.add_argument("--asyncckpt-options", default="{}", help="JSON: CheckpointManager options")
    p.add_argument(
        "--src", action="append", help="import asyncckpt from this checkout (repeat to compare)"
    )
    p.add_argument("--dir", help="where the checkpoints go (default: a new dir under /tmp)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    json.loads(args.asyncckpt_options)  # fail here, not in every child
    if args.saves <= SKIPPED:
        sys.exit(f"--saves must be more than {SKIPPED}: the first {SKIPPED} are left out")
    sources = args.src or [None]
    workdir = tempfile.mkdtemp(prefix="save_loop_", dir=args.dir)
    results: list[list[dict]] = [[] for _ in sources]
    try:
        for _ in range(args.rounds):
            for k, src in enumerate(sources):
                env = dict(os.environ)
                if src is not None:
                    path = env.get("PYTHONPATH", "")
                    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + path
                root = os.path.join(workdir, "run")
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--root", root]
                for flag in ("workload", "scale", "seed", "saves", "asyncckpt_options"):
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
                cmd += ["--load"] if args.load else []
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                records = [json.loads(line) for line in out.stdout.splitlines()]
                results[k] += records[SKIPPED:]
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.workload}, {args.saves - SKIPPED} saves x {args.rounds} processes each,"
        f" {'training loop between polls' if args.load else 'idle'},"
        f" options {args.asyncckpt_options}; medians:"
    )
    for src, records in zip(sources, results):
        line = [f"{'this checkout' if src is None else src}:"]
        for key in ("blocking_s", "commit_s", "cpu_s", "lost_s"):
            values = [r[key] for r in records if r.get(key) is not None]
            if values:
                line.append(f"{key[:-2]} {statistics.median(values):.3f} s")
        print("  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
