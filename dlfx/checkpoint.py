"""Orbax checkpoints of the train state and the grain iterator: async save, keep-N, restore newest valid."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from dlfx.errors import CheckpointError

log = logging.getLogger("dlfx")


def _first_line(error: BaseException) -> str:
    """One line for an error; long Orbax/TensorStore lines keep their end, which holds the OS reason."""
    text = str(error)
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) > 300:
        line = line[:300] + " ..."
    reasons = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)]
    reason = next((r for r in reasons if r in text), None)
    return f"{reason}: {type(error).__name__}: {line}" if reason else f"{type(error).__name__}: {line}"


class Checkpointer:
    """A `workdir/checkpoints` folder: one step folder per save holding `state` and `data` items.

    Unreadable steps found while resuming are moved to `workdir/corrupt_checkpoints/` (never deleted).
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        # local folders or gs:// (Orbax and etils.epath write there directly)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.quarantine = str(epath.Path(self.directory).parent / "corrupt_checkpoints")
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def steps(self) -> list[int]:
        """Saved steps, oldest first (a save still in flight included)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None) -> bool:
        """Start an async save of `state` (and the iterator position) at `step`; False if already saved.

        A failure of this save, or of an earlier async one (disk full, I/O error), raises CheckpointError.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:  # one global position, the same on every process: any process count restores it
            items["data_state"] = ocp.args.JsonSave(_iterator_state(data_iterator))
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(f"cannot save checkpoint step {step} in {self.directory}: {_first_line(e)}") from None

    def restore(self, step: int, abstract_state: Any,
                data_iterator: grain.DatasetIterator | None = None) -> Any:
        """Restore one step into the shapes/shardings of `abstract_state`; the iterator is set in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is None:
            return self.manager.restore(step, args=ocp.args.Composite(**items)).state
        if (epath.Path(self.directory) / str(step) / "data").is_dir():  # written per process by dlfx before elastic resume
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            return self.manager.restore(step, args=ocp.args.Composite(**items)).state
        items["data_state"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_iterator.set_state(restored.data_state)
        return restored.state

    def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None,
                       quarantine: bool = True) -> tuple[Any, int] | None:
        """Restore the newest step that reads back, warning about (and quarantining) each broken newer one.

        Returns None when the folder holds no checkpoint; raises CheckpointError when it holds
        checkpoints but none of them can be restored (then nothing is moved).
        """
        steps = self.steps()
        broken = []
        for step in reversed(steps):
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # Orbax raises several types for unreadable or mismatched data
                log.warning("checkpoint %s/%d is unreadable (%s); trying an older one", self.directory, step,
                            _first_line(e))
                broken.append(step)
                continue
            if broken and quarantine:
                self._quarantine(broken)
            return state, step
        if steps:
            raise CheckpointError(f"no valid checkpoint in {self.directory} (tried steps {steps}; "
                                  f"all unreadable, none removed)")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Move broken step folders aside so that training can save those steps again."""
        if jax.process_index() == 0:
            epath.Path(self.quarantine).mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = epath.Path(self.quarantine) / f"{step}-{int(time.time())}"
                (epath.Path(self.directory) / str(step)).rename(target)
                log.warning("moved unreadable checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dlfx_checkpoint_quarantine")
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the multi-host runtime has seen a preemption notice (SIGTERM)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until every in-flight async save is committed; raise CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"checkpoint save in {self.directory} failed: {_first_line(e)}") from None

    def close(self) -> None:
        """Wait for pending saves and release the manager; raise CheckpointError if a save failed."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _iterator_state(iterator: Any) -> dict:
    """A data iterator's position as a JSON-able dict (grain iterators give a dict, dlfx's prefetcher bytes)."""
    state = iterator.get_state()
    return json.loads(state) if isinstance(state, bytes) else state


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for `tree`, the restore target Orbax needs."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
