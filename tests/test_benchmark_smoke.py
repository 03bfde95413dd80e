"""The side-by-side benchmark runs end to end (quick mode): every child process succeeds and
every restore, asyncckpt's and Orbax's, is checked leaf by leaf inside it. No timing asserted."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("psutil")
BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def run_benchmark(script, *args, tmp_path):
    """Run `benchmarks/<script>` with `args` in a fresh process (its own XLA flags, scratch
    directories under `tmp_path`); its stdout, once it succeeded."""
    env = dict(os.environ, BENCH_DIR=str(tmp_path))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args],
        capture_output=True,
        text=True,
        timeout=580,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_orbax_quick_mode(tmp_path):
    out = tmp_path / "results.json"
    stdout = run_benchmark(
        "compare_orbax.py",
        "--quick",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
        tmp_path=tmp_path,
    )
    for workload in ("big", "small", "llm"):
        assert f"== {workload}:" in stdout
    records = json.loads(out.read_text())["records"]
    assert len(records) == 6 and not any("error" in r for r in records)
    for r in records:
        for metric in (
            "save_blocking_s",
            "save_commit_s",
            "restore_resume_s",
            "train_slowdown",
            "save_cpu_s_per_gb",
            "restore_cpu_s_per_gb",
            "memcpy_cpu_s_per_gb",
            "durable_idle_s",
            "durable_loaded_s",
        ):
            assert r[metric] > 0, (r["system"], r["workload"], metric)
        # at quick mode's scale the loop's own drift can exceed what a save costs: a number
        assert math.isfinite(r["train_lost_s"]), r


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_incremental_quick_mode(tmp_path):
    """The incremental benchmark end to end on 64x smaller trees: every system's table row and
    the ratios are printed, and an incremental lora step adds fewer bytes than a full one."""
    stdout = run_benchmark(
        "incremental.py",
        *("--quick", "--runs", "1", "--steps", "3", "--slowdown-reps", "1"),
        tmp_path=tmp_path,
    )
    lora = stdout[stdout.index("\nlora: medians") : stdout.index("\nbig: medians")]
    rows = dict(re.findall(r"^\| (asyncckpt-full|asyncckpt|orbax) \|(.*)$", lora, re.M))
    assert set(rows) == {"asyncckpt", "asyncckpt-full", "orbax"}, stdout
    mib = {k: float(re.search(r"([\d.]+) MiB", v).group(1)) for k, v in rows.items()}
    assert mib["asyncckpt"] < 0.5 * mib["asyncckpt-full"], stdout
    assert re.search(r"asyncckpt / orbax: commit [\d.]+, new bytes [\d.]+", stdout)
    assert "asyncckpt / asyncckpt-full: commit" in stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multitier_orbax_quick_mode(tmp_path):
    """asyncckpt's local tier beside Orbax's emergency manager, end to end on 1/16 of the state:
    every restore is checked value by value inside; a lost host's step comes back from
    asyncckpt's local tiers, and from Orbax's persistent tier (its only local replica lost a
    part)."""
    stdout = run_benchmark("multitier_orbax.py", "--quick", tmp_path=tmp_path)
    lost = next(ln for ln in stdout.splitlines() if ln.startswith("| recovery, one host's"))
    assert "(local) |" in lost and "(persistent) |" in lost, stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multitier_quick_mode(tmp_path):
    """The multi-tier benchmark end to end on 1/16 of the state: 4 real processes save with and
    without copies on peers, then recover from the local tiers, after losing one host's local
    directory, and from S3 (moto); every restore is checked value by value inside."""
    stdout = run_benchmark("multitier.py", "--quick", tmp_path=tmp_path)
    for row in ("| blocking |", "| local tiers intact |", "| one host's local directory lost |"):
        assert row in stdout, stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multiprocess_quick_mode(tmp_path):
    """Both libraries in real multi-process jobs on 1/16 of the state: save with 4 processes,
    restore onto the same mesh, onto another mesh with 2 processes, and replicated across
    processes (checked value by value inside); with read_once=True asyncckpt's processes read
    the checkpoint once between them, by its own count and by the system calls."""
    stdout = run_benchmark("multiprocess.py", "--quick", tmp_path=tmp_path)
    once = re.search(r"\| replicated, read_once=True \| ([\d.]+) \(([\d.]+)\) \|", stdout)
    assert once and float(once.group(1)) <= 1.1 and float(once.group(2)) <= 1.1, stdout
    assert "| restore, other mesh, 2 processes |" in stdout, stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_compare_quick_mode_runs_on_cpu(tmp_path):
    """The GPU benchmark stays runnable where no GPU is (here on the CPU device): both systems
    save, donate, restore and check every byte; the link and host-memory lines are printed."""
    stdout = run_benchmark("gpu_compare.py", "--quick", tmp_path=tmp_path)
    for workload in ("big", "small"):
        assert f"== {workload} ==" in stdout, stdout
    for metric in ("save_blocking_s", "restore_s", "save_peak_host_gb", "restore_peak_host_gb"):
        assert metric in stdout, stdout
    assert re.search(r"asyncckpt: link [\d.]+ GB/s to host.* of host-to-device", stdout), stdout
    assert re.search(r"orbax: link [\d.]+ GB/s to host", stdout), stdout


@pytest.mark.timeout(300)
def test_restore_phases_runs_and_checks_what_it_restores(tmp_path):
    """The restore diagnostic on a twentieth of the small tree: a save, then a fresh process
    that restores it twice (verified leaf by leaf inside) and reports each phase."""
    stdout = run_benchmark(
        "restore_phases.py",
        "--workload",
        "small",
        "--scale",
        "0.05",
        "--runs",
        "1",
        "--restores",
        "2",
        tmp_path=tmp_path,
    )
    assert re.search(r"run 0 resume total [\d.]+ s  plan [\d.]+", stdout), stdout
    assert re.search(r"run 0 warm   total [\d.]+ s", stdout), stdout


@pytest.mark.timeout(300)
def test_inode_reuse_runs_every_mode(tmp_path):
    """The file-system diagnostic on 200 arrays, two steps of each way of writing them; it
    leaves nothing behind."""
    stdout = run_benchmark(
        "inode_reuse.py",
        "--arrays",
        "200",
        "--steps",
        "2",
        "--dir",
        str(tmp_path),
        tmp_path=tmp_path,
    )
    for mode in ("fresh", "reuse", "reuse-trunc", "reuse-dirs"):
        assert re.search(rf"^{mode} +cpu [\d.]+ s", stdout, re.M), stdout
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retention_loop_quick_mode(tmp_path):
    """Training with retention, both libraries, asyncckpt with and without writing over the
    deleted step's files: every child succeeds and the table has a row for each."""
    stdout = run_benchmark(
        "retention_loop.py", "--quick", "--workdir", str(tmp_path / "w"), tmp_path=tmp_path
    )
    for system in ("asyncckpt", "asyncckpt-fresh", "orbax"):
        row = rf"^\| small \| {system} \| -?[\d.]+ \| [\d.]+ \|"  # (noise: CPU may be < 0)
        assert re.search(row, stdout, re.M), stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_save_after_delete_quick_mode(tmp_path):
    stdout = run_benchmark(
        "save_after_delete.py", "--quick", "--dir", str(tmp_path), tmp_path=tmp_path
    )
    rows = re.findall(r"^\| (delete|delete-fresh|retain) \| ([0-9.]+) \|", stdout, re.M)
    assert [mode for mode, _ in rows] == ["delete", "delete-fresh", "retain"]
    assert all(math.isfinite(float(t)) and float(t) > 0 for _, t in rows)


@pytest.mark.timeout(300)
def test_save_loop_reports_each_checkout_idle_and_under_load(tmp_path):
    """The save-loop diagnostic on a twentieth of the small tree, two checkouts taking turns
    (here the same one twice): medians of the saves after the first two, CPU time idle and
    training lost under the loop."""
    src = os.path.dirname(BENCHMARKS)
    common = ["--scale", "0.05", "--saves", "4", "--rounds", "1", "--dir", str(tmp_path)]
    stdout = run_benchmark("save_loop.py", *common, "--src", src, "--src", src, tmp_path=tmp_path)
    rows = re.findall(
        r"^(.+): +blocking ([\d.]+) s  commit ([\d.]+) s  cpu ([\d.]+) s$", stdout, re.M
    )
    assert [r[0] for r in rows] == [src, src], stdout
    assert all(float(v) > 0 for r in rows for v in r[1:]), stdout
    stdout = run_benchmark("save_loop.py", *common, "--load", tmp_path=tmp_path)
    assert re.search(
        r"^this checkout: +blocking [\d.]+ s  commit [\d.]+ s  lost -?[\d.]+ s$", stdout, re.M
    ), stdout
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.timeout(120)
def test_chunk_passes_writes_each_way_and_they_agree(tmp_path):
    """The one-pass benchmark on 32 MiB: every layout and alignment, the three ways' content
    hashes equal (the script checks), a CPU figure for each."""
    args = ["--gib", "0.03125", "--chunk-mib", "4", "--band-mib", "1", "--rounds", "1"]
    stdout = run_benchmark("chunk_passes.py", *args, "--dir", str(tmp_path), tmp_path=tmp_path)
    number = r"(-?[\d.]+)"
    rows = re.findall(
        rf"^ *(page-aligned|64 B past a page), (plain|banded) +CPU s per GB  one pass: {number}"
        rf"  hash first: {number}  three passes: {number}$",
        stdout,
        re.M,
    )
    assert len(rows) == 4, stdout
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
