"""Keep a failed async checkpoint save to dlfx's one error line in the command line's output.

When a save fails in the background (a full disk), each of Orbax's threads logs the same traceback,
TensorStore calls back into event loops Orbax has closed, and asyncio reports the failed tasks when
they are collected. dlfx raises the failure again where it waits for the save, as one line naming the
step (`dlfx.checkpoint`), so the command line drops these echoes. Library users keep their own logging.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

_ORBAX = f"{os.sep}orbax{os.sep}"


def _from_orbax(error: BaseException | None) -> bool:
    """Whether `error` passed through Orbax's code or names a folder of an Orbax save in progress."""
    if error is None:
        return False
    if ".orbax-checkpoint-tmp" in str(error):  # TensorStore's errors carry no Python frames
        return True
    return any(_ORBAX in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def _log_filter(record: logging.LogRecord) -> bool:
    """Drop Orbax's error records and asyncio's reports of its failed tasks; strip tracebacks off Orbax's warnings."""
    error = record.exc_info[1] if record.exc_info else None
    if _ORBAX in record.pathname:
        if record.levelno >= logging.ERROR:  # each also raises, and dlfx prints that as its one error line
            return False
        record.exc_info = record.exc_text = record.stack_info = None
        return True
    return not (record.name == "asyncio" and record.levelno >= logging.ERROR and _from_orbax(error))


def _unraisable(hook):
    """sys.unraisablehook that drops TensorStore's callbacks into the closed event loop of a failed save."""

    def quiet_hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        hook(unraisable)

    quiet_hook.dlfx_quiet = True
    return quiet_hook


def quiet() -> None:
    """Install the filters on the root logger's handlers and the unraisable-exception hook (command line only;
    once, however often the command line runs in one process)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_log_filter)  # a filter already there is not added twice
    if not getattr(sys.unraisablehook, "dlfx_quiet", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
