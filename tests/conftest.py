"""Test set-up: 8 simulated CPU devices, before anything initialises JAX's backend."""

import os
import re

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def mesh():
    assert len(jax.devices()) == 8, "tests need 8 simulated CPU devices"
    return jax.make_mesh((4, 2), ("x", "y"))


def assert_same(a, b):
    """Same dtype, shape and bytes (NaN-safe: compares the raw bytes)."""
    a_np, b_np = np.asarray(a), np.asarray(b)
    assert a_np.dtype == b_np.dtype, (a_np.dtype, b_np.dtype)
    assert a_np.shape == b_np.shape, (a_np.shape, b_np.shape)
    assert a_np.tobytes() == b_np.tobytes()


def abstract(tree):
    """`tree` as a restore target: each `jax.Array` a `jax.ShapeDtypeStruct` with its shape,
    dtype and sharding; other leaves as they are."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )


# ------------------------------------------------------------------------- storage backends
# Tests that take `root` run once per backend: on local disk, and in an S3 bucket served by moto
# on 127.0.0.1 (a real S3-protocol server, in this process, on a free port).

S3_BUCKET = "asyncckpt-tests"


class UrlPath(str):
    """An object-store URL that joins like a pathlib.Path: `root / "ck"`."""

    def __truediv__(self, name):
        return UrlPath(f"{self.rstrip('/')}/{name}")

    def __fspath__(self):
        return str(self)


class S3Server:
    """moto's S3 server on 127.0.0.1 in this process. `stop()` and `start()` take it off the
    network and back on the same port; its buckets and objects live on in between."""

    def __init__(self) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.port = 0
        self._server = None
        self.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, a bucket `S3_BUCKET`, and the environment pointing
    asyncckpt (obstore) and boto3 at it."""
    pytest.importorskip("moto.server")
    import boto3

    server = S3Server()
    env = {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=S3_BUCKET)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh directory for checkpoints: a local path, or a prefix in an S3 bucket."""
    return make_root(request, request.param, tmp_path)


def make_root(request, backend, tmp_path):
    if backend == "local":
        return tmp_path
    request.getfixturevalue("s3_server")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    return UrlPath(f"s3://{S3_BUCKET}/{name}-{os.urandom(4).hex()}")


def _file(path):
    """(storage of the parent, name) of a file or object path."""
    import posixpath

    from asyncckpt._storage import open_storage

    url = open_storage(os.fspath(path)).url
    return open_storage(posixpath.dirname(url)), posixpath.basename(url)


def names(path):
    """The names directly under a local directory or an object-store prefix."""
    from asyncckpt._storage import open_storage

    return open_storage(os.fspath(path)).list_dir()


def remove_file(path):
    """Delete one file or object."""
    parent, name = _file(path)
    parent.delete(name)


def read_file(path) -> bytes:
    parent, name = _file(path)
    return parent.get(name).tobytes()


def write_file(path, data: bytes) -> None:
    parent, name = _file(path)
    parent.write(name, data)


def is_url(path) -> bool:
    return "://" in os.fspath(path)
