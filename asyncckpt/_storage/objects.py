"""`ObjectStorage`: checkpoints in object stores (`s3://`, `gs://`, `az://`, `memory://`).

Each call runs one request (or one batch of them) on zarr's own I/O event loop (`zarr`'s `sync`),
so the number of requests in flight is the number of worker threads calling. The stores are
zarr's `ObjectStore` over obstore (Rust; chosen over fsspec/s3fs for speed, see
benchmarks/README.md), one per bucket, configured the usual way: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (`AWS_ALLOW_HTTP=true` for a plain-http
endpoint), `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`, ..., or through
`asyncckpt.configure_storage`. `memory://` is an in-process store, one per bucket name.

There is no rename in an object store, so a checkpoint is written in place and committed by its
root `zarr.json`, written last (docs/FORMAT.md). While a save or a deletion is in progress the
prefix holds the `.asyncckpt-uncommitted` marker, which marks its objects as asyncckpt's to remove.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import itertools
import re
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import numpy as np

from .. import _format
from ..errors import CorruptCheckpointError
from .base import State, Storage

SCHEMES = ("s3", "gs", "az", "memory")
ALIASES = {"gcs": "gs", "abfs": "az", "azure": "az", "s3a": "s3"}
_CONCURRENCY = 64  # requests in flight when one call makes many (deleting a prefix)

_stores: dict[tuple[str, str], Any] = {}
_options: dict[tuple[str, str], dict[str, Any]] = {}
_stores_lock = threading.Lock()


def normalize(url: str) -> str:
    """`scheme://bucket/prefix` with a known scheme, no trailing or doubled slashes."""
    scheme, _, rest = url.partition("://")
    scheme = ALIASES.get(scheme.lower(), scheme.lower())
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown URL scheme {scheme!r} in {url!r}: asyncckpt reads and writes local paths, "
            "file://, s3://, gs://, az:// and memory:// URLs"
        )
    parts = [p for p in rest.split("/") if p]
    if not parts:
        raise ValueError(f"{url!r} names no bucket: write {scheme}://BUCKET/PREFIX")
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{url!r}: '.' and '..' are not allowed in object-store URLs")
    return f"{scheme}://" + "/".join(parts)


def _bucket(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    return scheme, rest.partition("/")[0]


def configure(url: str, options: dict[str, Any]) -> None:
    """How to connect to the bucket of `url` from now on (`asyncckpt.configure_storage`)."""
    scheme, bucket = _bucket(normalize(url))
    with _stores_lock:
        _options[(scheme, bucket)] = dict(options)
        _stores.pop((scheme, bucket), None)


def _store_of(url: str) -> Any:
    """The zarr store of the bucket of `url` (made on first use)."""
    scheme, bucket = _bucket(url)
    with _stores_lock:
        store = _stores.get((scheme, bucket))
        if store is None:
            options = _options.get((scheme, bucket), {})
            store = _stores[(scheme, bucket)] = _open_store(scheme, bucket, options)
    return store


def _open_store(scheme: str, bucket: str, options: dict[str, Any]) -> Any:
    try:
        import obstore.store
    except ImportError:
        raise ImportError(
            f"{scheme}:// checkpoints need obstore: pip install 'asyncckpt[cloud]' "
            "(or pip install obstore)"
        ) from None
    from zarr.storage import ObjectStore

    if scheme == "memory":  # one in-memory bucket per name and process, for tests and examples
        return ObjectStore(obstore.store.MemoryStore())
    options = {"retry_config": RETRY_CONFIG, **options}
    return ObjectStore(obstore.store.from_url(f"{scheme}://{bucket}", **options))


RETRY_CONFIG: dict[str, Any] = {
    "max_retries": 30,
    "retry_timeout": datetime.timedelta(seconds=30),
    "backoff": {
        "init_backoff": datetime.timedelta(milliseconds=100),
        "max_backoff": datetime.timedelta(seconds=2),
        "base": 4,
    },
}
"""How each request retries (server errors, refused or dropped connections, timeouts) unless
`configure_storage(url, retry_config=...)` says otherwise: for up to 30 s after it was first
sent, backing off from 0.1 s to 2 s between tries (at most 30). So an outage of up to about
25 s is ridden out (the request goes through within 2 s of the store's return), and a store
still unreachable after 30 s fails the request. obstore's own default (10 tries, base 2) gave up
after about 1.5 s (issue 21)."""


def _run(request: Callable[[], Coroutine[Any, Any, Any]], url: str, what: str) -> Any:
    """Run one request (or one batch: `request()` makes its coroutine) on zarr's event loop;
    errors become OSErrors that say what to check.

    A connection that dropped under a request (reset, closed, a pooled one found dead) is tried
    again here within the bucket's retry window (`RETRY_CONFIG` unless configured): obstore's
    object_store retries such errors only in some of its versions and only for some of their
    forms ("error sending request ... retries: 0"). Every request asyncckpt sends may be sent
    twice: reads, listings, and writes and deletions of whole objects."""
    from zarr.core.sync import sync

    retries, window = _retry_limits(url)
    deadline = time.monotonic() + window
    delay = 0.1
    for attempt in itertools.count():
        try:
            return sync(request())
        except FileNotFoundError:
            raise
        except Exception as e:
            if attempt < retries and _dropped_connection(e) and time.monotonic() < deadline:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
                continue
            if isinstance(e, OSError):
                raise OSError(e.errno or errno.EIO, f"{what} {url} failed: {e}") from e
            # obstore's errors: credentials, endpoint, bucket, network
            raise OSError(errno.EIO, f"{what} {url} failed: {_hint(e)}") from e
    raise AssertionError("unreachable")


_DROPPED = ("error sending request", "connection reset", "connection closed", "broken pipe")


def _dropped_connection(e: Exception) -> bool:
    """Whether `e` says a connection dropped under the request (not a refusal, not a status)."""
    text = str(e).lower()
    return any(s in text for s in _DROPPED)


def _retry_limits(url: str) -> tuple[int, float]:
    """(tries after the first, seconds) that a dropped connection is retried for at `url`."""
    scheme, bucket = _bucket(url)
    with _stores_lock:
        config = _options.get((scheme, bucket), {}).get("retry_config") or RETRY_CONFIG
    timeout = config.get("retry_timeout", RETRY_CONFIG["retry_timeout"])
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    return int(config.get("max_retries", RETRY_CONFIG["max_retries"])), float(seconds)


def _hint(e: Exception) -> str:
    """The gist of an object-store error (S3's XML `Code: Message` where there is one) and what
    to check."""
    text = f"{type(e).__name__}: {e}".strip()
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    if code:
        text = f"{code.group(1)}: {message.group(1) if message else ''}".strip()
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return f"{text.splitlines()[0]} (the bucket does not exist: create it first)"
    if "169.254.169.254" in low or "metadata" in low:  # no credentials: asked the instance
        return (
            "no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY), or pass "
            "them with asyncckpt.configure_storage (the instance metadata service did not "
            f"answer: {text.splitlines()[0][:200]})"
        )
    if any(
        s in low
        for s in (
            "credential",
            "unauthenticated",
            "accessdenied",
            "signature",
            "permission",
            "forbidden",
        )
    ):
        return (
            f"{text.splitlines()[0]} (check the credentials: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, or your cloud's profile)"
        )
    if any(
        s in low
        for s in (
            "connect",
            "dns",
            "timed out",
            "timeout",
            "error sending request",
            "broken pipe",
            "reset by peer",
            "incomplete",
        )
    ):
        return (
            f"{text.splitlines()[0]} (cannot reach the object store: check AWS_ENDPOINT_URL "
            "and the network)"
        )
    return text.splitlines()[0] if text else type(e).__name__


# Listings go to obstore itself: zarr-python's `ObjectStore.list_dir` in 3.1.0 cut the prefix
# off with `str.lstrip` (characters, not a prefix) and lost names.


async def _names_under(store: Any, prefix: str) -> list[str]:
    """The names directly under `prefix` ("a/b/" or "" for the bucket's root), sorted."""
    import obstore

    result = await obstore.list_with_delimiter_async(store, prefix=prefix.rstrip("/") or None)
    paths = [*result["common_prefixes"], *(meta["path"] for meta in result["objects"])]
    return sorted({p[len(prefix) :].strip("/") for p in paths if p.startswith(prefix)} - {""})


async def _keys_under(store: Any, prefix: str) -> list[str]:
    """Every object key under `prefix` ("a/b/"), at any depth."""
    import obstore

    keys: list[str] = []
    async for batch in obstore.list(store, prefix=prefix.rstrip("/") or None, chunk_size=1000):
        keys += [meta["path"] for meta in batch if meta["path"].startswith(prefix)]
    return keys


def _buffer(data: Any) -> Any:
    from zarr.core.buffer import cpu

    return cpu.Buffer.from_array_like(np.frombuffer(data, np.uint8))


class ObjectStorage(Storage):
    network = True

    def __init__(self, url: str) -> None:
        self.url = normalize(url)
        self._key = self.url.partition("://")[2].partition("/")[2]

    def child(self, key: str) -> ObjectStorage:
        return ObjectStorage(f"{self.url}/{key}")

    def _resolve(self, key: str) -> tuple[Any, str]:
        """(zarr store of the bucket, object key) of `key`."""
        return _store_of(self.url), "/".join(p for p in (self._key, key) if p)

    def _prefix(self, key: str = "") -> str:
        full = self._resolve(key)[1]
        return full + "/" if full else ""

    # -- bytes -----------------------------------------------------------------------------------

    def read_small(self, key: str, limit: int) -> bytes:
        data = self.get(key, start=0, end=limit + 1)
        if data.nbytes > limit:
            raise CorruptCheckpointError(
                f"{self.path(key)} is {data.nbytes} bytes, more than the {limit} allowed"
            )
        return data.tobytes()

    def exists(self, key: str) -> bool:
        store, full = self._resolve(key)
        return bool(_run(lambda: store.exists(full), self.path(key), "looking for"))

    def write(self, key: str, *buffers: Any) -> None:
        store, full = self._resolve(key)
        views = [memoryview(b).cast("B") for b in buffers]
        data = (
            views[0]
            if len(views) == 1
            else np.concatenate([np.frombuffer(v, np.uint8) for v in views])
        )
        _run(lambda: store.set(full, _buffer(data)), self.path(key), "writing")

    def reuse_chunk(self, key: str, source: Storage, source_key: str) -> bool:
        """A server-side copy inside the bucket: an object of its own, no bytes uploaded."""
        import obstore

        if not isinstance(source, ObjectStorage):
            return False
        store, full = self._resolve(key)
        theirs, their_key = source._resolve(source_key)
        if store is not theirs:
            return False

        async def copy() -> None:
            await obstore.copy_async(store.store, their_key, full)

        try:
            _run(copy, self.path(key), "copying")
        except OSError:
            return False
        return True

    def get(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        suffix: int | None = None,
    ) -> np.ndarray:
        from zarr.abc.store import (
            ByteRequest,
            OffsetByteRequest,
            RangeByteRequest,
            SuffixByteRequest,
        )
        from zarr.core.buffer import default_buffer_prototype

        store, full = self._resolve(key)
        request: ByteRequest | None = None
        if suffix is not None:
            request = SuffixByteRequest(suffix)
        elif start is not None or end is not None:
            start = start or 0
            request = OffsetByteRequest(start) if end is None else RangeByteRequest(start, end)
        buf = _run(
            lambda: store.get(full, default_buffer_prototype(), request), self.path(key), "reading"
        )
        if buf is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.path(key))
        return buf.as_numpy_array()

    def size(self, key: str) -> int:
        store, full = self._resolve(key)
        return int(_run(lambda: store.getsize(full), self.path(key), "looking at"))

    def kind(self) -> Literal["missing", "file", "directory"]:
        if self.list_dir():
            return "directory"
        return "file" if self._key and self.exists("") else "missing"

    def delete(self, key: str) -> None:
        store, full = self._resolve(key)
        _run(lambda: store.delete(full), self.path(key), "deleting")

    # -- listing ---------------------------------------------------------------------------------

    def list_dir(self, key: str = "") -> list[str]:
        return self.list_dirs([key])[0]

    def list_dirs(self, keys: list[str]) -> list[list[str]]:
        """The listings are requested together."""
        if not keys:
            return []
        store = _store_of(self.url)
        prefixes = [self._prefix(k) for k in keys]
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def collect(prefix: str) -> list[str]:
            async with limit:
                return await _names_under(store.store, prefix)

        async def collect_all() -> list[list[str]]:
            return list(await asyncio.gather(*(collect(p) for p in prefixes)))

        what = self.path(keys[0]) + (" ..." if len(keys) > 1 else "")
        return _run(collect_all, what, "listing")

    def checkpoint_states(self, names: list[str]) -> list[State]:
        states: list[State] = []
        for contents in self.list_dirs(names):
            if _format.DOC in contents:
                states.append("committed")
            elif _format.UNCOMMITTED in contents:
                states.append("leftover")
            else:
                states.append(None)
        return states

    # -- writing a checkpoint --------------------------------------------------------------------

    def begin(self, *, replace: bool) -> ObjectStorage:
        """This prefix itself, marked uncommitted. The leftovers of an interrupted save here are
        removed first, and with `replace` an existing checkpoint too: an object store cannot
        swap prefixes, so the old checkpoint is gone before the new one is committed (its root
        document first, so that it stops being a checkpoint before any of it goes)."""
        names = self.list_dir()
        self._refuse_foreign(names, replace=replace)
        if names:
            self._unmark_and_remove()
        self.write(_format.UNCOMMITTED, b"")
        return self

    def sync(self) -> None:
        """Every acknowledged write is durable already."""

    def commit(self, staged: Storage, *, replace: bool) -> None:
        """The root document written last committed the checkpoint: only the marker goes."""
        try:
            self.delete(_format.UNCOMMITTED)
        except OSError:
            pass  # committed all the same; the marker is ignored where a root document exists

    def discard(self, staged: Storage) -> None:
        try:
            if staged.exists(_format.DOC):
                return  # committed in place already
            staged.remove()
        except OSError:
            pass  # still marked uncommitted: the next writer removes it

    # -- deleting --------------------------------------------------------------------------------

    def _unmark_and_remove(self) -> None:
        self.write(_format.UNCOMMITTED, b"")
        self.delete(_format.DOC)  # it leaves every listing here
        self.remove()

    def unlist(self) -> ObjectStorage:
        """The step is removed here, in full: a save to the same prefix could otherwise race
        its removal."""
        if not self.exists(_format.DOC):
            raise FileNotFoundError(errno.ENOENT, "no committed checkpoint there", self.url)
        self._unmark_and_remove()
        return self

    def remove(self) -> None:
        """Every object under the prefix, the uncommitted marker last."""
        store = _store_of(self.url)
        prefix = self._prefix()

        async def remove() -> None:
            keys = await _keys_under(store.store, prefix)
            marker = prefix + _format.UNCOMMITTED
            limit = asyncio.Semaphore(_CONCURRENCY)

            async def one(k: str) -> None:
                async with limit:
                    await store.delete(k)

            await asyncio.gather(*(one(k) for k in keys if k != marker))
            await store.delete(marker)

        _run(remove, self.url, "deleting")

    def set_aside(self, name: str) -> ObjectStorage:
        """Copy every object to the sibling prefix `name` inside the bucket (server-side: no
        byte passes through this process), then delete the checkpoint here."""
        import obstore

        dest = ObjectStorage(self.url.rpartition("/")[0] + "/" + name)
        store = _store_of(self.url)
        prefix, target = self._prefix(), dest._prefix()

        async def copy() -> None:
            keys = await _keys_under(store.store, prefix)
            limit = asyncio.Semaphore(_CONCURRENCY)

            async def one(k: str) -> None:
                async with limit:
                    await obstore.copy_async(store.store, k, target + k[len(prefix) :])

            await asyncio.gather(*(one(k) for k in keys))

        _run(copy, self.url, "copying")
        self.unlist()
        return dest

    def leftovers(self) -> list[Storage]:
        """Step prefixes marked uncommitted without a root document."""
        names = [n for n in self.list_dir() if _format.parse_step(n) is not None]
        return [
            self.child(n)
            for n, state in zip(names, self.checkpoint_states(names))
            if state == "leftover"
        ]
