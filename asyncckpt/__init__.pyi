"""The public API of asyncckpt, stated once: type checkers read this file, and `__init__.py`
imports each name from the module given here on first use."""

from ._checkpointer import AsyncCheckpointer as AsyncCheckpointer
from ._checkpointer import VariableInfo as VariableInfo
from ._checkpointer import list_variables as list_variables
from ._checkpointer import load_safetensors as load_safetensors
from ._checkpointer import load_variable as load_variable
from ._checkpointer import read_metadata as read_metadata
from ._checkpointer import restore as restore
from ._checkpointer import save as save
from ._manager import CheckpointManager as CheckpointManager
from ._orbax import import_orbax as import_orbax
from ._retention import KeepBest as KeepBest
from ._retention import KeepEveryNHours as KeepEveryNHours
from ._retention import KeepEveryNSteps as KeepEveryNSteps
from ._retention import KeepLastN as KeepLastN
from ._retention import RetentionPolicy as RetentionPolicy
from ._retention import StepInfo as StepInfo
from ._storage import configure_storage as configure_storage
from ._telemetry import RestoreStats as RestoreStats
from ._telemetry import SaveStats as SaveStats
from ._verify import verify as verify
from .errors import BarrierTimeoutError as BarrierTimeoutError
from .errors import CheckpointError as CheckpointError
from .errors import CheckpointExistsError as CheckpointExistsError
from .errors import CheckpointNotFoundError as CheckpointNotFoundError
from .errors import CheckpointReadError as CheckpointReadError
from .errors import CheckpointWriteError as CheckpointWriteError
from .errors import ClosedError as ClosedError
from .errors import CoordinatorUnavailableError as CoordinatorUnavailableError
from .errors import CorruptCheckpointError as CorruptCheckpointError
from .errors import DeletedArrayError as DeletedArrayError
from .errors import DirectoryLockedError as DirectoryLockedError
from .errors import IncompleteCheckpointError as IncompleteCheckpointError
from .errors import ReadOnlyError as ReadOnlyError
from .errors import StepNotFoundError as StepNotFoundError
from .errors import TreeMismatchError as TreeMismatchError
from .errors import UnsupportedTypeError as UnsupportedTypeError
from .errors import VariableNotFoundError as VariableNotFoundError

__version__: str
