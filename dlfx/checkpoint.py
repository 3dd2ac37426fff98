"""Orbax checkpoints of the train state and the grain iterator: async save, keep-N, restore newest valid."""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dlfx.errors import CheckpointError

log = logging.getLogger("dlfx")


class Checkpointer:
    """A `workdir/checkpoints` folder: one step folder per save holding `state` and `data` items."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Saved steps, oldest first (a save still in flight included)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None) -> bool:
        """Start an async save of `state` (and the iterator position) at `step`; False if already saved."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, abstract_state: Any,
                data_iterator: grain.DatasetIterator | None = None) -> Any:
        """Restore one step into the shapes/shardings of `abstract_state`; the iterator is set in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_latest(self, abstract_state: Any,
                       data_iterator: grain.DatasetIterator | None = None) -> tuple[Any, int] | None:
        """Restore the newest step that reads back, warning about each broken newer one.

        Returns None when the folder holds no checkpoint; raises CheckpointError when it holds
        checkpoints but none of them can be restored. Nothing is deleted.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state, data_iterator), step
            except Exception as e:  # Orbax raises several types for unreadable or mismatched data
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying an older one",
                            self.directory, step, type(e).__name__, str(e).splitlines()[0][:200])
        if steps:
            raise CheckpointError(f"no valid checkpoint in {self.directory} (tried steps {steps})")
        return None

    def wait(self) -> None:
        """Block until every in-flight async save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for `tree`, the restore target Orbax needs."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def find_checkpoint_dir(path: str) -> str:
    """The checkpoints folder for a workdir, or `path` itself if it already is one."""
    candidate = os.path.join(path, "checkpoints")
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(path):
        return path
    raise CheckpointError(f"no checkpoint folder at {path}")
