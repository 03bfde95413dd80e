"""The examples: kill them, restart them, and the loss curve (and the data order) goes on from
the saved step."""

import os
import re
import signal
import subprocess
import sys

import pytest

import asyncckpt as ac

pytest.importorskip("optax")
EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def launch(directory, steps, example="train_mlp.py"):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the example sets up its 8 simulated devices itself
    cmd = [
        sys.executable,
        os.path.join(EXAMPLES, example),
        "--dir",
        str(directory),
        "--steps",
        str(steps),
        "--save-every",
        "20",
    ]
    if example == "train_mlp.py":
        cmd += ["--log-every", "1"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def read_until(proc, pattern):
    """Lines of output up to and including the first one matching `pattern`."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
    raise AssertionError("the example ended early:\n" + "\n".join(lines[-30:]))


def losses(lines):
    return dict(re.findall(r"^step (\d+) loss (\S+)$", "\n".join(lines), re.M))


@pytest.mark.timeout(300)
def test_killed_example_resumes_where_its_checkpoint_left_off(tmp_path):
    directory = tmp_path / "mlp"
    first = launch(directory, steps=150)
    before = read_until(first, r"^step 75 loss")
    first.send_signal(signal.SIGKILL)  # no chance to clean up
    first.communicate()
    assert before[0].startswith("starting from scratch")

    second = launch(directory, steps=150)
    after, _ = second.communicate(timeout=240)
    assert second.returncode == 0, after
    after = after.splitlines()
    resumed = int(re.match(r"resumed from step (\d+)", after[0]).group(1))
    assert resumed % 20 == 0 and 20 <= resumed <= 75, after[0]
    # the same steps give bit-identical losses: params, Adam state and PRNG key came back exactly
    lost, got = losses(before), losses(after)
    assert min(map(int, got)) == resumed + 1
    common = [s for s in got if s in lost]
    assert len(common) >= 75 - resumed - 1
    assert {s: got[s] for s in common} == {s: lost[s] for s in common}
    assert after[-1].startswith("stopped at step 150")
    with ac.CheckpointManager(directory, read_only=True) as mgr:
        assert mgr.latest_step() == 150

    # SIGTERM (preemption): the example saves the current, off-interval step and exits cleanly
    third = launch(directory, steps=1000)
    read_until(third, r"^step 163 loss")
    third.send_signal(signal.SIGTERM)
    rest, _ = third.communicate(timeout=120)
    assert third.returncode == 0, rest
    saved = int(re.search(r"SIGTERM: step (\d+) saved, exiting", rest).group(1))
    assert 163 <= saved < 1000
    with ac.CheckpointManager(directory, read_only=True) as mgr:
        assert mgr.latest_step() == saved
        assert mgr.restore(saved)["step"] == saved


@pytest.mark.timeout(300)
def test_killed_grain_example_sees_the_same_data_and_losses(tmp_path):
    """kill -9 part-way, restart: the batches after the restored step are the ones the killed
    run saw (the grain iterator's position came back with the step), and so are the losses."""
    line = re.compile(r"^step (\d+) data (\d+) loss (\S+)$", re.M)
    first = launch(tmp_path / "grain", steps=100, example="train_grain.py")
    before = read_until(first, r"^step 55 data")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert before[0].startswith("starting from scratch")

    second = launch(tmp_path / "grain", steps=70, example="train_grain.py")
    after, _ = second.communicate(timeout=240)
    assert second.returncode == 0, after
    resumed = int(re.match(r"resumed from step (\d+)", after).group(1))
    assert resumed in (20, 40), after.splitlines()[0]
    seen = {int(s): (d, loss) for s, d, loss in line.findall("\n".join(before))}
    again = {int(s): (d, loss) for s, d, loss in line.findall(after)}
    assert min(again) == resumed + 1 and max(again) == 70
    common = sorted(set(seen) & set(again))
    assert common == list(range(resumed + 1, 56))
    assert {s: again[s] for s in common} == {s: seen[s] for s in common}
    assert len({again[s][0] for s in again}) == len(again)  # distinct batches, not one repeated
