"""Train an MLP with optax, checkpointing with asyncckpt's CheckpointManager; resume on restart.

    python examples/train_mlp.py [--dir /tmp/asyncckpt-mlp] [--steps 300] [--save-every 50]

Stop it at any moment (Ctrl-C, `kill`, even `kill -9`) and run the same command again: it restores
the parameters, the Adam state, the step and the PRNG key from the latest committed step, and the
loss curve goes on exactly where that checkpoint left off. On SIGTERM (what a scheduler sends
before preempting a job) it saves the current step and exits. `--fresh` starts over.

The state is sharded over every local device (8 simulated CPU devices unless XLA_FLAGS says
otherwise): wide matrices by columns, everything else replicated. `mgr.save()` returns once the
state is copied to host memory, so the next training step, which donates the state, runs while
the checkpoint is written in the background.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import time

if "XLA_FLAGS" not in os.environ:  # simulate 8 devices on a CPU-only machine
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

SIZES = (32, 256, 256, 1)
BATCH = 256
optimizer = optax.adam(1e-3)


def init_state(seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(SIZES))
    params = [
        {"w": jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in), "b": jnp.zeros(n_out)}
        for k, n_in, n_out in zip(keys[1:], SIZES[:-1], SIZES[1:])
    ]
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.int32(0),
        "key": keys[0],
    }


def shardings(tree, mesh):
    """Shard matrices whose columns split evenly over the devices; replicate the rest."""

    def one(x):
        if x.ndim == 2 and x.shape[1] % mesh.size == 0:
            return NamedSharding(mesh, P(None, "d"))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def batch(key):
    """Synthetic regression data: a fixed smooth function of 32 random inputs."""
    x = jax.random.normal(key, (BATCH, SIZES[0]))
    teacher = jax.random.normal(jax.random.key(42), (SIZES[0], 8))
    return x, jnp.sin(x @ teacher).sum(axis=1, keepdims=True) / 4


def loss_fn(params, x, y):
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    prediction = x @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((prediction - y) ** 2)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state):
    key, sub = jax.random.split(state["key"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], *batch(sub))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "key": key}, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/asyncckpt-mlp", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=300, help="train until this step")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the directory first")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(args.dir, ignore_errors=True)

    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    abstract = jax.eval_shape(init_state, args.seed)
    state_shardings = shardings(abstract, mesh)
    with ac.CheckpointManager(
        args.dir,
        max_to_keep=3,
        keep_every_n_steps=100,
        best_metric="loss",
        save_interval_steps=args.save_every,
    ) as mgr:
        latest = mgr.latest_step()
        if latest is None:
            state = jax.jit(init_state, static_argnums=0, out_shardings=state_shardings)(args.seed)
            print(f"starting from scratch; checkpoints go to {args.dir}", flush=True)
        else:
            target = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                abstract,
                state_shardings,
            )
            state = mgr.restore(latest, target=target)
            print(
                f"resumed from step {latest} of {args.dir} (loss there: "
                f"{mgr.metrics(latest)['loss']:.6f})",
                flush=True,
            )

        step = int(state["step"])
        while step < args.steps:
            state, loss = train_step(state)
            step += 1
            if step % args.log_every == 0:
                print(f"step {step} loss {float(loss):.6f}", flush=True)
            t0 = time.perf_counter()
            if mgr.save(step, state, metrics={"loss": loss}):
                print(
                    f"  saved step {step}; save() blocked "
                    f"{1e3 * (time.perf_counter() - t0):.1f} ms",
                    flush=True,
                )
            if mgr.reached_preemption(step):
                print(f"SIGTERM: step {step} saved, exiting", flush=True)
                break
        else:
            mgr.wait_until_finished()
            if mgr.latest_step() != step:  # keep the final state too, even off-interval
                mgr.save(step, state, metrics={"loss": loss}, force=True)
    # leaving the block waited for the last save to commit and for retention
    print(
        f"stopped at step {step}; steps on disk: {mgr.all_steps()}, best (lowest loss): "
        f"step {mgr.best_step()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
