"""Multi-tier checkpoints: local saves with copies on peers, and recovery from the local tiers
against a restore of the same step from the persistent tier.

A job of 4 real processes (`jax.distributed` on a loopback coordinator, gloo, 2 CPU devices
each, a 4x2 mesh), ~1 GiB of float32 state fully sharded (each shard on one process: FSDP), each
process with its own local directory (under BENCH_DIR, or the system's temporary directory). The
persistent tier is moto's S3 server on 127.0.0.1 (it shares this machine's 2 cores), as fast as
it goes, or, with `--persistent-mb-s N`, behind a proxy that limits the bandwidth all processes
share to N MB/s (benchmarks/throttle.py): a store shared with many other hosts. Each phase is a
fresh job (4 new processes):

- save (`local_replicas=2`, and again with `local_replicas=1` into other directories, the same
  kind of persistent tier): steps 1-8, persistent every 8 (steps 1 and 8), local every step, 2
  kept. Steps 2-3: blocking (inside `save()`) and commit (until `wait_until_finished()`), local
  only. Steps 4-6: a fixed jitted training loop right after `save()`; "training" is
  (blocking + loop) over the same loop with no save (median of 3 idle loops).
- recover, local: a new job restores the newest step (8) from the local tiers.
- recover, one host lost: process 2's local directory is wiped first; process 3 sends it the
  copies of its shards (through collectives), and the job restores.
- recover, persistent: a new job restores step 8 from S3 (a manager without a local tier).

Recovery times run from creating the manager to the restored arrays being ready, the slowest
process's (the job goes on when all have). Every restore is checked value by value.

    python benchmarks/multitier.py --runs 3 [--scale 1.0] [--persistent-mb-s 100] [--local-buffered]
    python benchmarks/multitier.py --quick      # 1 run, 1/16 of the state (smoke)
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

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 4
MARK = "MULTITIER-RESULT "


# -- child: one process of the job ------------------------------------------------------------


class Workload:
    """The state saved: float32 matrices of one shape and sharding, each value a function of
    (array, step, position), so that every process can check any shard it restores."""

    def __init__(self, names: list[str], shape: tuple[int, int], sharding) -> None:
        self.names, self.shape, self.sharding = names, shape, sharding

    def value(self, i: int, step: int, index):
        import numpy as np

        (r, c), (rows, cols) = index, self.shape
        base = np.arange(r.start or 0, r.stop or rows, dtype=np.float32)[:, None] * cols
        base = base + np.arange(c.start or 0, c.stop or cols, dtype=np.float32)[None, :]
        return base + np.float32(i * 1000 + step)

    def state(self, step: int) -> dict:
        import jax

        return {
            n: jax.make_array_from_callback(
                self.shape, self.sharding, lambda idx, i=i: self.value(i, step, idx)
            )
            for i, n in enumerate(self.names)
        }

    def abstract(self) -> dict:
        import jax
        import numpy as np

        return {
            n: jax.ShapeDtypeStruct(self.shape, np.float32, sharding=self.sharding)
            for n in self.names
        }

    def check(self, restored: dict, step: int) -> None:
        import numpy as np

        for i, n in enumerate(self.names):
            for shard in restored[n].addressable_shards:
                want = self.value(i, step, shard.index)
                np.testing.assert_array_equal(np.asarray(shard.data), want)


def child(args) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    if os.environ.get("MULTITIER_LOG"):  # e.g. MULTITIER_LOG=INFO: asyncckpt's log on stderr
        import logging

        logging.basicConfig(level=os.environ["MULTITIER_LOG"], format="%(message)s")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=PROCESSES,
        process_id=args.process,
    )
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import asyncckpt as ac

    mesh = jax.make_mesh((PROCESSES, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    rows, cols = shape_of(args)
    names = [f"w{i:04d}" for i in range(args.leaves)]

    work = Workload(names, (rows, cols), sharding)
    local = os.path.join(args.dir, f"local{args.tag}-{args.process}")
    if os.environ.get("MULTITIER_LOCAL_BUFFERED"):  # --local-buffered
        ac.configure_storage(args.dir, direct_io=False)
    out: dict = {}
    if args.phase == "save":
        sys.path.insert(0, HERE)
        from compare_orbax import make_train_loop

        train, _ = make_train_loop(mesh)
        mgr = ac.CheckpointManager(
            args.persistent,
            save_interval_steps=8,
            local_directory=local,
            local_max_to_keep=2,
            local_replicas=args.replicas,
        )
        from jax.experimental import multihost_utils

        # every process is set up before any loop is timed (the loop has no collective of its
        # own, so processes would drift apart), and before any save: no writeback behind them
        multihost_utils.sync_global_devices("idle")
        idle = [train() for _ in range(3)]
        blocking, commit, busy = [], [], []
        for step in range(1, 9):
            tree = work.state(step)
            multihost_utils.sync_global_devices(f"step {step}")
            t0 = time.perf_counter()
            mgr.save(step, tree)
            t1 = time.perf_counter()
            if step in (4, 5, 6):
                train()
                busy.append(time.perf_counter() - t0)
            mgr.wait_until_finished()
            t2 = time.perf_counter()
            if step in (2, 3):
                blocking.append(t1 - t0)
                commit.append(t2 - t0)
        mgr.close()
        out = {
            "blocking_s": statistics.median(blocking),
            "commit_s": statistics.median(commit),
            "training": statistics.median(busy) / statistics.median(idle),
        }
    else:
        # the clock starts at the manager's creation: asyncckpt loads its modules on first use
        # (and compiles them there where PYTHONDONTWRITEBYTECODE is set), so load them first
        manager = ac.CheckpointManager
        t0 = time.perf_counter()
        if args.phase == "persistent":
            mgr = manager(args.persistent, read_only=True)
        else:
            mgr = manager(args.persistent, local_directory=local, local_max_to_keep=2)
        restored = mgr.restore(8 if args.phase == "persistent" else None, work.abstract())
        jax.block_until_ready(restored)
        out = {"recover_s": time.perf_counter() - t0}
        source = mgr.last_restore_stats().path
        mgr.close()
        work.check(restored, 8)
        out["tier"] = "local" if source.startswith(local) else "persistent"
    finish_child(MARK, out)


def finish_child(mark: str, out: dict) -> None:
    """End a child process of a job: wait for every process (nobody leaves while others still
    work), leave the job cleanly, print the result after `mark`, exit. Leaving cleanly first
    matters: process 0 runs JAX's coordination service, and when it exits before the others
    are done with it JAX aborts them, possibly after they printed their result."""
    import jax
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
    print(mark + json.dumps(out), flush=True)
    os._exit(0)  # no interpreter teardown (Orbax's and gloo's threads)


# -- driver ----------------------------------------------------------------------------------


def run_job(phase: str, directory: str, persistent: str, args, replicas=2, tag="") -> dict:
    argv = ["--phase", phase, "--dir", directory, "--persistent", persistent]
    argv += ["--scale", str(args.scale), "--replicas", str(replicas), "--tag", tag]
    return run_processes(__file__, argv + ["--leaves", str(args.leaves)], MARK, phase)


def run_processes(
    script: str, argv: list[str], mark: str, what: str, processes: int = PROCESSES
) -> dict:
    """Run `script --child --process I --port P *argv` in `processes` processes; their results
    (the JSON after `mark` on stdout) merged: the slowest process's times, the sum of their
    byte counts (keys ending in `_bytes`), the first's others."""
    sys.path.insert(0, HERE)
    from object_store import free_port

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--child", "--process", str(i), "--port", port, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith(mark)]
        if p.returncode != 0 or not lines:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{what} failed:\n{out[-4000:]}")
        results.append(json.loads(lines[-1][len(mark) :]))
        if os.environ.get("MULTITIER_LOG"):
            logged = [ln for ln in out.splitlines() if ln.startswith("asyncckpt:")]
            print("\n".join(f"  [{what} {len(results) - 1}] {ln}" for ln in logged), flush=True)
    merged = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key.endswith("_bytes"):
            merged[key] = sum(values)
        else:
            merged[key] = max(values) if isinstance(values[0], float) else values[0]
    return merged


def one_run(args, run: int) -> dict:
    sys.path.insert(0, HERE)
    from object_store import free_port, start_server

    server, endpoint = start_server()  # a fresh server per run: moto keeps every object in memory
    proxy = None
    if args.persistent_mb_s:  # the store as slow as one whose bandwidth many hosts share
        port = free_port()
        proxy = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "throttle.py"), str(port)]
            + [endpoint.rsplit(":", 1)[1], str(args.persistent_mb_s)]
        )
        wait_for_port(port)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"  # the children's store
    directory = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
    try:
        url = f"s3://asyncckpt-bench/run{run}"
        saved = run_job("save", directory, url, args, replicas=2)
        plain = run_job("save", directory, f"{url}-r1", args, 1, tag="r1")
        local = run_job("local", directory, url, args)
        shutil.rmtree(os.path.join(directory, "local-2"))  # process 2's host was replaced
        peer = run_job("peer", directory, url, args)
        persistent = run_job("persistent", directory, url, args)
        assert local["tier"] == peer["tier"] == "local", (local, peer)
        assert persistent["tier"] == "persistent", persistent
        return {
            "blocking_r2": saved["blocking_s"],
            "blocking_r1": plain["blocking_s"],
            "commit_r2": saved["commit_s"],
            "commit_r1": plain["commit_s"],
            "training_r2": saved["training"],
            "training_r1": plain["training"],
            "recover_local": local["recover_s"],
            "recover_peer": peer["recover_s"],
            "recover_persistent": persistent["recover_s"],
        }
    finally:
        server.kill()
        if proxy is not None:
            proxy.kill()
        shutil.rmtree(directory, ignore_errors=True)


def shape_of(args) -> tuple[int, int]:
    """Each array's shape: 1 GiB (times --scale) split into --leaves arrays of 4096 columns."""
    return max(8, int(2048 * 32 * args.scale / args.leaves) // 8 * 8), 4096


def wait_for_port(port: int) -> None:
    import socket

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the throttling proxy did not start on port {port}")


def run_phase(
    script: str, mark: str, system: str, phase: str, directory: str, args, processes=PROCESSES
) -> dict:
    """One phase of `system` as a job of `processes` processes of `script` (`run_processes`)."""
    argv = ["--system", system, "--phase", phase, "--dir", directory, "--scale", str(args.scale)]
    return run_processes(script, argv, mark, f"{system} {phase}", processes)


def job_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a multi-process benchmark (this one, multitier_orbax.py,
    multiprocess.py): the driver's and those a child process gets (`run_processes`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="1 run, 1/16 of the state")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--process", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser


def job_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`parser`'s arguments, `--quick` applied."""
    args = parser.parse_args()
    if args.quick:
        args.runs, args.scale = 1, 1 / 16
    return args


def side_by_side(
    doc: str, child, one_run, header, arguments=None
) -> tuple[argparse.Namespace, dict[str, list[dict]]]:
    """The main of a benchmark of both systems in multi-process jobs: a child process runs
    `child(args)` and exits; the driver prints `header(args)`, then runs `one_run(system,
    args)` `--runs` times for each, alternating which goes first, printing each result.
    `arguments(parser)` adds the benchmark's own options. Returns the arguments and the
    results by system."""
    parser = job_parser(doc)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    if arguments is not None:
        arguments(parser)
    args = job_args(parser)
    if args.child:
        child(args)
        sys.exit(0)
    print(header(args), flush=True)
    results: dict[str, list[dict]] = {"asyncckpt": [], "orbax": []}
    for run in range(args.runs):
        for system in ("asyncckpt", "orbax") if run % 2 == 0 else ("orbax", "asyncckpt"):
            results[system].append(one_run(system, args))
            print(f"run {run} {system}: {json.dumps(results[system][-1])}", flush=True)
    return args, results


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--persistent")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--leaves", type=int, default=32, help="arrays the state is split into")
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--persistent-mb-s",
        type=float,
        default=0,
        help="limit the persistent tier (moto) to this many MB/s, shared by all processes "
        "(benchmarks/throttle.py); 0: no limit",
    )
    parser.add_argument(
        "--local-buffered",
        action="store_true",
        help="local tiers write through the page cache (configure_storage(..., direct_io=False))",
    )
    args = job_args(parser)
    if args.child:
        child(args)
        return
    if args.local_buffered:  # the children read it from their environment
        os.environ["MULTITIER_LOCAL_BUFFERED"] = "1"
    rows, cols = shape_of(args)
    gib = args.leaves * rows * cols * 4 / (1 << 30)
    print(
        f"{PROCESSES} processes x 2 CPU devices, {gib:.2f} GiB of float32 state in "
        f"{args.leaves} arrays of {rows} x {cols}, FSDP"
    )
    runs = []
    for run in range(args.runs):
        runs.append(one_run(args, run))
        print(f"run {run}: {json.dumps(runs[-1])}", flush=True)
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedians of {args.runs} runs")
    print("| | local_replicas=2 | local_replicas=1 | ratio |\n|---|---|---|---|")
    for label, key in (("blocking", "blocking"), ("commit", "commit"), ("training", "training")):
        a, b = m[f"{key}_r2"], m[f"{key}_r1"]
        unit = "x" if key == "training" else " s"
        print(f"| {label} | {a:.3f}{unit} | {b:.3f}{unit} | {a / b:.2f} |")
    persistent = "persistent tier (S3, moto"
    persistent += f", {args.persistent_mb_s:g} MB/s shared)" if args.persistent_mb_s else ")"
    print("\n| recovery of step 8 | time | / persistent |\n|---|---|---|")
    for label, key in (
        ("local tiers intact", "recover_local"),
        ("one host's local directory lost", "recover_peer"),
        (persistent, "recover_persistent"),
    ):
        print(f"| {label} | {m[key]:.2f} s | {m[key] / m['recover_persistent']:.2f} |")


if __name__ == "__main__":
    main()
