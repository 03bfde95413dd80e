"""Loading Hugging Face weights onto 8 devices: asyncckpt against the safetensors package.

Writes a ~1 GiB `.safetensors` file shaped like a small LLM's weights (a bf16 embedding, bf16
attention/MLP matrices, f32 norms), then loads it onto a mesh of 8 devices in fresh processes,
alternating the two ways, `--runs` times each:

- `asyncckpt`: `ac.load_safetensors(path, target)`, each shard's byte runs read straight into
  its buffer;
- `safetensors`: `safetensors.numpy.load_file(path)`, then `jax.device_put` of each tensor onto
  its sharding (what a JAX user writes with the package).

Matrices alternate between a row split and a column split over the 8 devices. Each child prints
its wall time (load and placement, `block_until_ready`), its peak RSS above the RSS after
imports, and a fingerprint of the result, which must agree between the two ways. `--cold` drops
the file's pages from the page cache before each load (`posix_fadvise(DONTNEED)`).

    python benchmarks/safetensors_load.py --runs 3 [--cold] [--gib 1.0]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HIDDEN = 2048


def layout(gib: float) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype): an embedding and as many layers as fill `gib`."""
    tensors = {"model.embed_tokens.weight": ((32000, HIDDEN), "bfloat16")}
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * 4 * HIDDEN)  # bf16 bytes of one layer
    layers = max(1, int((gib * (1 << 30) - 32000 * HIDDEN * 2) // per_layer))
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{name}.weight"] = ((HIDDEN, HIDDEN), "bfloat16")
        tensors[f"{p}.mlp.gate_proj.weight"] = ((4 * HIDDEN, HIDDEN), "bfloat16")
        tensors[f"{p}.mlp.up_proj.weight"] = ((4 * HIDDEN, HIDDEN), "bfloat16")
        tensors[f"{p}.mlp.down_proj.weight"] = ((HIDDEN, 4 * HIDDEN), "bfloat16")
        tensors[f"{p}.input_layernorm.weight"] = ((HIDDEN,), "float32")
    tensors["model.norm.weight"] = ((HIDDEN,), "float32")
    return tensors


def write(path: str, gib: float) -> int:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    arrays = {}
    for name, (shape, dtype) in layout(gib).items():
        values = rng.standard_normal(shape, dtype=np.float32)
        arrays[name] = values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    save_file(arrays, path)
    return sum(a.nbytes for a in arrays.values())


def shardings(mesh, tensors):
    """Matrices alternate row / column splits over the 8 devices; vectors are replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    out = {}
    for i, (name, (shape, _)) in enumerate(sorted(tensors.items())):
        spec = P() if len(shape) == 1 else P("d", None) if i % 2 else P(None, "d")
        out[name] = NamedSharding(mesh, spec)
    return out


def child(args) -> None:
    import resource

    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    import asyncckpt as ac

    tensors = layout(args.gib)
    mesh = jax.make_mesh((8,), ("d",))
    placed = shardings(mesh, tensors)
    jax.block_until_ready(jax.device_put(np.ones(8), placed["model.norm.weight"]))  # warm up
    if args.cold:
        fd = os.open(args.path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.way == "asyncckpt":
        target = {
            name: jax.ShapeDtypeStruct(
                shape, ml_dtypes.bfloat16 if dt == "bfloat16" else dt, sharding=placed[name]
            )
            for name, (shape, dt) in tensors.items()
        }
        # the names are the target's keys: map each one to itself
        result = ac.load_safetensors(args.path, target, names=lambda n: n)
    else:
        from safetensors.numpy import load_file

        loaded = load_file(args.path)
        result = {name: jax.device_put(value, placed[name]) for name, value in loaded.items()}
        del loaded
    jax.block_until_ready(result)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    fingerprint = {
        name: float(jnp.sum(value.astype(jnp.float32)))
        for name, value in sorted(result.items())[:: max(1, len(result) // 8)]
    }
    print(json.dumps({"seconds": seconds, "peak_rss_kib": peak, "fingerprint": fingerprint}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--child", choices=["asyncckpt", "safetensors"], dest="way")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.way:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = os.path.join(tmp, "model.safetensors")
        size = write(path, args.gib)
        print(f"{path}: {len(layout(args.gib))} tensors, {size / (1 << 30):.3f} GiB", flush=True)
        results: dict[str, list[dict]] = {"asyncckpt": [], "safetensors": []}
        for _ in range(args.runs):
            for way in results:
                cmd = [sys.executable, __file__, "--child", way, "--path", path]
                cmd += ["--gib", str(args.gib)] + (["--cold"] if args.cold else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[way].append(json.loads(out.strip().splitlines()[-1]))
                print(way, results[way][-1]["seconds"], flush=True)
    fingerprints = {json.dumps(r["fingerprint"]) for rs in results.values() for r in rs}
    assert len(fingerprints) == 1, "the two ways loaded different values"
    print(f"\n{'cold' if args.cold else 'warm'} page cache, medians of {args.runs}:")
    print("| | asyncckpt | safetensors + device_put | ratio |\n|---|---|---|---|")
    for key, unit, scale in (("seconds", "s", 1), ("peak_rss_kib", "GiB", 1 / (1 << 20))):
        a = statistics.median(r[key] for r in results["asyncckpt"]) * scale
        b = statistics.median(r[key] for r in results["safetensors"]) * scale
        print(f"| {key} | {a:.3f} {unit} | {b:.3f} {unit} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
