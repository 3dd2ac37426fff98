"""The command line's filters for the echoes of a failed async Orbax save (dlfx.orbax_noise)."""

import logging
import os
import sys

from dlfx import orbax_noise


def record(name, level, pathname, error=None, thread="MainThread"):
    exc_info = (type(error), error, error.__traceback__) if error else None
    rec = logging.LogRecord(name, level, pathname, 1, "message", None, exc_info)
    rec.threadName = thread
    return rec


def test_orbax_errors_and_their_asyncio_echoes_are_dropped_other_records_kept():
    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
    full = ValueError('RESOURCE_EXHAUSTED: writing "/ck/100.orbax-checkpoint-tmp/state": No space left on device')
    assert not orbax_noise._log_filter(record("absl", logging.ERROR, orbax_file, full, thread="save_finalize"))
    assert not orbax_noise._log_filter(record("absl", logging.ERROR, orbax_file))
    assert not orbax_noise._log_filter(record("asyncio", logging.ERROR, "base_events.py", full))
    warning = record("absl", logging.WARNING, orbax_file, full)
    assert orbax_noise._log_filter(warning) and warning.exc_info is None  # kept, one line
    other = record("asyncio", logging.ERROR, "base_events.py", ValueError("a user's own task failed"))
    assert orbax_noise._log_filter(other) and other.exc_info is not None
    assert orbax_noise._log_filter(record("dlfx", logging.ERROR, "dlfx/runner.py", full))


def test_closed_event_loop_callbacks_are_dropped_other_unraisables_reach_the_hook():
    seen = []
    hook = orbax_noise._unraisable(seen.append)
    closed = type("U", (), {"exc_value": RuntimeError("Event loop is closed")})()
    other = type("U", (), {"exc_value": RuntimeError("something else")})()
    hook(closed)
    hook(other)
    assert seen == [other]
    assert sys.unraisablehook is not hook  # installed only by `quiet()`, which the command line calls
