"""Noticing preemption: SIGTERM is caught so the training loop can save before it exits.

Cluster schedulers (Kubernetes, Slurm, TPU/GPU VM maintenance) send SIGTERM and wait a grace period
before SIGKILL. While a `PreemptionWatch` is active, SIGTERM only sets a flag: the process keeps
running, the loop sees `reached_preemption()` and saves. A Python handler installed before is
still called; the default action (terminate) is not, until every watch is closed. A process
forked from this one (a multiprocessing worker) does not inherit the handler.

Under `jax.distributed` (several processes) the processes must agree on the step to save at. JAX's
preemption sync manager does exactly that: it catches SIGTERM itself, tells every process through
the coordination service, and `reached_preemption_sync_point(step)` becomes true for the same step
everywhere. There we install no handler of our own (it would replace JAX's) and ask JAX.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

from .errors import CheckpointError

log = logging.getLogger("asyncckpt")


# One SIGTERM handler per process, whatever the number of watches: installed by the first
# watch, it tells every open watch and then calls the handler found before it; the last watch
# to close puts that one back. So managers may be closed in any order, and a process whose
# watches are all closed terminates on SIGTERM as it did before (issue 21: closing two managers
# first-in-first-out used to leave the closed one's handler, which swallowed SIGTERM).
_mutex = threading.RLock()  # re-entered by `_dispatch` if SIGTERM lands inside it
_watches: list[PreemptionWatch] = []
_original: Any = None  # the handler found when ours was installed
_installed = False


def _dispatch(signum: int, frame: FrameType | None) -> None:
    with _mutex:
        watches, original = list(_watches), _original
    for watch in watches:
        watch._fired()
    if callable(original):
        original(signum, frame)
    elif not watches and original in (signal.SIG_DFL, None):
        # nobody watches any more and we could not put the default back (closed off the main
        # thread): do what the default does
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _register(watch: PreemptionWatch) -> None:
    global _original, _installed
    with _mutex:
        if not _installed or signal.getsignal(signal.SIGTERM) is not _dispatch:
            _original = signal.signal(signal.SIGTERM, _dispatch)
            _installed = True
        _watches.append(watch)


def _unregister(watch: PreemptionWatch) -> None:
    global _original, _installed
    with _mutex:
        if watch in _watches:
            _watches.remove(watch)
        if _watches or not _installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # Python sets handlers on the main thread only: `_dispatch` stands in
        if signal.getsignal(signal.SIGTERM) is _dispatch:
            signal.signal(signal.SIGTERM, _original if _original is not None else signal.SIG_DFL)
        _installed, _original = False, None


def _after_fork_in_child() -> None:
    """A forked child (a multiprocessing worker) is not the training process: it gets the
    handler that was there before asyncckpt's, so `terminate()` ends it."""
    global _original, _installed, _mutex
    _mutex = threading.RLock()  # it may have been held by a thread that does not exist here
    _watches.clear()
    if _installed and signal.getsignal(signal.SIGTERM) is _dispatch:
        signal.signal(signal.SIGTERM, _original if _original is not None else signal.SIG_DFL)
    _installed, _original = False, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PreemptionWatch:
    def __init__(self, enabled: bool) -> None:
        self._event = threading.Event()
        self._installed = False
        self._multi_process = enabled and jax.distributed.is_initialized()
        if not enabled or self._multi_process:  # under jax.distributed, JAX watches SIGTERM
            return
        if threading.current_thread() is threading.main_thread():
            _register(self)
            self._installed = True
        else:
            log.warning(
                "asyncckpt: save_on_preemption needs the manager to be created on the "
                "main thread (Python only delivers signals there); SIGTERM is not caught"
            )

    def _fired(self) -> None:
        if not self._event.is_set():
            log.warning("asyncckpt: SIGTERM received; the next save() is a preemption save")
        self._event.set()

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
        """Stop watching; the last watch to close puts the previous handler back."""
        if self._installed:
            _unregister(self)
        self._installed = False
