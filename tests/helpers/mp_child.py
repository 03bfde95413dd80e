"""Child of test_multiprocess.py: one process of a `jax.distributed` job on CPU devices.

    mp_child.py PROCESS_ID NUM_PROCESSES PORT MODE DIR LOCAL_DEVICES

Modes: `save` (a tree and three manager steps), `restore` (onto another mesh, every addressable
shard checked), `partial` (restore a one-chunk array 8 ways, counting the bytes read), `die`
(process 1 SIGKILLs itself while writing its chunks), `fallback` (the latest step is damaged
where only process 1 reads: both fall back to the step before), `safetensors` (a safetensors
tensor split by columns over 8 devices, counting the bytes read), `grain` (each process's data
iterator saved with the steps and restored into it), `incremental` (each process links its own
shards of a frozen matrix), `readonce` (a tree restored replicated, replicated across processes
and split across them, counting the bytes each process reads)."""

import os
import signal
import sys

from distributed import initialize

process_id, num_processes, port, mode, directory, local = sys.argv[1:7]
initialize(int(process_id), int(num_processes), int(port), local_devices=int(local))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from values import (  # noqa: E402
    BIG,
    TIMEOUT_S,
    abstract_tree,
    check_tree,
    global_tree,
    global_value,
)

import asyncckpt as ac  # noqa: E402

mesh = jax.make_mesh((4, 2), ("x", "y"))
other = jax.make_mesh((2, 4), ("x", "y"))
ckpt = os.path.join(directory, "ckpt")

if mode == "save":
    ac.save(ckpt, global_tree(mesh))
    with ac.CheckpointManager(
        os.path.join(directory, "run"), max_to_keep=2, barrier_timeout_s=TIMEOUT_S
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, global_tree(mesh, step), metrics={"loss": 1.0 / step})
        mgr.wait_until_finished()
        print("steps", mgr.all_steps(), flush=True)
        check_tree(mgr.restore(target=abstract_tree(other, P("y", "x"))), 3)
        mgr.delete(2)
        print("after delete", mgr.all_steps(), flush=True)
elif mode == "restore":
    check_tree(ac.restore(ckpt, abstract_tree(other, P("y", "x"))))
    check_tree(ac.restore(ckpt, abstract_tree(mesh, P(None, "x"))))
elif mode == "partial":  # each device needs 1/8 of a one-chunk array: count what is read
    from counting import count_chunk_reads

    counted, _ = count_chunk_reads()
    flat = jax.make_mesh((8,), ("x",))
    big = BIG
    target = jax.ShapeDtypeStruct(big.shape, big.dtype, sharding=NamedSharding(flat, P("x")))
    restored = ac.restore(os.path.join(directory, "big"), {"big": target})["big"]
    for shard in restored.addressable_shards:
        assert (np.asarray(shard.data) == big[shard.index]).all()
    print("read", counted["bytes"], "of", big.nbytes, flush=True)
elif mode == "safetensors":  # a Hugging Face file, split by columns over 8 devices
    from counting import count_chunk_reads

    weights = np.arange(32 * 32768, dtype=np.float32).reshape(32, 32768)  # 16 KiB per device
    counted, _ = count_chunk_reads()
    flat = jax.make_mesh((8,), ("x",))
    target = {
        "model": {
            "w": jax.ShapeDtypeStruct(
                weights.shape, np.float32, sharding=NamedSharding(flat, P(None, "x"))
            )
        }
    }
    path = os.path.join(directory, "model.safetensors")
    restored = ac.restore(path, target, strict=False)["model"]["w"]
    for shard in restored.addressable_shards:
        assert (np.asarray(shard.data) == weights[shard.index]).all()
    print("read", counted["bytes"], "of", weights.nbytes, flush=True)
elif mode == "readonce":  # restore the READ_ONCE tree 3 ways, counting the bytes read
    from counting import count_chunk_reads
    from values import READ_ONCE

    counted, _ = count_chunk_reads()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    rows = jax.sharding.Mesh(np.array(devices).reshape(jax.process_count(), -1), ("x", "y"))
    for label, spec in (("replicated", P()), ("across", P("y")), ("split", P("x"))):
        target = {
            name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(rows, spec))
            for name, v in READ_ONCE.items()
        }
        before = counted["bytes"]
        restored = ac.restore(
            os.path.join(directory, "ckpt"), target, map_files=False, read_once=True
        )
        for name, want in READ_ONCE.items():
            assert restored[name].sharding == target[name].sharding, name
            assert restored[name].dtype == want.dtype, name
            for shard in restored[name].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], name)
        print("read", label, counted["bytes"] - before, flush=True)
elif mode == "grain":  # each process has its own data iterator (its shard of the records)
    import grain

    def data():
        return iter(
            grain.DataLoader(
                data_source=list(range(400)),
                sampler=grain.samplers.IndexSampler(
                    400,
                    shard_options=grain.sharding.ShardByJaxProcess(),
                    shuffle=True,
                    seed=1,
                    num_epochs=1,
                ),
                operations=[grain.transforms.Batch(4)],
                worker_count=0,
            )
        )

    run = os.path.join(directory, "run")
    it = data()
    with ac.CheckpointManager(run, barrier_timeout_s=TIMEOUT_S) as mgr:
        for step in (1, 2):
            next(it)
            mgr.save(step, {"tree": global_tree(mesh, step), "data": it})
        expected = [next(it).tolist() for _ in range(2)]
        mgr.wait_until_finished()
        again = data()
        restored = mgr.restore(2, {"tree": abstract_tree(other, P("y", "x")), "data": again})
        check_tree(restored["tree"], 2)
        assert [next(again).tolist() for _ in range(2)] == expected
        first = data()
        mgr.restore(1, {"tree": abstract_tree(mesh, P("x", "y")), "data": first})
        reference = data()
        next(reference)
        assert next(first).tolist() == next(reference).tolist()
    print("next batch", expected[0], flush=True)
elif mode == "incremental":  # a frozen global matrix: each process links its own shards
    run = os.path.join(directory, "run")
    frozen = global_tree(mesh, 0)["matrix"]
    with ac.CheckpointManager(run, barrier_timeout_s=TIMEOUT_S) as mgr:
        for step in (1, 2):
            mgr.save(step, {"frozen": frozen, "tree": global_tree(mesh, step)})
            mgr.wait_until_finished()
            print("step", step, "reused", mgr.last_save_stats().reused_bytes, flush=True)
        restored = mgr.restore(
            2,
            {
                "frozen": abstract_tree(other, P("y", "x"))["matrix"],
                "tree": abstract_tree(other, P("y", "x")),
            },
        )
        check_tree(restored["tree"], 2)
        for shard in restored["frozen"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), global_value(0)[shard.index])
elif mode == "fallback":  # only process 1 reads the damaged chunk of the latest step
    from jax.experimental import multihost_utils

    run = os.path.join(directory, "run")
    with ac.CheckpointManager(run, barrier_timeout_s=TIMEOUT_S) as mgr:
        for step in (1, 2):
            mgr.save(step, global_tree(mesh, step))
        mgr.wait_until_finished()
        sharding = NamedSharding(mesh, P("x", "y"))
        index = next(
            i for d, i in sharding.devices_indices_map((16, 24)).items() if d.process_index == 1
        )
        chunk = os.path.join(run, "2", "matrix", f"c.{index[0].start // 4}.{index[1].start // 12}")
        if jax.process_index() == 0:
            with open(chunk, "r+b") as f:
                f.write(b"\xff")
        multihost_utils.sync_global_devices("damaged")
        restored = mgr.restore(target=abstract_tree(mesh, P("x", "y")), fall_back=True)
        check_tree(restored, 1)
        print("restored step", restored["step"], "steps", mgr.all_steps(), flush=True)
elif mode in ("die", "die0"):  # process 1 (die) or process 0 (die0) dies mid-save
    from asyncckpt._storage import Storage

    real = Storage.write_chunk
    victim = 1 if mode == "die" else 0

    def write_then_die(*args):
        if jax.process_index() == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    Storage.write_chunk = write_then_die
    try:
        with ac.AsyncCheckpointer(barrier_timeout_s=TIMEOUT_S) as ckptr:
            ckptr.save(ckpt, global_tree(mesh))
    except ac.CheckpointError as e:
        print("error:", e, flush=True)
    print("listing", sorted(os.listdir(directory)), flush=True)
    os._exit(0)  # process 1 is gone; do not wait for it in jax.distributed's shutdown
print("ok", flush=True)
