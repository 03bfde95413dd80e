"""Incremental saves: what a step costs when most of the state did not change, side by side
with orbax-checkpoint, and what the hashing costs when everything changed.

Two workloads on 8 CPU devices (a 4x2 mesh), each saved every step by a `CheckpointManager`
while a jitted train step donates the whole state between saves:

- `lora`: a 1 GiB frozen float32 base in 64 leaves, rank-8 adapters on each (~10 MiB) and their
  Adam moments: what a LoRA fine-tune saves;
- `big`: 48 float32 matrices (~1 GiB), every one changed by every step.

Systems, each in its own fresh process per run: `asyncckpt` (incremental, the default),
`asyncckpt-full` (`incremental=False`) and `orbax` (async `CheckpointManager`, `StandardSave`).
Per step after the first: blocking (inside `save()`), commit (from `save()` to committed, after
`wait_until_finished()`), and the bytes the step added on disk (allocated blocks of the files of
the step whose inodes no other step on disk has). Medians over the steps of a run, then over
`--runs` runs; runs alternate the systems. Every step is kept unless `--max-to-keep` says
otherwise (then each commit time includes the deletion of an old step, on both sides).

    python benchmarks/incremental.py --runs 3 [--steps 6] [--max-to-keep 3] [--slowdown-reps 3]
    python benchmarks/incremental.py --quick --runs 1 --steps 3 --slowdown-reps 1   # smoke run

After the timed steps, `--slowdown-reps` more saves each run `compare_orbax.py`'s fixed jitted
training loop while they are written; "training while saving" is that loop's median time over
the same loop's once the save is committed.
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

SYSTEMS = ("asyncckpt", "asyncckpt-full", "orbax")


def build(workload: str, quick: bool = False):
    """(initial state, jitted step that donates it). `quick`: 64x fewer bytes (the smoke run)."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    sharded = NamedSharding(mesh, P("x", "y"))
    if workload == "big":
        keys = jax.random.split(jax.random.key(0), 48)
        shape = (256, 352) if quick else (2048, 2816)
        state = {f"w{i:02d}": jax.random.normal(k, shape) for i, k in enumerate(keys)}
        state = jax.device_put(state, sharded)

        @functools.partial(jax.jit, donate_argnums=0)
        def step_fn(s):
            return jax.tree.map(lambda w: w + 1e-3, s)

        return state, step_fn
    keys = jax.random.split(jax.random.key(0), 64)
    rows, cols = (128, 512) if quick else (1024, 4096)
    base = {f"w{i:02d}": jax.random.normal(k, (rows, cols)) for i, k in enumerate(keys)}
    base = jax.device_put(base, sharded)
    adapters = {n: {"a": jnp.zeros((cols, 8)), "b": jnp.full((8, rows), 0.01)} for n in base}
    tx = optax.adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(s):
        grads = jax.tree.map(lambda a: jnp.ones_like(a) * jnp.sum(a[:1]) + 1.0, s["adapters"])
        updates, opt = tx.update(grads, s["opt"], s["adapters"])
        return {**s, "adapters": optax.apply_updates(s["adapters"], updates), "opt": opt}

    return {"base": base, "adapters": adapters, "opt": tx.init(adapters)}, step_fn


def new_bytes(root: str, step: int) -> int:
    """Allocated bytes of the files of `root/step` whose inodes no other step dir has."""
    others: set[int] = set()
    mine: dict[int, int] = {}
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        for folder, _, files in os.walk(os.path.join(root, name)):
            for f in files:
                st = os.stat(os.path.join(folder, f))
                if name == str(step):
                    mine[st.st_ino] = st.st_blocks * 512
                else:
                    others.add(st.st_ino)
    return sum(size for ino, size in mine.items() if ino not in others)


def child(args) -> None:
    import jax

    state, step_fn = build(args.workload, args.quick)
    if args.system == "orbax":
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True, max_to_keep=args.max_to_keep
        )
        mgr = ocp.CheckpointManager(args.root, options=options)

        def save(step, tree):
            mgr.save(step, args=ocp.args.StandardSave(tree))
    else:
        import asyncckpt as ac

        mgr = ac.CheckpointManager(
            args.root, max_to_keep=args.max_to_keep, incremental=args.system == "asyncckpt"
        )

        def save(step, tree):
            mgr.save(step, tree)

    records = []
    for step in range(1, args.steps + 1):
        state = jax.block_until_ready(step_fn(state))
        t0 = time.perf_counter()
        save(step, state)
        t1 = time.perf_counter()
        mgr.wait_until_finished()
        t2 = time.perf_counter()
        record = {
            "step": step,
            "blocking_s": t1 - t0,
            "commit_s": t2 - t0,
            "new_bytes": new_bytes(args.root, step),
        }
        if args.system != "orbax":  # asyncckpt's own phases, to see where the time goes
            stats = mgr.last_save_stats()
            record.update(
                write_s=stats.write_s, sync_commit_s=stats.commit_s, stats_total_s=stats.total_s
            )
        records.append(record)
    # Training slowdown: a fixed jitted loop (compare_orbax's) while a save of a fresh step is
    # in the background, over the same loop once that save is committed.
    from compare_orbax import make_train_loop

    train, _ = make_train_loop(state_mesh(state))
    idle, busy = [train()], []
    for rep in range(args.slowdown_reps):
        state = jax.block_until_ready(step_fn(state))
        save(args.steps + 1 + rep, state)
        busy.append(train())
        mgr.wait_until_finished()
        idle.append(train())
    mgr.close()
    slowdown = statistics.median(busy) / statistics.median(idle)
    for record in records:
        record["slowdown"] = slowdown
    print(json.dumps(records))


def state_mesh(state):
    import jax

    return next(
        leaf.sharding.mesh for leaf in jax.tree.leaves(state) if hasattr(leaf.sharding, "mesh")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workloads", default="lora,big")
    parser.add_argument(
        "--max-to-keep",
        type=int,
        default=None,
        help="retention on both sides (default: keep every step, so that commit times hold no "
        "deletions)",
    )
    parser.add_argument(
        "--slowdown-reps",
        type=int,
        default=3,
        help="saves after the timed steps, each with the training loop running behind it",
    )
    parser.add_argument(
        "--quick", action="store_true", help="64x smaller trees: the smoke run of the test suite"
    )
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--system")
    parser.add_argument("--workload")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for workload in args.workloads.split(","):
        systems = SYSTEMS if workload == "lora" else ("asyncckpt", "asyncckpt-full")
        for run in range(args.runs):
            for system in systems if run % 2 == 0 else reversed(systems):
                root = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
                try:
                    cmd = [sys.executable, __file__, "--child", "--system", system]
                    cmd += ["--workload", workload, "--root", root, "--steps", str(args.steps)]
                    cmd += ["--slowdown-reps", str(args.slowdown_reps)]
                    cmd += ["--quick"] if args.quick else []
                    if args.max_to_keep is not None:
                        cmd += ["--max-to-keep", str(args.max_to_keep)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                os.sync()
                records = json.loads(out.strip().splitlines()[-1])[1:]  # after the first step
                run_medians = {
                    k: statistics.median(r[k] for r in records)
                    for k in ("blocking_s", "commit_s", "new_bytes", "slowdown")
                }
                results.setdefault((workload, system), []).append(run_medians)
                print(workload, system, run, json.dumps(run_medians), flush=True)
    for workload in args.workloads.split(","):
        print(f"\n{workload}: medians over {args.runs} runs of the per-step medians (steps 2+)")
        print(
            "| system | blocking | commit | new bytes per step | training while saving |\n"
            "|---|---|---|---|---|"
        )
        table = {}
        for (w, system), runs in results.items():
            if w != workload:
                continue
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            table[system] = m
            print(
                f"| {system} | {m['blocking_s']:.3f} s | {m['commit_s']:.3f} s | "
                f"{m['new_bytes'] / (1 << 20):.1f} MiB | {m['slowdown']:.3f}x |"
            )
        base = "orbax" if "orbax" in table else "asyncckpt-full"
        ours = table["asyncckpt"]
        excess = (ours["slowdown"] - 1) / max(1e-9, table[base]["slowdown"] - 1)
        print(
            f"asyncckpt / {base}: commit {ours['commit_s'] / table[base]['commit_s']:.3f}, "
            f"new bytes {ours['new_bytes'] / max(1, table[base]['new_bytes']):.4f}, "
            f"blocking {ours['blocking_s'] / table[base]['blocking_s']:.2f}, "
            f"training while saving {ours['slowdown'] / table[base]['slowdown']:.3f} "
            f"(slowdown excess {excess:.2f})"
        )


if __name__ == "__main__":
    main()
