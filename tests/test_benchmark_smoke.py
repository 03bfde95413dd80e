"""The side-by-side benchmark runs end to end (quick mode): every child process succeeds and
every restore, asyncckpt's and Orbax's, is checked leaf by leaf inside it. No timing asserted."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("psutil")
SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compare_orbax.py")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_orbax_quick_mode(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--quick",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=580,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for workload in ("big", "small", "llm"):
        assert f"== {workload}:" in proc.stdout
    records = json.loads(out.read_text())["records"]
    assert len(records) == 6 and not any("error" in r for r in records)
    for r in records:
        for metric in ("save_blocking_s", "save_commit_s", "restore_resume_s", "train_slowdown"):
            assert r[metric] > 0, (r["system"], r["workload"], metric)
