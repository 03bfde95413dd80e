"""Crash safety, for real: a saving process is killed with SIGKILL at random moments.

After every kill a fresh manager must list only committed steps, restore each of them bit for
bit, hold every step that retention must keep, and leave no debris behind."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import asyncckpt as ac

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
sys.path.insert(0, HELPERS)
import crash_child  # noqa: E402


def kept_after(step):
    """The steps a manager with the child's policies holds once `step` is committed and
    retention has run (steps 1..step were all committed, in order)."""
    recent = {s for s in (step - 1, step) if s >= 1}
    return recent | {s for s in range(1, step + 1) if s % crash_child.KEEP_EVERY == 0}


def start_child(directory):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HELPERS, "crash_child.py"), directory],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise AssertionError(f"child failed to start: {line}{proc.stderr.read()}")
    return proc


def check_directory(directory, before, everything=False):
    """What a resuming job sees, given the steps `before` the last run; returns the debris the
    kill left (before clean-up) and the steps now. Steps from before the run are checked
    against their hashes when they are the latest two (what a job resumes from) or
    `everything` is set; new steps bit for bit too."""
    debris = [n for n in os.listdir(directory) if ".asyncckpt-" in n]
    with ac.CheckpointManager(directory) as mgr:  # a writer: cleans the debris up
        steps = mgr.all_steps()
        assert [n for n in os.listdir(directory) if ".asyncckpt-" in n] == []
        if steps:
            latest = steps[-1]
            assert kept_after(latest) <= set(steps), (steps, kept_after(latest))
            # retention of the latest step may not have run (killed right after its commit);
            # if the run was killed so before the retention of its first save, the steps from
            # before the run are all still there too (the next save's retention removes them)
            allowed = kept_after(latest) | kept_after(latest - 1) | before
            assert set(steps) <= allowed, (steps, allowed)
            for step in steps:
                # every file whole, hashes included: a deletion never took a file a step
                # shares; the hashes are the committed ones, so a step checked bit for bit
                # after an earlier run is still what it was
                if everything or step not in before or step in steps[-2:]:
                    ac.verify(os.path.join(directory, str(step)))
                if step in before:
                    continue
                got = mgr.restore(step)
                want = crash_child.state_at(step)
                assert got["step"] == step
                assert got["big"].tobytes() == want["big"].tobytes()
                for name, value in want["small"].items():
                    np.testing.assert_array_equal(got["small"][name], value)
                assert got["frozen"]["big"].tobytes() == want["frozen"]["big"].tobytes()
                for name, value in want["frozen"]["small"].items():
                    np.testing.assert_array_equal(got["frozen"]["small"][name], value)
            if len(steps) > 1:  # the frozen leaves are links shared by the steps
                frozen = os.path.join(directory, str(latest), "frozen", "big", "c.0.0")
                assert os.stat(frozen).st_nlink > 1
    return debris, set(steps)


@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_loses_nothing_committed(tmp_path):
    directory = str(tmp_path / "run")
    rng = random.Random(1234)
    seen = {"tmp": 0, "deleting": 0, "clean": 0}
    latest = []
    kills = 0
    steps: set[int] = set()
    while kills < 40 and (kills < 12 or not (seen["tmp"] and seen["deleting"])):
        proc = start_child(directory)
        time.sleep(rng.uniform(0.05, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        kills += 1
        debris, steps = check_directory(directory, steps)
        seen["tmp"] += any("asyncckpt-tmp-" in d for d in debris)
        seen["deleting"] += any("asyncckpt-deleting-" in d for d in debris)
        seen["clean"] += not debris
        with ac.CheckpointManager(directory, read_only=True) as reader:
            latest.append(reader.latest_step())
    check_directory(directory, steps, everything=True)  # the steps kept from early runs too
    print(f"kills={kills} seen={seen} latest={latest}")
    # the kills hit writes/commits and deletions, and the run made progress across restarts
    assert seen["tmp"] and seen["deleting"], seen
    assert latest[-1] is not None and latest[-1] >= 5, latest
