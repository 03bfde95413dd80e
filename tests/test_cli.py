"""The `asyncckpt` command: `_cli.main`, what `python -m asyncckpt` and the console script
call, run in this process with its output captured (a subprocess a command would spend most of
its time importing JAX); the tests of the entry points and of what needs a process of its own
(a kill, no terminal) start real ones."""

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_same, make_root, names
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rich.console import Console

import asyncckpt as ac
from asyncckpt import _cli


def run(*args, ok=True):
    """Run the command; return (exit status, stdout, stderr). Its consoles write to the
    captured streams as to a pipe with COLUMNS=200."""
    stdout, stderr = io.StringIO(), io.StringIO()
    consoles = _cli.out, _cli.err
    _cli.out = Console(file=stdout, highlight=False, soft_wrap=True, width=200)
    _cli.err = Console(file=stderr, highlight=False, soft_wrap=True, width=200, stderr=True)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = _cli.main([str(a) for a in args])
    finally:
        _cli.out, _cli.err = consoles
    if ok:
        assert status == 0, stderr.getvalue()
    return status, stdout.getvalue(), stderr.getvalue()


def run_process(*args):
    """`python -m asyncckpt` in a process of its own: (exit status, stdout, stderr)."""
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "asyncckpt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    return proc.returncode, proc.stdout, proc.stderr


def steps(path):
    with ac.CheckpointManager(path, read_only=True) as mgr:
        return mgr.all_steps()


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("asyncckpt: error: ")
    return lines[0]


def state(mesh):
    w = np.arange(64 * 16, dtype=np.float32).reshape(64, 16).astype(ml_dtypes.bfloat16)
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("x", "y"))),
            "b": jnp.linspace(0, 1, 16, dtype=jnp.float32),
        },
        "opt": [jnp.full((8, 4), 2.5, jnp.float32), jnp.arange(5, dtype=jnp.int32)],
        "key": jax.random.key(3),
        "count": 7,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A manager directory with steps 1-3 (best loss: step 2) and an interrupted save."""
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    path = tmp_path_factory.mktemp("cli") / "run"
    with ac.CheckpointManager(path, best_metric="loss") as mgr:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
            mgr.save(step, state(mesh), metrics={"loss": loss}, metadata={"lr": 0.1 * step})
    leftover = path / ".4.asyncckpt-tmp-0123456789ab"
    leftover.mkdir()
    (leftover / "junk").write_bytes(b"x")
    (path / "0.damaged-20261101T120000Z").mkdir()  # set aside by a restore that fell back
    return path


def test_help_and_console_script():
    status, out, _ = run_process("--help")
    assert status == 0
    for command in ("ls", "show", "verify", "rm", "cp", "export", "import-orbax"):
        assert command in out
    script = os.path.join(os.path.dirname(sys.executable), "asyncckpt")
    if os.path.exists(script):  # installed with pip: the console script is the same command
        proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and ac.__version__ in proc.stdout


def test_ls_table_and_json(run_dir):
    _, out, _ = run("ls", run_dir)
    rows = {
        ln.split()[1]: ln for ln in out.splitlines() if ln.split()[1:2] in (["1"], ["2"], ["3"])
    }
    assert set(rows) == {"1", "2", "3"}
    assert "best loss" in rows["2"] and "best" not in rows["1"] + rows["3"]
    assert '{"loss": 1.0}' in rows["2"]
    assert "uncommitted leftover .4.asyncckpt-tmp-0123456789ab" in out
    assert "damaged step set aside as 0.damaged-20261101T120000Z" in out

    _, out, _ = run("ls", run_dir, "--json")
    doc = json.loads(out)
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3]
    assert [s["best"] for s in doc["steps"]] == [False, True, False]
    assert doc["best_metric"] == "loss" and doc["best_mode"] == "min"
    assert doc["steps"][0]["metrics"] == {"loss": 3.0}
    tree_bytes = 64 * 16 * 2 + 16 * 4 + 8 * 4 * 4 + 5 * 4 + 2 * 4
    assert doc["steps"][0]["bytes"] == tree_bytes
    assert [os.path.basename(p) for p in doc["uncommitted"]] == [".4.asyncckpt-tmp-0123456789ab"]
    assert doc["damaged"] == ["0.damaged-20261101T120000Z"]

    _, out, _ = run("ls", run_dir, "--json", "--best-metric", "loss", "--best-mode", "max")
    assert [s["best"] for s in json.loads(out)["steps"]] == [True, False, False]


def test_show(run_dir):
    _, out, _ = run("show", run_dir, "--json")  # the latest step
    doc = json.loads(out)
    assert doc["step"] == 3 and doc["metadata"] == {"lr": pytest.approx(0.3)}
    variables = {v["name"]: v for v in doc["variables"]}
    assert set(variables) == {"params/w", "params/b", "opt/0", "opt/1", "key"}
    w = variables["params/w"]
    assert (w["shape"], w["dtype"], w["bytes"], w["chunk_grid"]) == (
        [64, 16],
        "bfloat16",
        2048,
        [4, 2],
    )
    assert variables["key"]["prng_impl"] == "threefry2x32"

    _, out, _ = run("show", run_dir, "--step", "1", "--filter", "params/*")
    assert "step 1" in out and "64x16 bfloat16" in out and "chunks 4x2" in out
    assert "opt" not in out
    assert "2 of 5 arrays" in out and '"lr": 0.1' in out


def damage(ckpt):
    """Flip a byte of one chunk of params/w, delete a chunk of opt/0."""
    chunk = ckpt / "params" / "w" / "c.1.1"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (ckpt / "opt" / "0" / "c.0.0").unlink()


def test_verify_names_every_damaged_variable(run_dir, tmp_path):
    run("verify", run_dir)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    damage(copy / "2")
    status, out, err = run("verify", copy, ok=False)
    assert status == 1
    assert f"ok  {copy / '1'}" in out and f"ok  {copy / '3'}" in out
    assert f"BAD {copy / '2'}: 2 damaged: opt/0, params/w" in err
    assert f"checksum mismatch in chunk file {copy / '2' / 'params' / 'w' / 'c.1.1'}" in err
    assert f"chunk file {copy / '2' / 'opt' / '0' / 'c.0.0'} is missing" in err
    run("verify", copy, "--step", "3")
    with pytest.raises(ac.CorruptCheckpointError, match=r"2 variable\(s\) \['opt/0', 'params/w'\]"):
        ac.verify(copy / "2")


def test_rm(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _, out, _ = run("rm", copy, "--step", "1", "--step", "3")
    assert "deleted step 1" in out and "deleted step 3" in out
    assert steps(copy) == [2]
    status, _, err = run("rm", copy, "--step", "7", ok=False)
    assert status == 1
    assert one_error_line(err).endswith(f"step 7 is not in {copy}; committed steps: 2")
    with ac.CheckpointManager(copy):  # a training job holds the writer lock
        status, _, err = run("rm", copy, "--step", "2", ok=False)
    assert status == 1 and "another CheckpointManager (pid" in one_error_line(err)
    assert steps(copy) == [2]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_cp_round_trip(run_dir, tmp_path, request, backend, mesh):
    dest = make_root(request, backend, tmp_path) / "copied"
    _, out, _ = run("cp", run_dir, dest)
    assert "copied" in out
    assert steps(dest) == [1, 2, 3]
    target = state(mesh)
    for step in (1, 3):
        got = ac.restore(f"{dest}/{step}", target)
        want = ac.restore(run_dir / str(step), target)
        jax.tree.map(
            assert_same, jax.random.key_data(got.pop("key")), jax.random.key_data(want.pop("key"))
        )
        jax.tree.map(assert_same, got, want)
        assert got["params"]["w"].sharding == target["params"]["w"].sharding
    back = tmp_path / "back"
    run("cp", dest, back, "--step", "2")  # one step of a directory, out of the bucket
    ac.verify(back)
    assert ac.read_metadata(back) == {"lr": pytest.approx(0.2)}


def _cp_killed_in_step(src, dst, killed_in):
    """`asyncckpt cp SRC DST` SIGKILLed by itself after the first array document it copies of
    step `killed_in`: a copy interrupted for real, half-way through (the steps of `run_dir`
    hold the same chunks, so steps after the first link theirs rather than copy them)."""
    code = f"""
import os, signal
from asyncckpt import _cli, _copy
real = _copy._copy_doc
def copy_then_die(src, *args):
    real(src, *args)
    if src.name == {str(killed_in)!r}:
        os.kill(os.getpid(), signal.SIGKILL)
_copy._copy_doc = copy_then_die
_cli.main(["cp", {str(src)!r}, {str(dst)!r}])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stdout + proc.stderr


def assert_restores_as(copy, original):
    target = ac.restore(original)  # the saved tree, as host arrays
    got = ac.restore(copy, target)
    jax.tree.map(
        assert_same, jax.random.key_data(got.pop("key")), jax.random.key_data(target.pop("key"))
    )
    jax.tree.map(assert_same, got, target)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_an_interrupted_cp_resumes(run_dir, tmp_path, request, backend):
    """Issue 21: `cp` killed half-way could not be resumed: running it again stopped at the
    first step already copied ("pass force=True", an option cp does not have)."""
    dest = make_root(request, backend, tmp_path) / "copied"
    _cp_killed_in_step(run_dir, dest, 2)
    assert steps(dest) == [1]  # step 2 was under way: not committed
    assert "2" in names(dest) or any(".2.asyncckpt-tmp-" in n for n in names(dest))
    _, out, _ = run("cp", run_dir, dest)
    assert f"{dest}/1 holds this checkpoint already, skipped" in out
    assert out.count("copied ") == 2  # steps 2 and 3
    assert steps(dest) == [1, 2, 3]
    assert not [n for n in names(dest) if "asyncckpt-tmp" in n]  # the partial copy is gone
    for step in (1, 2, 3):
        assert_restores_as(f"{dest}/{step}", run_dir / str(step))
        ac.verify(f"{dest}/{step}")
    _, out, _ = run("cp", run_dir, dest)  # nothing left to do
    assert out.count("holds this checkpoint already, skipped") == 3


def test_cp_replaces_a_different_checkpoint_only_with_force(run_dir, tmp_path):
    dest = tmp_path / "copied"
    run("cp", run_dir, dest)
    ac.save(dest / "3", {"other": np.ones(3)}, force=True)
    status, _, err = run("cp", run_dir, dest, ok=False)
    assert status == 1
    assert one_error_line(err).endswith(
        f"{dest}/3 holds a different checkpoint than {run_dir}/3 (their root documents "
        "differ); pass --force to replace it, or copy to another place"
    )
    assert "other" in ac.list_variables(dest / "3")  # left as it was
    _, out, _ = run("cp", run_dir, dest, "--force")
    assert out.count("holds this checkpoint already, skipped") == 2
    assert_restores_as(dest / "3", run_dir / "3")
    single = tmp_path / "single"  # one checkpoint, not a directory, alike
    run("cp", run_dir, single, "--step", "2")
    _, out, _ = run("cp", run_dir, single, "--step", "2")
    assert "holds this checkpoint already, skipped" in out
    status, _, err = run("cp", run_dir, single, "--step", "3", ok=False)
    assert status == 1 and "pass --force to replace it" in one_error_line(err)
    run("cp", run_dir, single, "--step", "3", "--force")
    assert_restores_as(single, run_dir / "3")


def test_cp_refuses_a_damaged_source(run_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(run_dir / "2", src)
    damage(src)
    status, _, err = run("cp", src, tmp_path / "dst", ok=False)
    assert status == 1
    assert "is missing" in one_error_line(err) or "checksum mismatch" in err
    assert not (tmp_path / "dst").exists()
    assert [n for n in os.listdir(tmp_path) if "asyncckpt-tmp" in n] == []


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    return {
        k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]])
        for k, v in header.items()
        if k != "__metadata__"
    }


def test_export(run_dir, tmp_path):
    saved = ac.restore(run_dir / "3")
    out = tmp_path / "w.safetensors"
    run("export", run_dir, out)
    tensors = read_safetensors(out)
    assert set(tensors) == {"params/w", "params/b", "opt/0", "opt/1", "key"}
    dtype, shape, data = tensors["params/w"]
    assert (dtype, shape) == ("BF16", [64, 16])
    assert data == np.asarray(saved["params"]["w"]).tobytes()
    assert tensors["key"][0] == "U32"
    assert tensors["key"][2] == np.asarray(jax.random.key_data(saved["key"])).tobytes()

    status, _, err = run("export", run_dir, tmp_path / "w.npz", ok=False)
    assert status == 1 and "--cast float32" in one_error_line(err)
    run("export", run_dir, tmp_path / "w.npz", "--cast", "float32", "--filter", "params/*")
    with np.load(tmp_path / "w.npz") as npz:
        assert sorted(npz.files) == ["params/b", "params/w"]
        assert_same(npz["params/w"], np.asarray(saved["params"]["w"]).astype(np.float32))
        assert_same(npz["params/b"], saved["params"]["b"])
    status, _, err = run("export", run_dir, tmp_path / "w.txt", ok=False)
    assert status == 1 and ".safetensors or .npz" in one_error_line(err)


def orbax_checkpoint(root, mesh):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {
        "params": {
            "dense": {
                "kernel": jax.device_put(
                    np.arange(32, dtype=np.float32).reshape(8, 4).astype(ml_dtypes.bfloat16),
                    NamedSharding(mesh, P("x", "y")),
                ),
                "bias": jnp.ones(4, jnp.float32),
            }
        },
        "layers": [jnp.full((3,), 1.5), jnp.arange(6, dtype=jnp.int32).reshape(2, 3)],
        "step": jnp.int32(42),
    }
    with ocp.CheckpointManager(root) as mgr:
        mgr.save(5, args=ocp.args.StandardSave(tree))
        mgr.wait_until_finished()
    return tree


def test_import_orbax(tmp_path, mesh):
    tree = orbax_checkpoint(tmp_path / "orbax", mesh)
    _, out, err = run("import-orbax", tmp_path / "orbax" / "5", tmp_path / "imported")
    assert "imported 5 arrays" in out and err.strip() == ""
    ac.import_orbax(tmp_path / "orbax" / "5" / "default", tmp_path / "api")
    for dest in ("imported", "api"):
        variables = ac.list_variables(tmp_path / dest)
        assert sorted(variables) == [
            "layers/0",
            "layers/1",
            "params/dense/bias",
            "params/dense/kernel",
            "step",
        ]
        got = ac.restore(tmp_path / dest)
        jax.tree.map(lambda a, b: assert_same(a, np.asarray(b)), got, tree)
    status, _, err = run("import-orbax", tmp_path / "orbax" / "5", tmp_path / "imported", ok=False)
    assert status == 1 and "pass --force" in one_error_line(err)
    run("import-orbax", tmp_path / "orbax" / "5", tmp_path / "imported", "--force")


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "{tmp}/nothing"], "no checkpoint at {tmp}/nothing: the path does not exist"),
        (["show", "{run}", "--step", "9"], "step 9 is not in {run}; committed steps: 1, 2, 3"),
        (["ls", "{run}/1"], "{run}/1 is a single checkpoint, not a manager directory"),
        (["verify", "{tmp}/empty"], "{tmp}/empty is not a checkpoint: it has no zarr.json"),
        (["import-orbax", "{run}", "{tmp}/x"], "{run} is not an Orbax PyTree checkpoint"),
        (["show", "{tmp}/broken"], "{tmp}/broken: root zarr.json is not valid JSON"),
    ],
)
def test_bad_input_is_one_line(run_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{not json")
    fill = {"tmp": tmp_path, "run": run_dir}
    status, out, err = run(*[a.format(**fill) for a in args], ok=False)
    assert status == 1 and out == ""
    assert message.format(**fill) in one_error_line(err)


def test_debug_shows_the_traceback(tmp_path):
    status, _, err = run_process("--debug", "show", tmp_path / "nothing")
    assert status == 1 and "Traceback" in err and "CheckpointNotFoundError" in err


def test_usage_errors_exit_2(run_dir):
    status, _, err = run("rm", run_dir, ok=False)
    assert status == 2 and "Missing option '--step'" in err


def test_verify_on_object_store(run_dir, request, tmp_path):
    dest = make_root(request, "s3", tmp_path) / "one"
    run("cp", run_dir, dest, "--step", "1")
    assert "zarr.json" in names(dest)
    _, out, _ = run("verify", dest)
    assert out.startswith(f"ok  {dest}")


def test_a_filter_matching_nothing_says_so_and_suggests_names(run_dir):
    for command in ("show", "export"):
        extra = ["out.safetensors"] if command == "export" else []
        status, out, err = run(command, run_dir, *extra, "--filter", "param/*", ok=False)
        line = one_error_line(err)
        assert status == 1 and out == ""
        assert "matches --filter 'param/*'" in line and "closest names: params" in line, line


def test_export_keeps_zero_dimensional_arrays(tmp_path):
    ac.save(tmp_path / "ck", {"x": np.float32(3.5), "v": np.arange(3, dtype=np.int32)})
    run("export", tmp_path / "ck", tmp_path / "w.safetensors")
    tensors = read_safetensors(tmp_path / "w.safetensors")
    assert tensors["x"][:2] == ("F32", []) and tensors["v"][:2] == ("I32", [3])
    run("export", tmp_path / "ck", tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as npz:
        assert npz["x"].shape == () and npz["x"] == np.float32(3.5)


def test_show_values_prints_one_variable(tmp_path):
    ac.save(
        tmp_path / "ck",
        {"w": np.arange(5000, dtype=np.float32).reshape(50, 100), "b": np.arange(6).reshape(2, 3)},
    )
    _, out, _ = run("show", tmp_path / "ck", "--values", "w")
    assert out.splitlines()[0].split() == ["w", "50x100", "float32"]
    assert "..." in out and "4.999e+03]]" in out  # numpy's summary of a large array
    _, out, _ = run("show", tmp_path / "ck", "--values", "b", "--json")
    doc = json.loads(out)
    assert doc["values"] == [[0, 1, 2], [3, 4, 5]] and doc["shape"] == [2, 3]
    code, _, err = run("show", tmp_path / "ck", "--values", "nope", ok=False)
    assert code == 1 and "has no variable 'nope'; it has: b, w" in err


def test_piped_tables_are_not_wrapped(tmp_path):
    """Without a terminal (and no COLUMNS), a table row is one line however long."""
    metric = "a_rather_long_metric_name_" * 6
    with ac.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": np.ones(2)}, metrics={metric: 1.5})
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "ls", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert any(f'{{"{metric}": 1.5}}' in line for line in proc.stdout.splitlines()), proc.stdout
