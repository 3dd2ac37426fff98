"""`python kill_during_save.py train ...`: the dlfx CLI, SIGKILLed right after the async save of a step starts.

The step comes from DLFX_TEST_KILL_AT_STEP; used by tests/test_faults.py to crash mid-checkpoint.
"""

import os
import signal
import sys

from dlfx import checkpoint
from dlfx.cli import main

KILL_AT_STEP = int(os.environ["DLFX_TEST_KILL_AT_STEP"])
_save = checkpoint.Checkpointer.save


def _save_then_die(self, step, *args, **kwargs):
    started = _save(self, step, *args, **kwargs)
    if step == KILL_AT_STEP:  # the write is still running in Orbax's background thread
        os.kill(os.getpid(), signal.SIGKILL)
    return started


checkpoint.Checkpointer.save = _save_then_die
sys.exit(main(sys.argv[1:]))
