"""A manager directory on a local file system: step folders, leftovers, deletion, the writer lock.

Layout: `<directory>/<step>/` is the checkpoint of `step` (decimal, no padding); it counts as
committed once its root `zarr.json` exists, which the atomic rename of a finished save guarantees.
Hidden siblings named `.<step>.asyncckpt-tmp-<hex>` (a save in progress) and
`.<step>.asyncckpt-deleting-<hex>` (a step being deleted) are never listed; a writer that opens the
directory removes those left by a crashed process. `.asyncckpt.lock` is the writer lock. A damaged
step that a restore fell back from is set aside as `<step>.damaged-<UTC time>`: kept whole for
inspection, never listed, counted, restored or deleted.

In an object store (`s3://...`) the same names are prefixes: a step is committed once its root
`zarr.json` exists; a prefix without one but with the `.asyncckpt-uncommitted` marker is a
leftover. Deleting a step marks it uncommitted, removes its root document (it leaves the listing),
then its other objects, all before `start_delete` returns. Setting a damaged step aside copies its
objects (server-side) to the new prefix, then deletes the step the same way. There is no lock: an
object store has no advisory locks, so keeping to one writer per prefix is the caller's job.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid

from . import _format, _remote, _store
from .errors import CheckpointError, CheckpointWriteError

_STEP = re.compile(r"(0|[1-9][0-9]{0,18})\Z")
_LEFTOVER = re.compile(r"\..+\.asyncckpt-(tmp|deleting)-[0-9a-f]{12}\Z")
_DAMAGED = re.compile(r"(0|[1-9][0-9]{0,18})\.damaged-[0-9T]+Z(-[0-9a-f]{6})?\Z")
LOCK_NAME = ".asyncckpt.lock"


def step_path(directory: str, step: int | str) -> str:
    return os.path.join(directory, str(step))  # also joins URLs: "s3://b/run" -> "s3://b/run/7"


def _remote_steps(directory: str) -> tuple[list[int], list[str]]:
    """(committed steps, leftover prefixes) of a manager directory in an object store."""
    committed, left = [], []
    steps = [name for name in _remote.list_dir(directory) if _STEP.match(name)]
    for name, names in zip(steps, _remote.list_dirs([_remote.join(directory, n) for n in steps])):
        if _format.DOC in names:
            committed.append(int(name))
        elif _remote.UNCOMMITTED in names:
            left.append(_remote.join(directory, name))
    return sorted(committed), left


def committed_steps(directory: str) -> list[int]:
    """The committed steps in `directory`, ascending (a missing directory has none)."""
    if _remote.is_url(directory):
        return _remote_steps(directory)[0]
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    steps = [int(e.name) for e in entries if _STEP.match(e.name) and e.is_dir(follow_symlinks=False)
             and os.path.isfile(os.path.join(e.path, _format.DOC))]
    return sorted(steps)


def leftovers(directory: str) -> list[str]:
    """Paths of interrupted saves and deletions in `directory`."""
    if _remote.is_url(directory):
        return _remote_steps(directory)[1]
    try:
        return sorted(e.path for e in os.scandir(directory) if _LEFTOVER.match(e.name))
    except FileNotFoundError:
        return []


def damaged(directory: str) -> list[str]:
    """Names of the damaged steps set aside in `directory` (`set_aside`)."""
    try:
        entries = (_remote.list_dir(directory) if _remote.is_url(directory)
                   else os.listdir(directory))
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if _DAMAGED.match(n))


def start_delete(directory: str, step: int) -> str:
    """Take `step` out of the directory in one atomic rename (durable), and return the hidden
    path that still holds its files; removing those can happen later, in the background.
    In an object store the step is removed here, in full: a save of the same step could
    otherwise race its removal. A step that is already gone raises FileNotFoundError."""
    if _remote.is_url(directory):
        path = step_path(directory, step)
        _remove_remote_step(path)
        return path
    trash = os.path.join(directory, f".{step}.asyncckpt-deleting-{uuid.uuid4().hex[:12]}")
    os.rename(step_path(directory, step), trash)
    _store.fsync_dir(directory)
    return trash


def _remove_remote_step(path: str) -> None:
    if not _remote.exists(_remote.join(path, _format.DOC)):
        raise FileNotFoundError(errno.ENOENT, "no committed step there", path)
    _remote.put(_remote.join(path, _remote.UNCOMMITTED), b"")
    _remote.delete(_remote.join(path, _format.DOC))  # it leaves the listing here
    _remote.delete_prefix(path)


def set_aside(directory: str, step: int) -> str:
    """Move the damaged `step` out of the listing, whole, to `<step>.damaged-<UTC time>` next to
    it (a name no listing, retention or clean-up takes for a step); return its new path. In an
    object store its objects are copied there, then the step is deleted."""
    name = f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if name in damaged(directory):
        name += f"-{uuid.uuid4().hex[:6]}"
    src, dst = step_path(directory, step), step_path(directory, name)
    if _remote.is_url(directory):
        _remote.copy_prefix(src, dst)
        _remove_remote_step(src)
    else:
        os.rename(src, dst)
        _store.fsync_dir(directory)
    return dst


def lock(directory: str) -> DirectoryLock | None:
    """The writer lock of a local directory (created if missing); None in an object store."""
    if _remote.is_url(directory):
        return None
    os.makedirs(directory, exist_ok=True)
    _store.spread_subdirectories(directory)
    return DirectoryLock(directory)


class DirectoryLock:
    """An exclusive `flock` on `<directory>/.asyncckpt.lock`, held while a manager may write.

    The kernel drops it when the process dies, so a crash never leaves the directory locked. The
    file records who holds it, for the error message of the next writer."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"another CheckpointManager{holder} is writing to {directory}; two writers would "
                "interleave their steps and deletions. Close the other one first, or open this "
                "one with read_only=True to only restore."
            ) from None
        except OSError:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f" (pid {int(info['pid'])} on {str(info['host'])[:100]}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def remove(path: str, step: int | None) -> None:
    """Remove the files (or objects) of a step taken out of the listing, or of a leftover."""
    try:
        if _remote.is_url(path):
            _remote.delete_prefix(path)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        what = f"step {step}" if step is not None else "leftover files"
        raise CheckpointWriteError(
            e.errno, f"could not remove the files of {what} at {path}: {e.strerror}; the step is "
            "no longer listed, and the next writer to open the directory retries") from e
