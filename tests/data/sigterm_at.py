"""`python sigterm_at.py PHASE train ...`: the dlfx CLI, sent SIGTERM by itself inside one phase of the run.

PHASE: `startup` (while the experiment is built), `mid_run` (after step $DLFX_TEST_SIGTERM_STEP), `final_save` (as the last step's checkpoint is saved),
`final_eval` (during the evaluation after the last step) or `plots` (while the final plots are written).
Used by tests/test_hardening.py and tests/test_tasks.py: the signal lands exactly where a real preemption notice might.
"""

import os
import signal
import sys

from dlfx import checkpoint, plot, runner, train_metrics
from dlfx.cli import main

PHASE = sys.argv[1]


def _term() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _wrap(owner, name, when=lambda *a, **k: True):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            _term()
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


if PHASE == "startup":
    _wrap(runner, "build")
elif PHASE == "mid_run":
    _wrap(train_metrics, "due", lambda step, *a, **k: step == int(os.environ["DLFX_TEST_SIGTERM_STEP"]))
elif PHASE == "final_save":
    _wrap(checkpoint.Checkpointer, "save", lambda self, step, *a, **k: step == int(os.environ["DLFX_TEST_STEPS"]))
elif PHASE == "final_eval":
    _wrap(runner, "evaluate")
elif PHASE == "plots":
    _wrap(plot, "write_run_plots")
else:
    raise SystemExit(f"unknown phase {PHASE}")
sys.exit(main(sys.argv[2:]))
