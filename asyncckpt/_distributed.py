"""Talking to the other processes of a `jax.distributed` run: barriers and a key-value store.

Everything goes through JAX's coordination service (the client that `jax.distributed.initialize`
creates), so asyncckpt needs no network of its own. Every barrier has a deadline; when it passes,
the error names the processes that never arrived (each process announces its arrival in the
key-value store before waiting).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import jax

from .errors import (
    BarrierTimeoutError,
    CheckpointError,
    CoordinatorUnavailableError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)


def client() -> Any:
    """This process's client of the coordination service (None before
    `jax.distributed.initialize`)."""
    from jax._src import distributed  # the coordination client has no public handle

    return distributed.global_state.client


_calls: dict[str, int] = {}
_calls_lock = threading.Lock()


def call_key(call: str) -> str:
    """A name space for one collective call (`save <path>`, `restore <path>` ...), the same in
    every process: every process makes these calls in the same order, so the n-th call of a
    kind has the same key everywhere. Take a key only for a call every process makes."""
    with _calls_lock:
        n = _calls[call] = _calls.get(call, 0) + 1
    return f"asyncckpt/call/{hashlib.sha256(call.encode()).hexdigest()[:24]}/{n}"


def is_multi_process() -> bool:
    return jax.distributed.is_initialized() and jax.process_count() > 1


class Coordinator:
    """Barriers and small messages among the processes for one collective `call` (`save
    <path>`, `delete <dir> <step>` ...: the same call in every process), under its own name
    space (`call_key`). Every request to the coordination service that finds it gone raises
    `CoordinatorUnavailableError` naming the call."""

    def __init__(self, call: str, timeout_s: float) -> None:
        self.process = jax.process_index()
        self.count = jax.process_count()
        self.call = call
        self.prefix = call_key(call)
        self.timeout_s = timeout_s
        self._client = client()
        if self._client is None:
            raise CheckpointError(
                "jax.distributed is not initialised; call "
                "jax.distributed.initialize() before saving from several "
                "processes"
            )

    def _ms(self) -> int:
        return max(1, int(self.timeout_s * 1000))

    def _request(self, method: str, *args: Any) -> Any:
        """`self._client.<method>(*args)`; the coordinator gone: `CoordinatorUnavailableError`."""
        try:
            return getattr(self._client, method)(*args)
        except jax.errors.JaxRuntimeError as e:
            if _unreachable(e):
                raise self._unavailable(method, e) from e
            raise

    def _unavailable(self, method: str, e: Exception) -> CoordinatorUnavailableError:
        return CoordinatorUnavailableError(
            f"{self.call}: the coordinator of this jax.distributed job (process 0, which hosts "
            f"JAX's coordination service) is unreachable from process {self.process} of "
            f"{self.count} ({method}): process 0 died or its host cannot be reached. A step "
            "is committed only if process 0 wrote its root zarr.json before; restart every "
            "process of the job and restore the latest committed step. "
            f"({type(e).__name__}: {str(e)[:300]})"
        )

    def barrier(self, name: str, what: str) -> None:
        """Wait until every process arrives at `name`, or raise naming the ones that did not."""
        key = f"{self.prefix}/barrier/{name}"
        self._request("key_value_set", f"{self.prefix}/arrived/{name}/{self.process}", "1")
        try:
            self._client.wait_at_barrier(key, self._ms())
        except Exception as e:  # JaxRuntimeError: DEADLINE_EXCEEDED, or the service went away
            if isinstance(e, jax.errors.JaxRuntimeError) and _unreachable(e):
                raise self._unavailable("wait_at_barrier", e) from e
            try:
                arrived = {
                    int(k.rsplit("/", 1)[-1])
                    for k, _ in self._client.key_value_dir_get(f"{self.prefix}/arrived/{name}/")
                }
            except Exception:  # the coordinator itself (process 0) is gone
                arrived = {self.process}
            missing = sorted(set(range(self.count)) - arrived)
            raise BarrierTimeoutError(
                f"{what}: processes {missing} of {self.count} did not arrive within "
                f"{self.timeout_s:g} s (barrier {key}); they crashed, hang, or did not call the "
                f"same call. ({type(e).__name__}: {str(e)[:300]})"
            ) from e

    def put(self, name: str, value: Any) -> None:
        self._request("key_value_set", f"{self.prefix}/data/{name}", json.dumps(value))

    def get(self, name: str) -> Any:
        """The value another process `put` under `name` (waits for it up to the deadline)."""
        return json.loads(
            self._request("blocking_key_value_get", f"{self.prefix}/data/{name}", self._ms())
        )

    def agree(self, name: str, error: Exception | None, what: str) -> Exception | None:
        """Tell every process whether this one failed at `what`, and learn whether any did: the
        error to raise here (this process's own, or one naming the first process that failed),
        or None when all succeeded. Damage found by another process comes back as a
        `CorruptCheckpointError`, so that every process reacts to it alike (e.g. falls back)."""
        damaged = isinstance(error, (CorruptCheckpointError, IncompleteCheckpointError))
        self.put(
            f"{name}/{self.process}",
            None if error is None else {"damaged": damaged, "message": str(error)[:2000]},
        )
        self.barrier(name, what)
        if error is not None:
            return error
        failed = sorted((p, m) for p, m in self.gather(name).items() if m is not None)
        if not failed:
            return None
        p, message = failed[0]
        kind = CorruptCheckpointError if message["damaged"] else CheckpointError
        return kind(f"{what}: process {p} of {self.count} failed: {message['message']}")

    def gather(self, name: str) -> dict[int, Any]:
        """Values each process `put` under `name/<process>`, keyed by process (those present)."""
        items = self._request("key_value_dir_get", f"{self.prefix}/data/{name}/")
        return {int(k.rsplit("/", 1)[-1]): json.loads(v) for k, v in items}


def _unreachable(e: Exception) -> bool:
    """Whether a coordination-service error means the service is gone (gRPC UNAVAILABLE: its
    process died, or the network to it), not a deadline or a refused request."""
    return str(e).lstrip().startswith("UNAVAILABLE") or "Socket closed" in str(e)
