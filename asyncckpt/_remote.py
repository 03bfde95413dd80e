"""Checkpoints in object stores (`s3://`, `gs://`, `az://`, `memory://`) through zarr's stores.

Blocking functions over URLs, the object-store twins of `_store`'s functions over paths, called
from the same worker threads: each runs one request on zarr's own I/O event loop (`zarr`'s
`sync`), so the number of requests in flight is the number of worker threads. The stores are
zarr's `ObjectStore` over obstore (Rust; chosen over fsspec/s3fs for speed, see
benchmarks/README.md), one per bucket, configured the usual way: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (`AWS_ALLOW_HTTP=true` for a plain-http
endpoint), `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`, ...

There is no rename in an object store, so a checkpoint is written in place and committed by its
root `zarr.json`, written last (docs/FORMAT.md). While a save or a deletion is in progress the
prefix holds `UNCOMMITTED`, which marks its objects as asyncckpt's to remove.
"""

from __future__ import annotations

import asyncio
import errno
import re
import threading
from typing import Any

import numpy as np

SCHEMES = ("s3", "gs", "az", "memory")
UNCOMMITTED = ".asyncckpt-uncommitted"
_CONCURRENCY = 64  # requests in flight when one call makes many (deleting a prefix)
_ALIASES = {"gcs": "gs", "abfs": "az", "azure": "az", "s3a": "s3"}

_stores: dict[tuple[str, str], Any] = {}
_options: dict[tuple[str, str], dict[str, Any]] = {}
_stores_lock = threading.Lock()


def configure_storage(url: str, **options: Any) -> None:
    """Set how asyncckpt connects to the bucket of `url` (`s3://bucket`, `gs://bucket`, ...).

    `options` go to obstore's `from_url` as they are: `config` (e.g. `{"endpoint": ...,
    "region": ..., "access_key_id": ...}`), `client_options` (timeouts, proxies),
    `retry_config` (`{"max_retries": 3, "retry_timeout": datetime.timedelta(seconds=30)}`),
    `credential_provider`. Without a call, the usual environment variables apply (see the module
    docstring). Applies to every later read and write of that bucket in this process.

        ac.configure_storage("s3://my-bucket", config={"endpoint": "http://127.0.0.1:9000"})
    """
    scheme, bucket = _bucket(normalize(url))
    with _stores_lock:
        _options[(scheme, bucket)] = dict(options)
        _stores.pop((scheme, bucket), None)


def _bucket(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    return scheme, rest.partition("/")[0]


def is_url(path: str) -> bool:
    """True for an object-store URL (`file://` URLs are local paths, see `local_path`)."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() != "file"


def local_path(path: str) -> str | None:
    """The path of a `file://` URL, or None."""
    scheme, sep, rest = path.partition("://")
    if sep and scheme.lower() == "file":
        return "/" + rest.lstrip("/") if rest.startswith("/") else rest
    return None


def normalize(url: str) -> str:
    """`scheme://bucket/prefix` with a known scheme, no trailing or doubled slashes."""
    scheme, _, rest = url.partition("://")
    scheme = _ALIASES.get(scheme.lower(), scheme.lower())
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown URL scheme {scheme!r} in {url!r}: asyncckpt reads and writes local paths, "
            "file://, s3://, gs://, az:// and memory:// URLs")
    parts = [p for p in rest.split("/") if p]
    if not parts:
        raise ValueError(f"{url!r} names no bucket: write {scheme}://BUCKET/PREFIX")
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{url!r}: '.' and '..' are not allowed in object-store URLs")
    return f"{scheme}://" + "/".join(parts)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def _resolve(url: str) -> tuple[Any, str]:
    """(zarr store of the bucket, key) of `url`."""
    url = normalize(url)
    scheme, bucket = _bucket(url)
    key = url.partition("://")[2].partition("/")[2]
    with _stores_lock:
        store = _stores.get((scheme, bucket))
        if store is None:
            options = _options.get((scheme, bucket), {})
            store = _stores[(scheme, bucket)] = _open_store(scheme, bucket, options)
    return store, key


def _open_store(scheme: str, bucket: str, options: dict[str, Any]) -> Any:
    try:
        import obstore.store
    except ImportError:
        raise ImportError(
            f"{scheme}:// checkpoints need obstore: pip install 'asyncckpt[cloud]' "
            "(or pip install obstore)") from None
    from zarr.storage import ObjectStore

    if scheme == "memory":  # one in-memory bucket per name and process, for tests and examples
        return ObjectStore(obstore.store.MemoryStore())
    return ObjectStore(obstore.store.from_url(f"{scheme}://{bucket}", **options))


def _run(coro: Any, url: str, what: str) -> Any:
    """Run one request on zarr's event loop; errors become OSErrors that say what to check."""
    from zarr.core.sync import sync

    try:
        return sync(coro)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise OSError(e.errno or errno.EIO, f"{what} {url} failed: {e}") from e
    except Exception as e:  # obstore's errors: credentials, endpoint, bucket, network
        raise OSError(errno.EIO, f"{what} {url} failed: {_hint(e)}") from e


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
        return ("no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY), or pass "
                "them with asyncckpt.configure_storage (the instance metadata service did not "
                f"answer: {text.splitlines()[0][:200]})")
    if any(s in low for s in ("credential", "unauthenticated", "accessdenied", "signature",
                               "permission", "forbidden")):
        return (f"{text.splitlines()[0]} (check the credentials: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, or your cloud's profile)")
    if any(s in low for s in ("connect", "dns", "timed out", "timeout", "error sending request",
                               "broken pipe", "reset by peer", "incomplete")):
        return (f"{text.splitlines()[0]} (cannot reach the object store: check AWS_ENDPOINT_URL "
                "and the network)")
    return text.splitlines()[0] if text else type(e).__name__


def _buffer(data: Any) -> Any:
    from zarr.core.buffer import cpu

    return cpu.Buffer.from_array_like(np.frombuffer(data, np.uint8))


def put(url: str, *buffers: Any) -> None:
    """Create or replace the object `url` with the concatenation of `buffers`."""
    store, key = _resolve(url)
    views = [memoryview(b).cast("B") for b in buffers]
    data = views[0] if len(views) == 1 else np.concatenate(
        [np.frombuffer(v, np.uint8) for v in views])
    _run(store.set(key, _buffer(data)), url, "writing")


def get(url: str, start: int | None = None, end: int | None = None,
        suffix: int | None = None) -> np.ndarray:
    """The bytes of `url` (uint8), or of `[start, end)`, or its last `suffix` bytes. A missing
    object raises FileNotFoundError."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    store, key = _resolve(url)
    request = (SuffixByteRequest(suffix) if suffix is not None
               else RangeByteRequest(start, end) if start is not None else None)
    buf = _run(store.get(key, default_buffer_prototype(), request), url, "reading")
    if buf is None:
        raise FileNotFoundError(errno.ENOENT, "no such object", url)
    return buf.as_numpy_array()


def size(url: str) -> int:
    """The size of the object `url` in bytes. A missing object raises FileNotFoundError."""
    store, key = _resolve(url)
    return int(_run(store.getsize(key), url, "looking at"))


def exists(url: str) -> bool:
    store, key = _resolve(url)
    return bool(_run(store.exists(key), url, "looking for"))


def list_dir(url: str) -> list[str]:
    """The names directly under the prefix `url` (objects and sub-prefixes)."""
    return list_dirs([url])[0]


def list_dirs(urls: list[str]) -> list[list[str]]:
    """`list_dir` of each of `urls` (prefixes of one bucket), the requests in flight together."""
    if not urls:
        return []
    resolved = [_resolve(url) for url in urls]
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def collect(store: Any, key: str) -> list[str]:
        async with limit:
            names = [n async for n in store.list_dir(key.rstrip("/") + "/" if key else "")]
        return sorted({n.rstrip("/") for n in names})

    async def collect_all() -> list[list[str]]:
        return list(await asyncio.gather(*(collect(store, key) for store, key in resolved)))

    return _run(collect_all(), urls[0] if len(urls) == 1 else f"{urls[0]} ...", "listing")


def delete(url: str) -> None:
    store, key = _resolve(url)
    _run(store.delete(key), url, "deleting")


def copy_prefix(src: str, dst: str) -> None:
    """Copy every object under the prefix `src` to the same key under `dst`, inside the bucket
    (server-side: no byte passes through this process)."""
    import obstore

    store, key = _resolve(src)
    dst_store, dst_key = _resolve(dst)
    if dst_store is not store:
        raise ValueError(f"cannot copy {src} to {dst}: not in the same bucket")
    prefix, target = key.rstrip("/") + "/", dst_key.rstrip("/") + "/"

    async def copy() -> None:
        keys = [k async for k in store.list_prefix(prefix)]
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def one(k: str) -> None:
            async with limit:
                await obstore.copy_async(store.store, k, target + k[len(prefix):])

        await asyncio.gather(*(one(k) for k in keys))

    _run(copy(), src, "copying")


def delete_prefix(url: str) -> None:
    """Delete every object under the prefix `url`, the `UNCOMMITTED` marker last."""
    store, key = _resolve(url)
    prefix = key.rstrip("/") + "/"

    async def remove() -> None:
        keys = [k async for k in store.list_prefix(prefix)]
        marker = prefix + UNCOMMITTED
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def one(k: str) -> None:
            async with limit:
                await store.delete(k)

        await asyncio.gather(*(one(k) for k in keys if k != marker))
        await store.delete(marker)

    _run(remove(), url, "deleting")
