"""Object-store throughput against a local S3-protocol server (moto), in one run.

1. Store classes: zarr's `ObjectStore` over obstore against zarr's `FsspecStore` over s3fs, the
   two ways zarr reaches S3. Each writes then reads N objects with the same concurrency (every
   request in flight at once, bounded by a semaphore), as a checkpoint's chunks would be.
2. asyncckpt end to end: `CheckpointManager("s3://...")` saves the benchmark's big tree (~1 GiB
   float32, 48 sharded matrices, 8 simulated CPU devices), then a fresh process restores it;
   MB/s of data. Every restored leaf is checked against the seeded values.

moto keeps objects in memory and runs in its own process, so the figures say how fast the client
side goes, not what a real bucket allows; the server shares this machine's CPUs.

Usage:  python benchmarks/object_store.py [--scale 1.0] [--runs 3] [--concurrency 16]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

BUCKET = "asyncckpt-bench"
MB = 1e6
RESULT_MARK = "BENCH-RESULT "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return proc, endpoint


def open_store(kind: str, endpoint: str):
    if kind == "obstore":
        import obstore.store
        from zarr.storage import ObjectStore

        return ObjectStore(obstore.store.from_url(f"s3://{BUCKET}"))
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(
        f"s3://{BUCKET}",
        storage_options={"endpoint_url": endpoint, "key": "bench", "secret": "bench"},
    )


async def put_get(store, prefix: str, count: int, size: int, concurrency: int) -> dict:
    import numpy as np
    from zarr.core.buffer import cpu, default_buffer_prototype

    data = cpu.Buffer.from_array_like(
        np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    )
    limit = asyncio.Semaphore(concurrency)

    async def put(i: int) -> None:
        async with limit:
            await store.set(f"{prefix}/{i}", data)

    async def get(i: int) -> int:
        async with limit:
            buf = await store.get(f"{prefix}/{i}", default_buffer_prototype())
            return len(buf)

    t0 = time.perf_counter()
    await asyncio.gather(*(put(i) for i in range(count)))
    t1 = time.perf_counter()
    sizes = await asyncio.gather(*(get(i) for i in range(count)))
    t2 = time.perf_counter()
    assert sizes == [size] * count
    return {"put_MBps": count * size / MB / (t1 - t0), "get_MBps": count * size / MB / (t2 - t1)}


def stores_child(kind: str, endpoint: str, count: int, size: int, concurrency: int) -> dict:
    from zarr.core.sync import sync

    store = open_store(kind, endpoint)
    prefix = f"{kind}-{count}x{size}-{os.urandom(4).hex()}"
    return sync(put_get(store, prefix, count, size, concurrency))


def asyncckpt_child(phase: str, url: str, scale: float) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    from workloads import abstract_tree, build_tree, tree_nbytes, verify, workload_specs

    import asyncckpt as ac

    specs = workload_specs("big", scale)
    nbytes = tree_nbytes(specs)
    if phase == "save":
        tree = build_tree(specs, 0)
        with ac.CheckpointManager(url) as mgr:
            t0 = time.perf_counter()
            mgr.save(1, tree)
            t1 = time.perf_counter()
            mgr.wait_until_finished()
            t2 = time.perf_counter()
        return {"blocking_s": t1 - t0, "commit_s": t2 - t0, "save_MBps": nbytes / MB / (t2 - t0)}
    with ac.CheckpointManager(url, read_only=True) as mgr:
        t0 = time.perf_counter()
        restored = jax.block_until_ready(mgr.restore(1, abstract_tree(specs)))
        t1 = time.perf_counter()
    verify(restored, specs, 0)
    return {"restore_s": t1 - t0, "restore_MBps": nbytes / MB / (t1 - t0)}


def run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"child {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="size of the big tree (1.0: 1 GiB)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "stores":
            result = stores_child(
                rest[0], os.environ["AWS_ENDPOINT_URL"], int(rest[1]), int(rest[2]), int(rest[3])
            )
        else:
            result = asyncckpt_child(rest[0], rest[1], float(rest[2]))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    server, endpoint = start_server()
    try:
        print(f"moto S3 server at {endpoint}; runs={args.runs} concurrency={args.concurrency}")
        cases = [(64, 16 << 20), (2000, 16 << 10)]
        for count, size in cases:
            rows = {}
            for _ in range(args.runs):
                for kind in ("obstore", "fsspec"):
                    r = run_child(["stores", kind, str(count), str(size), str(args.concurrency)])
                    for k, v in r.items():
                        rows.setdefault((kind, k), []).append(v)
            print(f"\n{count} objects x {size / 1024:.0f} KiB, medians of {args.runs} (MB/s):")
            for kind in ("obstore", "fsspec"):
                print(
                    f"  {kind:8s} put {statistics.median(rows[(kind, 'put_MBps')]):8.1f}   "
                    f"get {statistics.median(rows[(kind, 'get_MBps')]):8.1f}"
                )
        results: dict[str, list[float]] = {}
        for run in range(args.runs):
            url = f"s3://{BUCKET}/asyncckpt-big-{run}"
            for phase in ("save", "restore"):
                for k, v in run_child(["asyncckpt", phase, url, str(args.scale)]).items():
                    results.setdefault(k, []).append(v)
        print(f"\nasyncckpt, big tree (scale {args.scale}) to and from S3, medians of {args.runs}:")
        for k, v in results.items():
            print(
                f"  {k:14s} {statistics.median(v):8.3f}   (all: {', '.join(f'{x:.3f}' for x in v)})"
            )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
