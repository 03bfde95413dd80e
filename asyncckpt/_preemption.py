"""Noticing preemption: SIGTERM is caught so the training loop can save before it exits.

Cluster schedulers (Kubernetes, Slurm, TPU/GPU VM maintenance) send SIGTERM and wait a grace period
before SIGKILL. While a `PreemptionWatch` is active, SIGTERM only sets a flag: the process keeps
running, the loop sees `reached_preemption()` and saves. A Python handler installed before is
still called; the default action (terminate) is not.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("asyncckpt")


class PreemptionWatch:
    def __init__(self, enabled: bool) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._installed = False
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        elif enabled:
            log.warning("asyncckpt: save_on_preemption needs the manager to be created on the "
                        "main thread (Python only delivers signals there); SIGTERM is not caught")

    @property
    def installed(self) -> bool:
        return self._installed

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self._event.is_set():
            log.warning("asyncckpt: SIGTERM received; the next save() is a preemption save")
        self._event.set()
        if callable(self._previous):
            self._previous(signum, frame)

    def notify(self) -> None:
        """Mark preemption as reached (what SIGTERM does)."""
        self._event.set()

    def reached(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        """Put the previous handler back, if ours is still the one installed."""
        if self._installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False
