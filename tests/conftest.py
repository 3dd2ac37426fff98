"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DLFX_COMPILATION_CACHE", "off")  # tests never write to the user cache

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    """The repository root (configs/ lives here)."""
    return REPO


def pytest_configure(config):
    assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.devices()}"
