"""Child process of tests/test_crash.py: saves one step after another with a manager until it is
killed. Each run continues after the latest committed step. The state of a step is a pure
function of the step number, so the parent can check any restored step bit for bit."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import asyncckpt as ac

MAX_TO_KEEP = 2
KEEP_EVERY = 4


FROZEN = np.random.default_rng(12345).standard_normal((512, 2048), dtype=np.float32)


def state_at(step: int) -> dict:
    """Changing leaves, and frozen ones that incremental saves link from the step before (so
    kills land in links and in retention deleting steps that later steps share files with)."""
    rng = np.random.default_rng(step)
    small = {f"layer{i:03d}": rng.standard_normal(1024, dtype=np.float32) for i in range(300)}
    frozen_small = {f"f{i:02d}": FROZEN[i, :256] for i in range(50)}
    return {
        "small": small,
        "big": rng.standard_normal((1024, 2048), dtype=np.float32),
        "frozen": {"big": FROZEN, "small": frozen_small},
        "step": step,
    }


def main(directory: str) -> None:
    with ac.CheckpointManager(
        directory, max_to_keep=MAX_TO_KEEP, keep_every_n_steps=KEEP_EVERY
    ) as mgr:
        step = (mgr.latest_step() or 0) + 1
        print("ready", step, flush=True)
        while True:
            state = jax.tree.map(
                lambda v: jnp.asarray(v) if isinstance(v, np.ndarray) else v, state_at(step)
            )
            mgr.save(step, state)
            step += 1


if __name__ == "__main__":
    main(sys.argv[1])
