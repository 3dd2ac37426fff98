"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import shutil
import tempfile
import time
import warnings

# An in-process collective aborts the process when one fake device is 40 s late. The 8-device hangs once
# blamed on slow cores were a dispatch deadlock (fixed by parallel.DispatchLimit); the raised limits only
# leave room for a genuinely slow device on 2 cores shared by two test workers and a subprocess run.
# LLVM optimisation level 0: the suite is dominated by compiling tiny programs, which it makes 2-9x faster
# (a ResNet init 15 s -> 1.6 s) while the tiny steps run ~1.8x slower; every equality test compares runs
# made under the same flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=600 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One XLA compilation cache for a test session, its workers and the CLI runs they start: most tests
# compile the same tiny configs (a cached run starts ~10 s sooner). Its own folder, never the user's cache;
# the key covers program, flags and device count, so changed code is never served stale. JAX writes entries
# in place: a process reading one still being written warns and compiles (harmless), so that warning is off.
CACHE_ROOT = os.path.join(tempfile.gettempdir(), f"dlfx-tests-xla-cache-{os.getuid()}")
if "PYTEST_XDIST_WORKER" not in os.environ and os.path.isdir(CACHE_ROOT):  # earlier sessions' caches
    for old in os.listdir(CACHE_ROOT):
        if time.time() - os.path.getmtime(os.path.join(CACHE_ROOT, old)) > 3600:
            shutil.rmtree(os.path.join(CACHE_ROOT, old), ignore_errors=True)
os.environ.setdefault("DLFX_COMPILATION_CACHE", os.path.join(
    CACHE_ROOT, os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")))
CACHE_WARNINGS = ("ignore:Error reading persistent compilation cache", "ignore:Error writing persistent compilation cache")
os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *CACHE_WARNINGS]))
for _rule in CACHE_WARNINGS:
    warnings.filterwarnings("ignore", message=_rule.split(":", 1)[1])

import jax  # noqa: E402
import pytest  # noqa: E402

from dlfx import parallel  # noqa: E402

parallel.enable_compilation_cache()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    """The repository root (configs/ lives here)."""
    return REPO


def pytest_configure(config):
    assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.devices()}"
