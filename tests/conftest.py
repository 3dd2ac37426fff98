"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

# An in-process collective aborts the process when one fake device is 40 s late. The 8-device hangs once
# blamed on slow cores were a dispatch deadlock (fixed by parallel.DispatchLimit); the raised limits only
# leave room for a genuinely slow device on 2 cores shared by two test workers and a subprocess run.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=600 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
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
