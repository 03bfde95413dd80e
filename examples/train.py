"""Train a small MLP on synthetic data, checkpointing asynchronously, then resume from disk.

    python examples/train.py [--steps 300] [--every 100] [--dir /tmp/asyncckpt-example]

The training state (params, Adam moments, step, PRNG key) is sharded over every local device.
`save()` returns once the state is copied to host memory, so the next (donating) training step
runs while the checkpoint is written in the background.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

if "XLA_FLAGS" not in os.environ:  # simulate 8 devices on a CPU-only machine
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

WIDTH = 256


def init_state(mesh):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "dense1": {"w": jax.random.normal(k1, (16, WIDTH)) * 0.2, "b": jnp.zeros(WIDTH)},
        "dense2": {"w": jax.random.normal(k2, (WIDTH, 1)) * 0.05, "b": jnp.zeros(1)},
    }
    def zeros():
        return jax.tree.map(jnp.zeros_like, params)

    state = {"params": params, "mu": zeros(), "nu": zeros(), "step": jnp.int32(0), "key": k3}
    return jax.device_put(state, shardings(mesh, state))


def shardings(mesh, state):
    def one(path, x):
        if x.ndim == 2 and x.shape[0] % mesh.size == 0:
            return NamedSharding(mesh, P("d", None))  # shard rows over all devices
        return NamedSharding(mesh, P())  # small leaves: replicated

    return jax.tree_util.tree_map_with_path(one, state)


def loss_fn(params, x, y):
    h = jax.nn.relu(x @ params["dense1"]["w"] + params["dense1"]["b"])
    return jnp.mean((h @ params["dense2"]["w"] + params["dense2"]["b"] - y) ** 2)


@jax.jit
def batch(key):
    x = jax.random.normal(key, (512, 16))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


@jax.jit(donate_argnums=0)
def train_step(state):
    key, sub = jax.random.split(state["key"])
    x, y = batch(sub)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y)
    step = state["step"] + 1
    mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state["mu"], grads)
    nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, state["nu"], grads)
    t = step.astype(jnp.float32)
    params = jax.tree.map(
        lambda p, m, v: p - 1e-2 * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8),
        state["params"], mu, nu,
    )
    return {"params": params, "mu": mu, "nu": nu, "step": step, "key": key}, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="asyncckpt-example-")
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    state = init_state(mesh)

    with ac.AsyncCheckpointer() as ckptr:
        for _ in range(args.steps):
            state, loss = train_step(state)
            step = int(state["step"])
            if step % args.every == 0:
                t0 = time.perf_counter()
                path = os.path.join(root, f"step_{step}")
                ckptr.save(path, state, metadata={"loss": float(loss)})
                print(f"step {step}: loss {float(loss):.4f}, save() blocked "
                      f"{1e3 * (time.perf_counter() - t0):.1f} ms")
    # Leaving the block waited for every save to commit.

    last = os.path.join(root, f"step_{args.steps - args.steps % args.every}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    resumed = ac.restore(last, abstract)
    print(f"restored {last}: step {int(resumed['step'])}, saved loss "
          f"{ac.read_metadata(last)['loss']:.4f}")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
        assert a.sharding == b.sharding and a.dtype == b.dtype
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    print("variables:", ", ".join(f"{n} {v.shape}" for n, v in ac.list_variables(last).items()))
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
