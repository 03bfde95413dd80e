"""The `asyncckpt` command: look inside checkpoints, check, copy, delete, export and import them.

    asyncckpt ls DIR                       the steps of a manager directory
    asyncckpt show PATH [--step N]         the variables of one checkpoint
    asyncckpt verify PATH|DIR              read every chunk and check it
    asyncckpt rm DIR --step N              delete steps
    asyncckpt cp SRC DST [--force]         copy a checkpoint (disk <-> object store); resumable
    asyncckpt export PATH OUT.safetensors  hand the weights to other tools (or OUT.npz)
    asyncckpt import-orbax SRC DST         convert an Orbax checkpoint

Errors are one line on stderr and exit status 1 (`--debug` shows the traceback); usage errors
exit with 2. Tables and progress bars go through rich; `--json` prints plain JSON for scripts.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import fnmatch
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import jax
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.tree import Tree

from . import _copy, _directory, _export, _format, _restore, _verify
from ._checkpointer import load_variable
from ._engine import DEFAULT_MAX_INFLIGHT_BYTES
from ._executor import Workers
from ._format import ArraySpec, RootInfo
from ._retention import KeepBest, StepInfo
from ._storage import Storage, open_storage
from .errors import CheckpointError, CheckpointExistsError, StepNotFoundError


def _console(stream: Any, **options: Any) -> Console:
    """Piped output gets whole lines (rich would wrap tables at 80 columns); a terminal, or
    COLUMNS set, gets that width."""
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, soft_wrap=True, width=1 << 16 if piped else None, **options)


out = _console(sys.stdout)
err = _console(sys.stderr, stderr=True)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[:20])) + (
        f" ... ({len(steps)} in all)" if len(steps) > 20 else ""
    )


def _is_checkpoint(place: Storage) -> bool:
    return place.exists(_format.DOC)


def _resolve(path: str, step: int | None) -> Storage:
    """The checkpoint that PATH [--step N] names: PATH itself, step N of the manager directory
    PATH, or (no --step) its latest step."""
    place = open_storage(path)
    if step is None and _is_checkpoint(place):
        return place
    steps = _directory.committed_steps(place)
    if step is None:
        if not steps:
            _restore.read_root(place)  # raises the precise error (missing, not a checkpoint ...)
        return _directory.step_storage(place, steps[-1])
    if step not in steps:
        raise StepNotFoundError(
            f"step {step} is not in {place.url}; committed steps: {_steps_text(steps)}"
        )
    return _directory.step_storage(place, step)


def _checkpoints(path: str, step: int | None) -> list[Storage]:
    """The checkpoints PATH [--step N] names: PATH, step N of it, or every step of it."""
    place = open_storage(path)
    if step is not None or _is_checkpoint(place):
        return [_resolve(path, step)]
    steps = _directory.committed_steps(place)
    if not steps:
        _restore.read_root(place)  # raises the precise error
    return [_directory.step_storage(place, s) for s in steps]


def _directory_at(path: str) -> Storage:
    """The manager directory at `path` (an error if it is a single checkpoint or nothing)."""
    place = open_storage(path)
    if _is_checkpoint(place):
        raise CheckpointError(
            f"{place.url} is a single checkpoint, not a manager directory; "
            f"use `asyncckpt show {path}`"
        )
    if place.has_directories and place.kind() != "directory":
        raise CheckpointError(f"no directory at {place.url}")
    return place


def _no_match(ckpt: str, pattern: str, names: list[str]) -> str:
    """Nothing matches `--filter PATTERN`: say so, with the names closest to it."""
    candidates = sorted(set(names) | set(_format.group_names(names)))
    literal = pattern.replace("*", "").replace("?", "").rstrip("/")
    close = difflib.get_close_matches(literal, candidates, n=5, cutoff=0.3)
    if close:
        hint = "closest names: " + ", ".join(close)
    else:
        hint = "it has: " + ", ".join(candidates[:10]) + (" ..." if len(candidates) > 10 else "")
    return (
        f"no variable of {ckpt} matches --filter {pattern!r} (a glob over names such as "
        f"'params/*'); {hint}"
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _when(created: float) -> str:
    if not created:
        return "?"
    return _dt.datetime.fromtimestamp(created).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _data_bytes(info: RootInfo) -> int:
    return sum(a.nbytes for a in info.arrays.values())


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, allow_nan=True))


@contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar on stderr (only on a terminal); yields a thread-safe `advance(n)`."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    lock = threading.Lock()
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(what, total=total)

        def advance(n: int) -> None:
            with lock:
                bar.advance(task, n)

        yield advance


@contextmanager
def _workers() -> Iterator[Workers]:
    workers = Workers()
    try:
        yield workers
    finally:
        workers.close()


# ---------------------------------------------------------------------------------------------
# Commands


_step_option = click.option(
    "--step", type=int, help="The step of a manager directory (default: latest)."
)
_filter_option = click.option(
    "--filter",
    "pattern",
    default="*",
    show_default=True,
    help="Only variables whose name matches this glob (e.g. 'params/*').",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="asyncckpt", prog_name="asyncckpt")
def cli(debug: bool) -> None:
    """Look inside, check, copy and convert asyncckpt checkpoints.

    PATH is a checkpoint, or a manager directory (then --step picks the step; default: the
    latest). Paths may be object-store URLs (s3://bucket/prefix ...).
    """


@cli.command("ls")
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--best-metric",
    help="Mark the best step by this metric (default: the metric "
    "the manager ranked steps by, if any).",
)
@click.option(
    "--best-mode",
    type=click.Choice(["min", "max"]),
    help="Whether lower or higher is better (default: the manager's, else min).",
)
def ls_command(
    directory: str, as_json: bool, best_metric: str | None, best_mode: str | None
) -> None:
    """List the steps of a manager directory: time, size, metrics, the best one, and any
    uncommitted leftovers of interrupted saves and the damaged steps a restore set aside."""
    place = _directory_at(directory)
    steps = _directory.committed_steps(place)
    infos: dict[int, RootInfo | CheckpointError] = {}
    for step in steps:
        try:
            infos[step] = _restore.read_root(_directory.step_storage(place, step))
        except CheckpointError as e:
            infos[step] = e
    good = [i for i in infos.values() if isinstance(i, RootInfo)]
    saved_best = next((i.best for i in reversed(good) if i.best is not None), None)
    metric = best_metric or (saved_best[0] if saved_best else None)
    mode = best_mode or (saved_best[1] if saved_best and saved_best[0] == metric else "min")
    best = _best_step(good, metric, mode) if metric else None
    leftovers = _directory.leftovers(place)
    damaged = _directory.damaged(place)
    if as_json:
        _print_json(
            {
                "directory": place.url,
                "best_metric": metric,
                "best_mode": mode if metric else None,
                "steps": [_step_json(s, infos[s], s == best) for s in steps],
                "uncommitted": [p.url for p in leftovers],
                "damaged": damaged,
            }
        )
        return
    table = Table(
        title=f"{place.url}: {len(steps)} step{'s' * (len(steps) != 1)}", title_justify="left"
    )
    for name, justify in (
        ("step", "right"),
        ("saved", "left"),
        ("size", "right"),
        ("new", "right"),
        ("metrics", "left"),
        ("", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for step in steps:
        info = infos[step]
        if isinstance(info, CheckpointError):
            table.add_row(str(step), "?", "?", "?", f"[red]unreadable: {info}[/]", "")
            continue
        metrics = json.dumps(info.metrics, default=str) if info.metrics is not None else ""
        table.add_row(
            str(step),
            _when(info.created),
            _human(_data_bytes(info)),
            _human(info.new_bytes) if info.new_bytes is not None else "",
            metrics,
            f"best {metric}" if step == best else "",
        )
    for name in damaged:
        table.add_row(
            "-",
            "",
            "",
            "",
            f"[red]damaged step set aside as {name}[/]",
            "kept for inspection; never restored",
        )
    for left in leftovers:
        table.add_row(
            "-",
            "",
            "",
            "",
            f"[yellow]uncommitted leftover {left.name}[/]",
            "removed when a writer opens the directory",
        )
    out.print(table)


def _best_step(infos: list[RootInfo], metric: str, mode: str) -> int | None:
    ranked = KeepBest(1, metric, mode).ranked(  # type: ignore[arg-type]
        [StepInfo(i.step if i.step is not None else -1, i.created, i.metrics) for i in infos]
    )
    return ranked[0] if ranked else None


def _step_json(step: int, info: RootInfo | CheckpointError, best: bool) -> dict:
    if isinstance(info, CheckpointError):
        return {"step": step, "error": str(info)}
    return {
        "step": step,
        "time": info.created,
        "bytes": _data_bytes(info),
        "new_bytes": info.new_bytes,
        "arrays": len(info.arrays),
        "metrics": info.metrics,
        "best": best,
        "digest": info.digest,
    }


@cli.command("show")
@click.argument("path")
@_step_option
@_filter_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a tree.")
@click.option(
    "--values",
    "values_of",
    metavar="NAME",
    help="Print the values of the variable NAME (summarised as numpy prints large arrays).",
)
def show_command(
    path: str, step: int | None, pattern: str, as_json: bool, values_of: str | None
) -> None:
    """Show the variables of one checkpoint: shape, dtype, bytes, chunk grid; totals; metadata.
    With --values NAME, the values of one variable (reading only that variable)."""
    ckpt = _resolve(path, step)
    if values_of is not None:
        _show_values(ckpt, values_of, as_json)
        return
    info = _restore.read_root(ckpt)
    arrays = [a for name, a in sorted(info.arrays.items()) if fnmatch.fnmatchcase(name, pattern)]
    if not arrays:
        raise CheckpointError(_no_match(ckpt.url, pattern, list(info.arrays)))
    total = sum(a.nbytes for a in arrays)
    if as_json:
        _print_json(
            {
                "path": ckpt.url,
                "step": info.step,
                "time": info.created,
                "metrics": info.metrics,
                "metadata": info.metadata,
                "digest": info.digest,
                "new_bytes": info.new_bytes,
                "bytes": total,
                "arrays": len(arrays),
                "variables": [_array_json(a) for a in arrays],
            }
        )
        return
    head = f"[bold]{ckpt.url}[/]"
    if info.step is not None:
        head += f"  step {info.step}"
    root = Tree(f"{head}  saved {_when(info.created)}")
    nodes: dict[str, Tree] = {}
    for a in arrays:
        parent = root
        parts = a.name.split("/")
        for depth in range(1, len(parts)):
            key = "/".join(parts[:depth])
            if key not in nodes:
                nodes[key] = parent.add(f"[bold]{parts[depth - 1]}[/]")
            parent = nodes[key]
        parent.add(_array_line(parts[-1], a))
    out.print(root)
    out.print(
        f"{len(arrays)} of {len(info.arrays)} arrays, {_human(total)} "
        f"({total} bytes)" + (f", filter {pattern!r}" if pattern != "*" else "")
    )
    if info.digest is not None:
        out.print(f"content digest: {info.digest}")
    if info.new_bytes is not None:
        out.print(f"written by its save: {_human(info.new_bytes)} (the rest reused)")
    if info.metrics is not None:
        out.print(f"metrics: {json.dumps(info.metrics, default=str)}")
    if info.metadata is not None:
        out.print("metadata: " + json.dumps(info.metadata, indent=2, default=str))


def _show_values(ckpt: Storage, name: str, as_json: bool) -> None:
    value = np.asarray(load_variable(ckpt, name))
    summary = np.array2string(value, threshold=_SHOWN_VALUES, max_line_width=100)
    if as_json:
        shown: dict[str, Any] = {"summary": summary}
        if value.size <= _SHOWN_VALUES and value.dtype.kind in "biuf":  # JSON numbers
            shown = {"values": value.tolist()}
        _print_json(
            {
                "path": ckpt.url,
                "variable": name,
                "shape": list(value.shape),
                "dtype": str(value.dtype),
                **shown,
            }
        )
        return
    out.print(f"[bold]{name}[/]  {'x'.join(map(str, value.shape)) or 'scalar'} {value.dtype}")
    click.echo(summary)  # not through rich: `[...]` is markup to it


_SHOWN_VALUES = 1000  # numpy's default print threshold


def _array_line(leaf: str, a: ArraySpec) -> str:
    shape = "x".join(map(str, a.shape)) or "scalar"
    grid = "x".join(map(str, a.grid)) or "1"
    key = f", key {a.prng_impl}" if a.prng_impl else ""
    bands = f", {a.band_rows}-row bands" if a.band_rows else ""
    return (
        f"{leaf}  [cyan]{shape}[/] {a.dtype.name}{key}  {_human(a.nbytes)}  "
        f"[dim]chunks {grid}{bands}[/]"
    )


def _array_json(a: ArraySpec) -> dict:
    return {
        "name": a.name,
        "shape": list(a.shape),
        "dtype": a.dtype.name,
        "bytes": a.nbytes,
        "chunk_shape": list(a.chunk_shape),
        "chunk_grid": list(a.grid),
        "prng_impl": a.prng_impl,
        "band_rows": a.band_rows,
    }


@cli.command("verify")
@click.argument("path")
@click.option("--step", type=int, help="Only this step of a manager directory (default: all).")
def verify_command(path: str, step: int | None) -> None:
    """Read every chunk of a checkpoint (or of every step of a manager directory) and check
    sizes, checksums and documents. Exits with 1 and names every bad variable on failure."""
    targets = _checkpoints(path, step)
    bad = 0
    with _workers() as workers:
        for ckpt in targets:
            try:
                total = _data_bytes(_restore.read_root(ckpt))
                with _progress(f"verify {ckpt.name or ckpt.url}", total) as advance:
                    problems = _verify.check(ckpt, workers, progress=advance)
            except CheckpointError as e:
                problems = [_verify.Problem(None, e)]
            if not problems:
                out.print(f"[green]ok[/]  {ckpt.url}  ({_human(total)})")
                continue
            bad += 1
            variables = sorted({p.variable or "(checkpoint)" for p in problems})
            err.print(f"[red]BAD[/] {ckpt.url}: {len(variables)} damaged: {', '.join(variables)}")
            for p in problems:
                err.print(f"  {type(p.error).__name__}: {p.error}", markup=False)
    if bad:
        raise SystemExit(1)


@cli.command("rm")
@click.argument("directory")
@click.option(
    "--step",
    "steps",
    type=int,
    multiple=True,
    required=True,
    help="A step to delete (repeat for several).",
)
def rm_command(directory: str, steps: tuple[int, ...]) -> None:
    """Delete steps of a manager directory (takes the directory's writer lock)."""
    from ._manager import CheckpointManager

    place = open_storage(directory)
    if place.has_directories and place.kind() != "directory":
        raise CheckpointError(f"no directory at {place.url}")
    path = place.url
    with CheckpointManager(place.url, save_on_preemption=False) as mgr:
        missing = [s for s in steps if s not in mgr.all_steps()]
        if missing:
            raise StepNotFoundError(
                f"step {missing[0]} is not in {path}; committed steps: "
                f"{_steps_text(mgr.all_steps())}"
            )
        for s in steps:
            with err.status(f"deleting step {s} of {path}", spinner="dots"):
                mgr.delete(s)
                mgr.wait_until_finished()  # its files (or objects) are gone
            out.print(f"deleted step {s} of {path}")


@cli.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("--step", type=int, help="Copy only this step of a manager directory SRC to DST.")
@click.option(
    "--force", is_flag=True, help="Replace checkpoints at DST that differ from those of SRC."
)
def cp_command(src: str, dst: str, step: int | None, force: bool) -> None:
    """Copy a checkpoint, or every step of a manager directory, between disk and object stores.

    The copy is checked chunk by chunk against its checksums and committed atomically. Run
    again after an interruption, it goes on: checkpoints DST holds already are skipped, and
    the one under way is copied again (into a directory, what it left there is removed)."""
    dest = open_storage(dst)
    if step is not None or _is_checkpoint(open_storage(src)):
        _copy_each([(_resolve(src, step), dest)], force)
        return
    # into a manager directory: hold its writer lock, and remove what an interrupted copy (or
    # save) left there, as a manager opening it would
    pairs = [(ckpt, dest.child(ckpt.name)) for ckpt in _checkpoints(src, None)]
    lock = _directory.lock(dest)
    try:
        for place in _directory.leftovers(dest):
            _directory.remove(place, None)
        _copy_each(pairs, force)
    finally:
        if lock is not None:
            lock.release()


def _copy_each(pairs: list[tuple[Storage, Storage]], force: bool) -> None:
    with _workers() as workers:
        previous = None  # incremental steps: what the step before holds is linked, not copied
        for a, b in pairs:
            total = _data_bytes(_restore.read_root(a))
            with _progress(f"copy {a.name}", total) as advance:
                copied = _copy.copy(a, b, workers, progress=advance, previous=previous, force=force)
            previous = b
            if copied is None:
                out.print(f"{b.url} holds this checkpoint already, skipped")
                continue
            reused = f", {_human(total - copied)} of it reused from the step before" * (
                copied < total
            )
            out.print(f"copied {a.url} -> {b.url} ({_human(total)}{reused})")


@cli.command("export")
@click.argument("path")
@click.argument("output")
@_step_option
@_filter_option
@click.option("--cast", help="Convert floating-point arrays to this dtype (e.g. float32).")
@click.option(
    "--max-inflight-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_INFLIGHT_BYTES,
    show_default=True,
    help="Host memory for arrays read but not yet written (.safetensors is written streamed).",
)
def export_command(
    path: str,
    output: str,
    step: int | None,
    pattern: str,
    cast: str | None,
    max_inflight_bytes: int,
) -> None:
    """Write the arrays of a checkpoint to OUTPUT (.safetensors or .npz), keyed by variable
    name. safetensors keeps bfloat16 and float8; .npz needs --cast for them."""
    ckpt = _resolve(path, step)
    info = _restore.read_root(ckpt)
    names = sorted(n for n in info.arrays if fnmatch.fnmatchcase(n, pattern))
    if not names:
        raise CheckpointError(_no_match(ckpt.url, pattern, list(info.arrays)))
    dtype = None
    if cast is not None:
        try:
            dtype = _dtype(cast)
        except TypeError:
            raise click.BadParameter(f"unknown dtype {cast!r}", param_hint="--cast") from None
    with _workers() as workers:
        n = _export.export(
            ckpt, output, names, workers, cast=dtype, max_inflight_bytes=max_inflight_bytes
        )
    out.print(f"wrote {len(names)} arrays ({_human(n)}) to {output}")


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


@cli.command("import-orbax")
@click.argument("src")
@click.argument("dst")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint at DST.")
@click.option(
    "--skip",
    "skip_items",
    multiple=True,
    metavar="ITEM",
    help="Leave this item of the Orbax step out (repeatable); items asyncckpt cannot convert "
    "are refused otherwise.",
)
def import_orbax_command(src: str, dst: str, force: bool, skip_items: tuple[str, ...]) -> None:
    """Convert the Orbax checkpoint SRC (a step directory, or one PyTree item directory) into an
    asyncckpt checkpoint at DST, keeping names, dtypes, typed PRNG keys, JSON items and
    metrics."""
    from ._orbax import import_orbax

    dest = open_storage(dst)
    if not force and _is_checkpoint(dest):
        raise CheckpointExistsError(
            f"a checkpoint already exists at {dest.url}; pass --force to replace it"
        )
    info = import_orbax(src, dest.url, force=force, skip_items=skip_items)
    out.print(f"imported {info[0]} arrays ({_human(info[1])}) from {src} to {dst}")


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit status (errors: one line on stderr, status 1)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    jax.config.update("jax_platforms", "cpu")  # nothing here needs an accelerator
    try:
        cli.main(args=args, prog_name="asyncckpt", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (CheckpointError, OSError)):
            message += " (unexpected: run again with --debug for the traceback)"
        err.print(f"asyncckpt: error: {message}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
