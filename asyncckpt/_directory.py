"""A manager directory: which steps it holds, and taking steps out of it.

The names are the format's (`_format`: `<step>/`, leftovers, `<step>.damaged-<time>`); what a
place holds and how a step leaves the listing is the storage's (`Storage.checkpoint_states`,
`unlist`, `set_aside`, `leftovers`). docs/FORMAT.md "Manager directory" describes the layout.
"""

from __future__ import annotations

import time

from . import _format
from ._storage import Storage, WriterLock
from .errors import CheckpointWriteError


def step_storage(directory: Storage, step: int) -> Storage:
    """The checkpoint of `step` in `directory`."""
    return directory.child(_format.step_name(step))


def committed_steps(directory: Storage) -> list[int]:
    """The committed steps in `directory`, ascending (a missing directory has none)."""
    names = [n for n in directory.list_dir() if _format.parse_step(n) is not None]
    states = directory.checkpoint_states(names)
    return sorted(int(n) for n, state in zip(names, states) if state == "committed")


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
