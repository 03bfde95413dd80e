"""Noticing preemption: SIGTERM is caught so the training loop can save before it exits.

Cluster schedulers (Kubernetes, Slurm, TPU/GPU VM maintenance) send SIGTERM and wait a grace period
before SIGKILL. While a `PreemptionWatch` is active, SIGTERM only sets a flag: the process keeps
running, the loop sees `reached_preemption()` and saves. A Python handler installed before is
still called; the default action (terminate) is not.

Under `jax.distributed` (several processes) the processes must agree on the step to save at. JAX's
preemption sync manager does exactly that: it catches SIGTERM itself, tells every process through
the coordination service, and `reached_preemption_sync_point(step)` becomes true for the same step
everywhere. There we install no handler of our own (it would replace JAX's) and ask JAX.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

from .errors import CheckpointError

log = logging.getLogger("asyncckpt")


class PreemptionWatch:
    def __init__(self, enabled: bool) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._multi_process = enabled and jax.distributed.is_initialized()
        if not enabled or self._multi_process:  # under jax.distributed, JAX watches SIGTERM
            return
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        else:
            log.warning(
                "asyncckpt: save_on_preemption needs the manager to be created on the "
                "main thread (Python only delivers signals there); SIGTERM is not caught"
            )

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self._event.is_set():
            log.warning("asyncckpt: SIGTERM received; the next save() is a preemption save")
        self._event.set()
        if callable(self._previous):
            self._previous(signum, frame)

    def notify(self) -> None:
        """Mark preemption as reached in this process (what SIGTERM does)."""
        self._event.set()

    def reached(self, step: int) -> bool:
        """Whether to save at `step` and stop; stays true once true."""
        if self._event.is_set() or not self._multi_process:
            return self._event.is_set()
        try:
            agreed = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:
            raise CheckpointError(
                f"save_on_preemption needs JAX's preemption sync manager in multi-process runs "
                f"({e}); keep `jax_enable_preemption_service` on (the default) before "
                "jax.distributed.initialize, or pass save_on_preemption=False"
            ) from None
        if agreed:
            log.warning(
                "asyncckpt: all processes reached the preemption sync point at step %d", step
            )
            self._event.set()
        return agreed

    def close(self) -> None:
        """Put the previous handler back, if ours is still the one installed."""
        on_main = threading.current_thread() is threading.main_thread()
        if self._installed and on_main and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False
