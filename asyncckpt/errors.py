"""The exception family of asyncckpt.

Every error raised by this package on purpose is a `CheckpointError`. Each subclass also inherits
the builtin exception it refines, so handlers written for the builtin keep working, e.g. a
`CheckpointNotFoundError` is caught by `except FileNotFoundError`.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error that asyncckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no committed checkpoint at the path (nothing there, or not a checkpoint)."""


class StepNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint manager was asked for a step that it does not hold."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint was never committed, or a file that it lists is missing."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file of the checkpoint exists but its content is damaged (checksum, size or JSON)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """Refused to write: something already exists at the destination path."""


class TreeMismatchError(CheckpointError, ValueError):
    """The target pytree and the saved pytree differ (keypaths, shapes or dtypes)."""


class UnsupportedTypeError(CheckpointError, TypeError):
    """A leaf, dict key or dtype that asyncckpt cannot store."""


class DeletedArrayError(CheckpointError, RuntimeError):
    """A leaf given to `save` was deleted or donated before `save` could copy it."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed; the partial checkpoint was removed and nothing was committed."""


class CheckpointReadError(CheckpointError, OSError):
    """Reading a file of a checkpoint failed for a reason other than damage (permissions, I/O)."""


class DirectoryLockedError(CheckpointError, BlockingIOError):
    """Another writer (a `CheckpointManager`, `asyncckpt rm`) holds the directory's writer lock;
    the message names it (pid, host, since when)."""


class BarrierTimeoutError(CheckpointError, TimeoutError):
    """Under `jax.distributed`, some processes did not reach a collective step of a save,
    restore or deletion in time (`barrier_timeout_s`); the message names them."""


class CoordinatorUnavailableError(CheckpointError, ConnectionError):
    """Under `jax.distributed`, JAX's coordination service (hosted by process 0) stopped
    answering in the middle of a save, restore or deletion; the message names the call."""


class ClosedError(CheckpointError, RuntimeError):
    """The `CheckpointManager` or `AsyncCheckpointer` was closed; open a new one."""


class ReadOnlyError(CheckpointError, PermissionError):
    """A `CheckpointManager` opened with `read_only=True` was asked to save or delete."""


class VariableNotFoundError(CheckpointError, KeyError):
    """The checkpoint has no variable of that name."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""
