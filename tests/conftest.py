"""Test set-up: 8 simulated CPU devices, before anything initialises JAX's backend."""

import os

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
