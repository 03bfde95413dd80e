"""Child of test_multitier.py: one process of a `jax.distributed` job with a node-local tier.

    tier_child.py PROCESS_ID NUM_PROCESSES PORT MODE DIR [LAYOUT]

Each process has its own local directory, `DIR/local-<process>`; the persistent tier is
`DIR/persistent`. Modes: `save` (steps 1-6: persistent every 4, local every step, 2 kept),
`die` (step 7, local only: process 1 SIGKILLs itself while writing its local chunks),
`restore` (the latest step, onto the saved shardings: printed with the tier it came from),
`reshard` (the latest step onto another sharding of the matrix), `resume` (the latest step
restored, then two more saved).
LAYOUT: `fsdp` (the matrix sharded over every device: each shard on one process, copied to the
next process's local tier by `local_replicas=2`, the default) or `dp` (sharded over "y" only:
every process holds a replica of it).
"""

import logging
import os
import signal
import sys

from distributed import initialize

process_id, num_processes, port, mode, directory = sys.argv[1:6]
layout = sys.argv[6] if len(sys.argv) > 6 else "fsdp"
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("asyncckpt").setLevel(logging.INFO)  # which tier, and what came from peers
initialize(int(process_id), int(num_processes), int(port), local_devices=2)

import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from values import TIMEOUT_S, abstract_tree, check_tree, global_tree  # noqa: E402

import asyncckpt as ac  # noqa: E402

mesh = jax.make_mesh((jax.process_count(), 2), ("x", "y"))
spec = P("x", "y") if layout == "fsdp" else P(None, "y")
local = os.path.join(directory, f"local-{jax.process_index()}")


def manager():
    return ac.CheckpointManager(
        os.path.join(directory, "persistent"),
        save_interval_steps=4,
        local_directory=local,
        local_max_to_keep=2,
        barrier_timeout_s=TIMEOUT_S,
    )


if mode == "save":
    with manager() as mgr:
        for step in range(1, 7):
            mgr.save(step, global_tree(mesh, step, spec))
        mgr.wait_until_finished()
        print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
elif mode == "die":
    from asyncckpt._storage import Storage

    real = Storage.write_chunk

    def write_then_die(self, *args):
        if jax.process_index() == 1 and "local-" in self.url:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args)

    Storage.write_chunk = write_then_die
    mgr = manager()
    try:
        mgr.save(7, global_tree(mesh, 7, spec))
        mgr.wait_until_finished()
    except ac.CheckpointError as e:
        print("error:", e, flush=True)
    print("listing", sorted(os.listdir(local)), flush=True)
    os._exit(0)  # process 1 is gone; do not wait for it in jax.distributed's shutdown
elif mode == "resume":  # the latest step back, then two more steps saved
    with manager() as mgr:
        latest = mgr.restore(target=abstract_tree(mesh, spec))["step"]
        for step in range(latest + 1, latest + 3):
            mgr.save(step, global_tree(mesh, step, spec))
        mgr.wait_until_finished()
        print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
elif mode in ("restore", "reshard"):
    if mode == "reshard":
        spec = P("y", "x")
    with manager() as mgr:
        print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
        print("listing", sorted(os.listdir(local)), flush=True)
        restored = mgr.restore(target=abstract_tree(mesh, spec))
        step = restored["step"]  # the saved python int: which step came back
        check_tree(restored, step)
        tier = "local" if mgr.last_restore_stats().path.startswith(local) else "persistent"
        print(f"restored step {step} from {tier}", flush=True)
print("ok", flush=True)
