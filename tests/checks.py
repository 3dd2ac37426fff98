"""Assertions and read-backs shared by the fault tests."""

import jax
import numpy as np

from dlfx import experiment
from dlfx.checkpoint import Checkpointer, abstract_like


def restore_newest(config, directory):
    """(state, step) of the newest valid checkpoint in `directory`, read without quarantining anything."""
    checkpointer = Checkpointer(str(directory))
    try:
        return checkpointer.restore_latest(experiment.build(config).abstract_state, quarantine=False)
    finally:
        checkpointer.close()


def assert_bit_identical(a, b):
    """Every leaf of two pytrees equal, bit for bit."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
