"""`python fail_save.py train ...`: the dlfx CLI, whose checkpoint folder turns into a file just before the save
of step DLFX_TEST_FAIL_AT_STEP, so that save fails inside Orbax; used by tests/test_faults.py."""

import os
import shutil
import sys

from dlfx import checkpoint
from dlfx.cli import main

FAIL_AT_STEP = int(os.environ["DLFX_TEST_FAIL_AT_STEP"])
_save = checkpoint.Checkpointer.save


def _save_into_a_file(self, step, *args, **kwargs):
    if step == FAIL_AT_STEP:
        self.wait()
        shutil.move(self.directory, self.directory + ".moved")
        with open(self.directory, "w") as f:
            f.write("not a folder\n")
    return _save(self, step, *args, **kwargs)


checkpoint.Checkpointer.save = _save_into_a_file
sys.exit(main(sys.argv[1:]))
