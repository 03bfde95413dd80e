"""Train a Flax NNX model on a grain data pipeline; the data position is saved with each step.

    python examples/train_grain.py [--dir /tmp/asyncckpt-grain] [--steps 200] [--save-every 20]

Kill it at any moment (`kill -9` included) and run the same command again: the model, the Adam
state, the dropout key *and the data iterator* come back from the latest committed step, so the
resumed run sees exactly the batches the killed one would have seen next, and its losses are the
same bit for bit. The iterator's state is part of the saved tree (`{"model": ..., "data":
iterator}`): asyncckpt stores what `get_state()` returns in the step's own root document, so it
commits with that step's arrays and can never come from another step.

Each printed line names the batch by the sum of its record indices, to compare data order.
"""

from __future__ import annotations

import argparse
import os
import shutil

if "XLA_FLAGS" not in os.environ:  # simulate 8 devices on a CPU-only machine
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

RECORDS, FEATURES, BATCH = 4096, 32, 64


class Records(grain.sources.RandomAccessDataSource):
    """A synthetic data set: record i is a fixed function of i."""

    def __len__(self) -> int:
        return RECORDS

    def __repr__(self) -> str:  # grain checks that a saved state belongs to this source by it
        return f"Records({RECORDS}, {FEATURES})"

    def __getitem__(self, index: int) -> dict:
        x = np.random.default_rng(index).standard_normal(FEATURES, dtype=np.float32)
        return {"index": np.int64(index), "x": x, "y": np.sin(x[:4]).sum(keepdims=True)}


def data_loader(seed: int) -> grain.DataLoader:
    return grain.DataLoader(
        data_source=Records(),
        sampler=grain.samplers.IndexSampler(RECORDS, shuffle=True, seed=seed, num_epochs=None),
        operations=[grain.transforms.Batch(BATCH, drop_remainder=True)],
        worker_count=0,
    )


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, 128, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(128, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.dropout(nnx.gelu(self.hidden(x))))


def create(seed: int) -> tuple[Model, nnx.Optimizer]:
    model = Model(nnx.Rngs(seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/asyncckpt-grain", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=200, help="train until this step")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the directory first")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(args.dir, ignore_errors=True)

    mesh = jax.make_mesh((len(jax.devices()),), ("batch",))
    data_sharding = NamedSharding(mesh, P("batch"))  # the model is replicated: data parallel
    data = iter(data_loader(args.seed))
    with (
        jax.set_mesh(mesh),
        ac.CheckpointManager(args.dir, max_to_keep=2, save_interval_steps=args.save_every) as mgr,
    ):
        step = mgr.latest_step() or 0
        if step:
            # the abstract model under the mesh: restore puts every variable on it; the
            # iterator in the target gets the saved position through its `set_state`
            graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create(args.seed)))
            restored = mgr.restore(step, target={"model": abstract, "data": data})
            model, optimizer = nnx.merge(graphdef, restored["model"])
            print(f"resumed from step {step} of {args.dir}", flush=True)
        else:
            model, optimizer = create(args.seed)
            print(f"starting from scratch; checkpoints go to {args.dir}", flush=True)

        while step < args.steps:
            batch = next(data)
            x, y = (jax.device_put(batch[k], data_sharding) for k in ("x", "y"))
            loss = train_step(model, optimizer, x, y)
            step += 1
            print(
                f"step {step} data {int(batch['index'].sum())} loss {float(loss):.8f}", flush=True
            )
            mgr.save(step, {"model": nnx.state((model, optimizer)), "data": data})
            if mgr.reached_preemption(step):
                print(f"SIGTERM: step {step} saved, exiting", flush=True)
                break
        else:
            mgr.wait_until_finished()
            if mgr.latest_step() != step:  # keep the final state too, even off-interval
                mgr.save(step, {"model": nnx.state((model, optimizer)), "data": data}, force=True)
    print(f"stopped at step {step}; steps on disk: {mgr.all_steps()}", flush=True)


if __name__ == "__main__":
    main()
