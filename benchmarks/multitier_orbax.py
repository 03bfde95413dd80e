"""Multi-tier checkpoints side by side: asyncckpt's node-local tier against Orbax's emergency
`CheckpointManager` (orbax.checkpoint.experimental.emergency), on the layout Orbax's supports.

Orbax's emergency manager needs the state replicated along a replica axis of the mesh: the
devices of replica 0 write the persistent tier only, the other replicas their local
directories only, and a local step is restored when some replica holds all of it. So the job
here is data parallel across replicas: 4 real processes (`jax.distributed`, gloo, 2 CPU devices
each) on a 2x4 mesh ("replica", "x"), 2 replicas of 2 processes; ~1 GiB of float32 state
sharded over "x" within a replica (each process holds 512 MiB); each process its own local
directory; the persistent tier a directory on the same disk for both (Orbax's goes through
TensorStore, not our S3 client). For asyncckpt every shard has two holders already, so
`local_replicas=2` sends nothing at save time.

Each phase is a fresh job (4 new processes), for each system:
- save: steps 1-8, local every step, persistent every 8; blocking (inside `save()`) and commit
  (until `wait_until_finished()`) of the local-only steps 2-3.
- recover, local: a new job restores the newest step (8).
- recover, one host lost: process 2's local directory is wiped first.
- recover, persistent: every local directory is wiped first.
Recovery runs from creating the manager to the restored arrays being ready (the slowest
process); every restore is checked value by value, and reports which tier it came from.

    python benchmarks/multitier_orbax.py --runs 3 [--scale 1.0]
    python benchmarks/multitier_orbax.py --quick      # 1 run, 1/16 of the state (smoke)
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 4
MARK = "MULTITIER-ORBAX-RESULT "
ARRAYS = 32


def child(args) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=PROCESSES,
        process_id=args.process,
    )
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("replica", "x"))
    sharding = NamedSharding(mesh, P(None, "x"))
    rows, cols = max(8, int(2048 * args.scale)), 4096
    names = [f"w{i:02d}" for i in range(ARRAYS)]

    sys.path.insert(0, HERE)
    from multitier import Workload

    work = Workload(names, (rows, cols), sharding)
    abstract = work.abstract()
    local = os.path.join(args.dir, f"{args.system}-local-{args.process}")
    persistent = os.path.join(args.dir, f"{args.system}-persistent")
    os.makedirs(local, exist_ok=True)
    os.makedirs(persistent, exist_ok=True)
    # both libraries are imported before the clock starts: recovery runs from creating the
    # manager (asyncckpt loads its modules on first use, and where PYTHONDONTWRITEBYTECODE is
    # set it compiles them there, while Orbax's come compiled from the wheel)
    if args.system == "asyncckpt":
        import asyncckpt as ac

        manager = ac.CheckpointManager
    else:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # the emergency manager reads absl flags
        import orbax.checkpoint as ocp
        from orbax.checkpoint._src.multihost import multihost
        from orbax.checkpoint.experimental.emergency import checkpoint_manager as ecm

    t0 = time.perf_counter()
    if args.system == "asyncckpt":
        mgr = manager(persistent, save_interval_steps=8, local_directory=local, local_max_to_keep=2)

        def save(step: int, tree: dict) -> None:
            mgr.save(step, tree)

        def restore(step: int) -> tuple[dict, str]:
            restored = mgr.restore(step, abstract)
            where = mgr.last_restore_stats().path
            return restored, "local" if where.startswith(local) else "persistent"

        latest = mgr.latest_step
    else:
        multihost.initialize_runtime_to_distributed_ids()  # as Orbax's own benchmark does
        multihost.initialize_distributed_to_device_ids()
        options = ecm.CheckpointManagerOptions(
            local=ecm.LocalCheckpointOptions(save_interval_steps=1, max_to_keep=2),
            persistent=ecm.PersistentCheckpointOptions(save_interval_steps=8),
            replica_axis_index=0,
        )
        mgr = ecm.CheckpointManager(
            local, persistent, global_mesh=mesh, abstract_state=abstract, options=options
        )

        def save(step: int, tree: dict) -> None:
            mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))

        def restore(step: int) -> tuple[dict, str]:
            inner = mgr._checkpoint_manager  # which tier it will use (a collective call)
            local_source = inner._find_slice_with_complete_local_checkpoint(step) >= 0
            return mgr.restore(step).state, "local" if local_source else "persistent"

        def latest() -> int:
            return int(mgr.latest_step())

    out: dict = {}
    if args.phase == "save":
        multihost_utils.sync_global_devices("ready")
        blocking, commit = [], []
        for step in range(1, 9):
            tree = work.state(step)
            multihost_utils.sync_global_devices(f"step {step}")
            t1 = time.perf_counter()
            save(step, tree)
            t2 = time.perf_counter()
            mgr.wait_until_finished()
            t3 = time.perf_counter()
            if step in (2, 3):
                blocking.append(t2 - t1)
                commit.append(t3 - t1)
        out = {"blocking_s": statistics.median(blocking), "commit_s": statistics.median(commit)}
    else:
        step = int(latest())
        restored, tier = restore(step)
        jax.block_until_ready(restored)
        out = {"recover_s": time.perf_counter() - t0, "tier": tier, "step": step}
        work.check(restored, 8)
    mgr.close()
    sys.path.insert(0, HERE)
    from multitier import finish_child

    finish_child(MARK, out)


def run_job(system: str, phase: str, directory: str, args) -> dict:
    sys.path.insert(0, HERE)
    from multitier import run_phase

    return run_phase(__file__, MARK, system, phase, directory, args)


def one_run(system: str, args) -> dict:
    directory = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
    try:
        saved = run_job(system, "save", directory, args)
        local = run_job(system, "local", directory, args)
        shutil.rmtree(os.path.join(directory, f"{system}-local-2"))  # a replaced host
        peer = run_job(system, "peer", directory, args)
        for i in range(PROCESSES):
            shutil.rmtree(os.path.join(directory, f"{system}-local-{i}"), ignore_errors=True)
        persistent = run_job(system, "persistent", directory, args)
        assert local["step"] == peer["step"] == persistent["step"] == 8
        assert persistent["tier"] == "persistent", persistent
        return {
            "blocking": saved["blocking_s"],
            "commit": saved["commit_s"],
            "recover_local": local["recover_s"],
            "tier_local": local["tier"],
            "recover_peer": peer["recover_s"],
            "tier_peer": peer["tier"],
            "recover_persistent": persistent["recover_s"],
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    sys.path.insert(0, HERE)
    from multitier import side_by_side

    def header(args) -> str:
        gib = ARRAYS * max(8, int(2048 * args.scale)) * 4096 * 4 / (1 << 30)
        return f"{PROCESSES} processes x 2 CPU devices, 2 replicas, {gib:.2f} GiB of float32 state"

    args, runs = side_by_side(__doc__, child, one_run, header)

    def median(system: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[system])

    def tiers(system: str, key: str) -> str:
        return "/".join(sorted({r[key] for r in runs[system]}))

    print(f"\nmedians of {args.runs} runs (alternating)")
    print("| | asyncckpt | orbax emergency | ratio |\n|---|---|---|---|")
    rows = [
        ("blocking (local step)", "blocking", None),
        ("commit (local step)", "commit", None),
        ("recovery, local tiers intact", "recover_local", "tier_local"),
        ("recovery, one host's local directory lost", "recover_peer", "tier_peer"),
        ("recovery, persistent tier", "recover_persistent", None),
    ]
    for label, key, tier in rows:
        a, o = median("asyncckpt", key), median("orbax", key)
        wa = f" ({tiers('asyncckpt', tier)})" if tier else ""
        wo = f" ({tiers('orbax', tier)})" if tier else ""
        print(f"| {label} | {a:.3f} s{wa} | {o:.3f} s{wo} | {a / o:.2f} |")


if __name__ == "__main__":
    main()
