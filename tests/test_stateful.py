"""A model-based test of the manager: random sequences of save, restore, delete, reopen and
"kill a writer process mid-save"; the set of committed steps and their contents must always
equal the model's."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import asyncckpt as ac


def tree(value: int):
    return {
        "a": np.full((64, 8), value, np.float32),
        "b": [np.arange(3, dtype=np.int32) + value, {"c": np.float64(value) / 7}],
    }


def same(got, value):
    want = tree(value)
    return (
        np.asarray(got["a"]).tobytes() == want["a"].tobytes()
        and np.asarray(got["b"][0]).tobytes() == want["b"][0].tobytes()
        and float(got["b"][1]["c"]) == float(want["b"][1]["c"])
    )


WRITER = textwrap.dedent("""
    import sys, numpy as np, asyncckpt as ac
    directory, step, value = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    big = np.full((8192, 1024), value, np.float32)  # 32 MiB: the save takes a while
    with ac.CheckpointManager(directory) as mgr:
        print("ready", flush=True)
        mgr.save(step, {"a": np.full((64, 8), value, np.float32),
                        "b": [np.arange(3, dtype=np.int32) + value,
                              {"c": np.float64(value) / 7}], "big": big})
""")


class ManagerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = os.path.join(TMP, f"run{os.urandom(6).hex()}")
        self.model: dict[int, int] = {}
        self.mgr = ac.CheckpointManager(self.dir, save_on_preemption=False)

    def next_step(self):
        return max(self.model, default=-1) + 1

    @rule(value=st.integers(0, 1000))
    def save(self, value):
        step = self.next_step()
        assert self.mgr.save(step, tree(value))
        self.model[step] = value

    # Which steps exist depends on timing (a killed writer may or may not have committed), so
    # rules draw a plain number and pick a step with it, and do nothing when there is none: the
    # data hypothesis draws never depends on the model (else it reports a flaky strategy).
    def pick(self, i):
        return sorted(self.model)[i % len(self.model)] if self.model else None

    @rule(i=st.integers(0, 63), value=st.integers(0, 1000))
    def overwrite(self, i, value):
        step = self.pick(i)
        if step is None:
            return
        with pytest.raises(ac.CheckpointExistsError):
            self.mgr.save(step, tree(value))
        self.mgr.save(step, tree(value), force=True)
        self.model[step] = value

    @rule(i=st.integers(0, 63))
    def restore(self, i):
        step = self.pick(i)
        if step is None:
            return
        got = self.mgr.restore(step)
        assert same(got, self.model[step]), (step, self.model[step])

    @rule(i=st.integers(0, 63))
    def delete(self, i):
        step = self.pick(i)
        if step is None:
            return
        self.mgr.delete(step)
        del self.model[step]

    @rule()
    def reopen(self):
        self.mgr.close()
        self.mgr = ac.CheckpointManager(self.dir, save_on_preemption=False)

    @rule(value=st.integers(0, 1000), delay=st.floats(0, 0.25))
    def kill_a_writer(self, value, delay):
        """Another process saves the next step and is SIGKILLed after `delay` seconds: the step
        is committed whole, or not at all."""
        self.mgr.close()  # the writer lock passes to the child
        step = self.next_step()
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, self.dir, str(step), str(value)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        ) as child:
            line = child.stdout.readline()
            assert line.startswith(b"ready"), child.stderr.read()
            try:
                child.wait(delay)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
            child.communicate()
        self.mgr = ac.CheckpointManager(self.dir, save_on_preemption=False)
        event(f"killed writer: step {'committed' if step in self.mgr.all_steps() else 'absent'}")
        if step in self.mgr.all_steps():  # the child got to commit before it died
            got = self.mgr.restore(step)
            assert (
                same(got, value)
                and got["big"].tobytes() == np.full((8192, 1024), value, np.float32).tobytes()
            )
            self.model[step] = value
        assert not [n for n in os.listdir(self.dir) if ".asyncckpt-" in n]  # debris removed

    @invariant()
    def steps_match(self):
        self.mgr.wait_until_finished()
        assert self.mgr.all_steps() == sorted(self.model)

    def teardown(self):
        self.mgr.close()


TMP = ""


@pytest.mark.slow
def test_manager_against_a_model(tmp_path):
    global TMP
    TMP = str(tmp_path)
    run = settings(max_examples=12, stateful_step_count=10, deadline=None)(ManagerModel)
    run.TestCase().runTest()
