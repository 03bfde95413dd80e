"""A manager directory: which steps it holds, and taking steps out of it.

The names are the format's (`_format`: `<step>/`, leftovers, `<step>.damaged-<time>`); what a
place holds and how a step leaves the listing is the storage's (`Storage.checkpoint_states`,
`unlist`, `set_aside`, `leftovers`). docs/FORMAT.md "Manager directory" describes the layout.
"""

from __future__ import annotations

import logging
import threading
import time

from . import _format
from ._storage import Storage, WriterLock
from .errors import CheckpointWriteError

log = logging.getLogger("asyncckpt")


def step_storage(directory: Storage, step: int) -> Storage:
    """The checkpoint of `step` in `directory`."""
    return directory.child(_format.step_name(step))


def committed_steps(directory: Storage) -> list[int]:
    """The committed steps in `directory`, ascending (a missing directory has none): folders
    named by a step number whose root document is asyncckpt's. Anything else there (a Zarr group
    another program saved as `<dir>/3`) is never listed, counted or deleted."""
    listed = directory.list_dir()
    for _ in range(_RELISTS):
        names = [n for n in listed if _format.parse_step(n) is not None]
        states = directory.checkpoint_states(names)
        steps = sorted(
            int(n)
            for n, state in zip(names, states)
            if state == "committed" and _is_ours(directory, n)
        )
        # A writer may have committed a step and deleted an older one between the listing and
        # the checks (rename tmp -> <step>, <old> -> deleting): then what was checked is stale,
        # even empty. The answer stands once a listing taken after the checks is the same.
        again = directory.list_dir()
        if again == listed:
            break
        listed = again
    return steps


_RELISTS = 8  # listings before the last answer is taken as it is (a writer saving very fast)
_OURS: dict[str, set[str]] = {}  # directory url -> step names known to be asyncckpt's
_OURS_LOCK = threading.Lock()


def _is_ours(directory: Storage, name: str) -> bool:
    """Whether `<name>/zarr.json` is an asyncckpt root document. Its first bytes tell (the
    writer puts its attributes first); anything else is parsed whole. Remembered per directory
    once true, so a listing reads each step once per process."""
    with _OURS_LOCK:
        if name in _OURS.get(directory.url, ()):
            return True
    step = directory.child(name)
    try:
        head = step.get(_format.DOC, start=0, end=len(_format.ROOT_PREFIX)).tobytes()
        ours = head == _format.ROOT_PREFIX or step.is_checkpoint()
    except FileNotFoundError:
        return False  # deleted since it was listed
    except OSError as e:
        _warn_once(step, f"cannot be read ({e}); it is not listed as a step until it can")
        return False
    if ours:
        with _OURS_LOCK:
            _OURS.setdefault(directory.url, set()).add(name)
    else:
        _warn_once(
            step,
            "holds a Zarr group that asyncckpt did not write; it is not a step and is left alone",
        )
    return ours


_WARNED: set[str] = set()


def _warn_once(step: Storage, message: str) -> None:
    with _OURS_LOCK:
        if step.url in _WARNED:
            return
        _WARNED.add(step.url)
    log.warning("asyncckpt: %s %s", step.url, message)


def leftovers(directory: Storage) -> list[Storage]:
    """Interrupted saves and deletions in `directory`."""
    return directory.leftovers()


def damaged(directory: Storage) -> list[str]:
    """Names of the damaged steps set aside in `directory` (`set_aside`)."""
    return [n for n in directory.list_dir() if _format.is_damaged(n)]


def start_delete(directory: Storage, step: int) -> Storage:
    """Take `step` out of the listing, durably; return what still holds its files (`remove`
    them later, e.g. in the background). FileNotFoundError if the step is already gone."""
    return step_storage(directory, step).unlist()


def set_aside(directory: Storage, step: int) -> Storage:
    """Move the damaged `step` out of the listing, whole, to `<step>.damaged-<UTC time>` next
    to it (a name no listing, retention or clean-up takes for a step); return that place."""
    name = _format.damaged_name(step, time.time(), damaged(directory))
    return step_storage(directory, step).set_aside(name)


def lock(directory: Storage) -> WriterLock | None:
    """Prepare `directory` for a writer and take its lock (None where there are no locks)."""
    directory.prepare_directory()
    return directory.lock()


def remove(place: Storage, step: int | None) -> None:
    """Remove the files of a step taken out of the listing, or of a leftover."""
    try:
        place.remove()
    except FileNotFoundError:
        pass
    except OSError as e:
        what = f"step {step}" if step is not None else "leftover files"
        raise CheckpointWriteError(
            e.errno,
            f"could not remove the files of {what} at {place.url}: {e.strerror}; the "
            "step is no longer listed, and the next writer to open the directory retries",
        ) from e
