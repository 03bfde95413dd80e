"""Child of test_multiprocess.py: steps a loop until the manager says preemption was reached.

Process 1 sends itself SIGTERM at step 20; every process must stop at the same step, and the
forced save is a real multi-process save into the shared directory."""

import os
import signal
import sys
import time

from distributed import initialize

process_id, num_processes, port, directory = sys.argv[1:5]
initialize(int(process_id), int(num_processes), int(port), local_devices=2)

import asyncckpt as ac  # noqa: E402

with ac.CheckpointManager(directory, save_interval_steps=1000, barrier_timeout_s=30) as mgr:
    for step in range(1, 2000):
        time.sleep(0.01 * (1 + int(process_id)))  # the processes run at different speeds
        if step == 20 and process_id == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        if mgr.reached_preemption(step):
            mgr.save(step, {"step": step})
            print(f"preempted at {step}", flush=True)
            break
    mgr.wait_until_finished()
    print("steps", mgr.all_steps(), flush=True)
print("alive", flush=True)  # SIGTERM did not terminate the process
