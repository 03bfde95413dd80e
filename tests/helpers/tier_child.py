"""Child of test_multitier.py: one process of a `jax.distributed` job with a node-local tier.

    tier_child.py PROCESS_ID NUM_PROCESSES PORT MODE DIR [LAYOUT]

Each process has its own local directory, `DIR/local-<process>`; the persistent tier is
`DIR/persistent`. Modes: `save` (steps 1-6: persistent every 4, local every step, 2 kept),
`die` (step 7, local only: process 1 SIGKILLs itself while writing its local chunks),
`restore` (the latest step, onto the saved shardings: printed with the tier it came from),
`reshard` (the latest step onto another sharding of the matrix), `resume` (the latest step
restored, then two more saved), `slow-peer` (step 7, local only: every copy a process receives
is pulled 2 s late, and the saved matrix is donated right after `save()`), `mute` (step 9,
local only: process 1 never offers its shards for its peer's copy), `grain-save` and
`grain-restore` (steps 1-3 with each process's data iterator; the latest restored into a new
iterator; both print the next batch).
LAYOUT: `fsdp` (the matrix sharded over every device: each shard on one process, copied to the
next process's local tier by `local_replicas=2`, the default), `dp` (sharded over "y" only:
every process holds a replica of it) or `mixed` (fsdp, and the arrays of EXTRA).
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
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from values import TIMEOUT_S, abstract_tree, check_tree, global_tree  # noqa: E402

import asyncckpt as ac  # noqa: E402

mesh = jax.make_mesh((jax.process_count(), 2), ("x", "y"))
spec = P("x", "y") if layout in ("fsdp", "mixed") else P(None, "y")
local = os.path.join(directory, f"local-{jax.process_index()}")


# `mixed`: more arrays. The copies for local_replicas send "sub" round by round, not in one
# program: its mesh holds the devices of processes 0 and 1 only.
half = Mesh(np.array([d for d in jax.devices() if d.process_index < 2]), ("x",))
EXTRA = {
    "sub": ((8, 6), NamedSharding(half, P("x"))),
    "rows": ((8, 6), NamedSharding(mesh, P("x"))),
}


def extra_value(name, step):
    shape = EXTRA[name][0]
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * (1 + len(name)) + step


def with_extra(tree, step, abstract=False):
    if layout != "mixed":
        return tree
    for name, (shape, sharding) in EXTRA.items():
        value = extra_value(name, step)
        tree[name] = (
            jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)
            if abstract
            else jax.make_array_from_callback(
                shape, sharding, lambda i, v=value: v[i], dtype=value.dtype
            )
        )
    return tree


def check_extra(tree, step):
    for name in EXTRA if layout == "mixed" else ():
        for shard in tree[name].addressable_shards:
            want = extra_value(name, step)[shard.index]
            np.testing.assert_array_equal(np.asarray(shard.data), want, name)


def manager():
    return ac.CheckpointManager(
        os.path.join(directory, "persistent"),
        save_interval_steps=4,
        local_directory=local,
        local_max_to_keep=2,
        barrier_timeout_s=TIMEOUT_S,
    )


def save_or_say_why(mgr, step):
    """Save `step` and wait for it; a save that fails prints its error."""
    try:
        mgr.save(step, global_tree(mesh, step, spec))
        mgr.wait_until_finished()
    except ac.CheckpointError as e:
        print("error:", e, flush=True)


if mode == "save":
    with manager() as mgr:
        for step in range(1, 7):
            mgr.save(step, with_extra(global_tree(mesh, step, spec), step))
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
    save_or_say_why(manager(), 7)
    print("listing", sorted(os.listdir(local)), flush=True)
    os._exit(0)  # process 1 is gone; do not wait for it in jax.distributed's shutdown
elif mode == "slow-peer":  # step 7, local only: the copies each process receives come 2 s late
    import time

    from asyncckpt import _transfer

    real_pull = _transfer._Batch._pull

    def late_pull(self):
        time.sleep(2)
        return real_pull(self)

    _transfer._Batch._pull = late_pull
    overwrite = jax.jit(lambda x: x * 0 - 1, donate_argnums=0)
    with manager() as mgr:
        tree = global_tree(mesh, 7, spec)
        t0 = time.perf_counter()
        mgr.save(7, tree)
        took = time.perf_counter() - t0
        # the saved matrix donated and overwritten while its copies still wait to be pulled
        tree["matrix"] = overwrite(tree["matrix"])
        jax.block_until_ready(tree["matrix"])
        mgr.wait_until_finished()
        print(f"save returned in {took:.2f} s, committed in {time.perf_counter() - t0:.2f} s")
        threads = _transfer._peers().threads  # jaxlib's transfer threads: background priority
        idle = {os.sched_getscheduler(t) == os.SCHED_IDLE for t in threads}
        print("transfer threads at idle priority:", bool(threads) and idle == {True}, flush=True)
        print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
elif mode == "mute":  # step 9, local only: process 1 never offers its shards to its peer
    from asyncckpt import _transfer

    class Mute:
        def __init__(self, server):
            self.server = server

        def await_pull(self, *args, **kwargs):
            pass

        def connect(self, address):
            return self.server.connect(address)

    real_server = _transfer._Peers.server
    if jax.process_index() == 1:
        _transfer._Peers.server = lambda self, adopt: Mute(real_server(self, adopt))
    mgr = manager()
    save_or_say_why(mgr, 9)
    print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
    mgr.close()
elif mode == "resume":  # the latest step back, then two more steps saved
    with manager() as mgr:
        latest = mgr.restore(target=with_extra(abstract_tree(mesh, spec), 0, abstract=True))["step"]
        for step in range(latest + 1, latest + 3):
            mgr.save(step, with_extra(global_tree(mesh, step, spec), step))
        mgr.wait_until_finished()
        print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
elif mode in ("grain-save", "grain-restore"):  # each process has its own data iterator
    import grain

    it = iter(
        grain.DataLoader(
            data_source=list(range(400)),
            sampler=grain.samplers.IndexSampler(
                400, shard_options=grain.sharding.ShardByJaxProcess(), shuffle=True, seed=1
            ),
            operations=[grain.transforms.Batch(4)],
            worker_count=0,
        )
    )
    with manager() as mgr:
        if mode == "grain-save":
            for step in (1, 2, 3):
                next(it)
                mgr.save(step, {"tree": global_tree(mesh, step, spec), "data": it})
            mgr.wait_until_finished()
        else:
            restored = mgr.restore(target={"tree": abstract_tree(mesh, spec), "data": it})
            check_tree(restored["tree"], 3)
            tier = "local" if mgr.last_restore_stats().path.startswith(local) else "persistent"
            print(f"restored step 3 from {tier}", flush=True)
    print("next batch", next(it).tolist(), flush=True)
elif mode in ("restore", "reshard"):
    if mode == "reshard":
        spec = P("y", "x")
    with manager() as mgr:
        print("persistent", mgr.all_steps(), "local", mgr.local_steps(), flush=True)
        print("listing", sorted(os.listdir(local)), flush=True)
        restored = mgr.restore(target=with_extra(abstract_tree(mesh, spec), 0, abstract=True))
        step = restored["step"]  # the saved python int: which step came back
        check_tree(restored, step)
        check_extra(restored, step)
        tier = "local" if mgr.last_restore_stats().path.startswith(local) else "persistent"
        print(f"restored step {step} from {tier}", flush=True)
print("ok", flush=True)
