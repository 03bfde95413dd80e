"""Where checkpoints live: one interface (`Storage`, base.py), one file per backend.

`open_storage` is the only place that tells a local path from an object-store URL: every other
module holds a `Storage` and calls its methods. A backend is one module with a `Storage`
subclass, named in `_BACKENDS` by its URL schemes.

- local.py: local and network file systems (paths, `file://` URLs);
- objects.py: object stores through zarr's `ObjectStore` over obstore (`s3://`, `gs://`, `az://`,
  `memory://`).

overlay.py's `Overlay` is no backend: a read-only view over one, with some chunks held in
memory (what a restore received from other processes).
"""

from __future__ import annotations

import os
from typing import Any

from .base import State, Storage, WriterLock
from .local import LocalStorage
from .local import configure as configure_local
from .objects import ALIASES, SCHEMES, ObjectStorage, configure

__all__ = ["State", "Storage", "WriterLock", "configure_storage", "open_storage"]

_BACKENDS: dict[str, type[Storage]] = {scheme: ObjectStorage for scheme in (*SCHEMES, *ALIASES)}


def open_storage(path: Any) -> Storage:
    """The storage at `path`: a local path (made absolute), a `file://` URL, or an object-store
    URL (`s3://bucket/prefix`, normalized)."""
    if isinstance(path, Storage):
        return path
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, not {path!r}")
    scheme, sep, rest = path.partition("://")
    if not sep:
        return LocalStorage(path)
    if scheme.lower() == "file":
        return LocalStorage("/" + rest.lstrip("/") if rest.startswith("/") else rest)
    backend = _BACKENDS.get(scheme.lower())
    if backend is None:
        raise ValueError(
            f"unknown URL scheme {scheme!r} in {path!r}: asyncckpt reads and writes local paths, "
            "file://, s3://, gs://, az:// and memory:// URLs"
        )
    return backend(path)  # type: ignore[call-arg]


def configure_storage(url: str, **options: Any) -> None:
    """Set how asyncckpt reads and writes the storage at `url`, for every later save and
    restore in this process.

    Object stores (`s3://bucket`, `gs://bucket`, ...): `options` go to obstore's `from_url` as
    they are: `config` (e.g. `{"endpoint": ..., "region": ..., "access_key_id": ...}`),
    `client_options` (timeouts, proxies), `retry_config` (`{"max_retries": 3, "retry_timeout":
    datetime.timedelta(seconds=30)}`), `credential_provider`. Without a call, the usual
    environment variables apply (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`,
    `GOOGLE_APPLICATION_CREDENTIALS`, ...).

    Without `retry_config` a request that fails for a server error, a refused or dropped
    connection or a timeout is tried again for up to 30 s after it was first sent (up to 30
    tries, backing off from 0.1 s to 2 s): an outage of up to about 25 s is ridden out, and a
    store unreachable for longer fails the save or restore after about 30 s. A `retry_config`
    replaces these defaults as a whole (obstore's own: 10 tries, given up after about 1.5 s).
    A connection that drops under a request (reset, closed), which obstore's object_store gives
    up on at once in some versions, is tried again by asyncckpt within the same limits.

        ac.configure_storage("s3://my-bucket", config={"endpoint": "http://127.0.0.1:9000"})

    Local directories: `direct_io` (default True) writes files of 1 MiB or more (chunk files) around
    the page cache (`O_DIRECT`), which costs a fraction of the CPU and makes a step durable
    sooner, but leaves none of it cached: `direct_io=False` keeps a just-saved step in the page
    cache for a restore on the same host. Applies to checkpoints under that directory.

        ac.configure_storage("/mnt/ckpt", direct_io=False)
    """
    storage = open_storage(url)
    if isinstance(storage, LocalStorage):
        unknown = set(options) - {"direct_io"}
        if unknown or "direct_io" not in options:
            raise ValueError(
                f"configure_storage({url!r}): a local directory takes one option, direct_io=True "
                f"or False, not {sorted(options) or 'none'}"
            )
        configure_local(storage.url, options["direct_io"])
        return
    if not isinstance(storage, ObjectStorage):
        raise ValueError(
            f"configure_storage takes an object-store URL (s3://, gs://, az://) or a local "
            f"directory, not {url!r}"
        )
    configure(url, options)
