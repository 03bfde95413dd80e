"""Real multi-process runs: `jax.distributed` on a loopback coordinator, one machine."""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from distributed import launch  # noqa: E402

import asyncckpt as ac  # noqa: E402


def finish(procs, timeout=180):
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.timeout(240)
def test_processes_agree_on_the_preemption_step(tmp_path):
    outputs = finish(launch("preempt_child.py", 2, str(tmp_path)))
    steps = [int(re.search(r"preempted at (\d+)", out).group(1)) for out in outputs]
    assert steps[0] == steps[1] >= 20, steps
    assert all("alive" in out for out in outputs)
    for i in range(2):
        with ac.CheckpointManager(tmp_path / str(i), read_only=True) as mgr:
            assert mgr.all_steps() == [steps[0]]
