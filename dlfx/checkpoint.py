"""Orbax checkpoints of the train state and the grain iterator: async save, keep-N, restore newest valid."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from dlfx.errors import CheckpointError, one_line

log = logging.getLogger("dlfx")
BEST_FOLDER = "best"  # inside the checkpoint folder: the state of the best eval (train.keep_best)
LOGS_ITEM = "unwritten_logs"  # a step's item: metric records a full disk kept out of the run files


def _first_line(error: BaseException) -> str:
    """One line for an error; long Orbax/TensorStore lines keep their end, which holds the OS reason."""
    reasons = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)]
    reason = next((r for r in reasons if r in str(error)), None)
    return f"{reason}: {one_line(error)}" if reason else one_line(error)


class SaveCadence:
    """`train.checkpoint_every` saves thinned to at most one per `min_interval_s` seconds (0: every one): a
    step rate of thousands a second on an accelerator would otherwise spend its time saving. In a
    multi-process run process 0's clock decides for all (a save takes every process)."""

    def __init__(self, min_interval_s: float):
        self.min_interval_s, self.last = float(min_interval_s), time.monotonic()

    def allows(self) -> bool:
        """Whether a scheduled save goes ahead now (False: skipped, the next scheduled one is asked again)."""
        if not self.min_interval_s:
            return True
        ok = time.monotonic() - self.last >= self.min_interval_s
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        return ok

    def saved(self) -> None:
        """A save began now."""
        self.last = time.monotonic()


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
        self._in_flight: int | None = None  # the step of the async save not yet known to be committed

    def steps(self) -> list[int]:
        """Saved steps, oldest first (a save still in flight included)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None,
             logs: list[dict] | None = None) -> bool:
        """Start an async save of `state` (and the iterator position) at `step`; False if already saved.
        `logs`: metric records the run files could not take, kept with the step (see `unwritten_logs`).

        A failure of this save, or of an earlier async one (disk full, I/O error), raises CheckpointError.
        """
        self.wait()  # Orbax waits here anyway; an earlier save's failure is reported with its own step
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:  # one global position, the same on every process: any process count restores it
            items["data_state"] = ocp.args.JsonSave(_iterator_state(data_iterator))
        if logs is not None:  # every process names the item alike; process 0 alone writes JSON
            items[LOGS_ITEM] = ocp.args.JsonSave({"records": logs})
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(f"cannot save checkpoint step {step} in {self.directory}: {_first_line(e)}") from None
        self._in_flight = step if saved else None
        return saved

    def unwritten_logs(self, step: int) -> list[dict]:
        """The metric records saved with `step` because the run files could not take them (usually none)."""
        if not (epath.Path(self.directory) / str(step) / LOGS_ITEM).is_dir():
            return []
        try:
            kept = self.manager.restore(step, args=ocp.args.Composite(**{LOGS_ITEM: ocp.args.JsonRestore()}))
            records = kept[LOGS_ITEM]["records"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step}: its unwritten metric records do not read "
                                  f"back: {_first_line(e)}") from None
        if not (isinstance(records, list) and all(isinstance(r, dict) for r in records)):
            raise CheckpointError(f"checkpoint {self.directory}/{step}: its unwritten metric records are damaged")
        return records

    def restore(self, step: int, abstract_state: Any,
                data_iterator: grain.DatasetIterator | None = None) -> Any:
        """Restore one step into the shapes/shardings of `abstract_state`; the iterator is set in place.

        A step that does not fit the state's shapes, or does not read back, raises one CheckpointError line.
        """
        mismatch = _shape_mismatch(f"{self.directory}/{step}", abstract_state)
        if mismatch:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not fit this config's model: {mismatch}")
        try:
            return self._restore(step, abstract_state, data_iterator)
        except Exception as e:  # Orbax raises several types for unreadable data
            raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable: {_first_line(e)}") from None

    def _restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
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
        if steps:  # shapes that differ are a config mismatch, not damage: say so rather than walk back
            mismatch = _shape_mismatch(f"{self.directory}/{steps[-1]}", abstract_state)
            if mismatch:
                raise CheckpointError(f"checkpoint {self.directory}/{steps[-1]} does not fit this config's model: "
                                      f"{mismatch}")
        broken = []
        for step in reversed(steps):
            try:
                state = self._restore(step, abstract_state, data_iterator)
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
        step, self._in_flight = self._in_flight, None
        _wait_for(self.manager, step, self.directory)

    def close(self) -> None:
        """Wait for pending saves and release the manager; raise CheckpointError if a save failed."""
        step, self._in_flight = self._in_flight, None
        _close(self.manager, step, self.directory)


class BestCheckpoint:
    """`CHECKPOINT_DIR/best`: the train state at the eval with the best `metric` so far (one step, with its
    metric value), for `dlfx eval --best` and `load_run(step="best")`; not used to resume."""

    def __init__(self, directory: str, metric: str, mode: str):
        self.directory = str(epath.Path(directory) / BEST_FOLDER) if "://" in directory else \
            os.path.join(os.path.abspath(directory), BEST_FOLDER)
        self.metric, self.mode = metric, mode
        options = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: float(m[metric]), best_mode=mode,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        try:  # what an earlier (interrupted) attempt of this run kept
            step = self.manager.best_step()
            metrics = self.manager.metrics(step) if step is not None else None
        except Exception as e:
            raise CheckpointError(f"the best checkpoint in {self.directory} is damaged ({_first_line(e)}); move "
                                  "the folder aside to start a new best") from None
        self._kept = (step, float(metrics[metric])) if metrics and metric in metrics else None
        self._in_flight: int | None = None

    def best(self) -> tuple[int, float] | None:
        """(step, metric value) of the kept state, or None before the first eval."""
        return self._kept

    def offer(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
        """Save `state` (async) if `metrics[metric]` beats the kept one; True if it was saved."""
        value, kept = float(metrics[self.metric]), self.best()
        if not math.isfinite(value) or step in self.manager.all_steps():  # a resumed run re-evaluating a step
            return False
        if kept is not None and not (value > kept[1] if self.mode == "max" else value < kept[1]):
            return False
        in_flight, self._in_flight = self._in_flight, None
        _wait_for(self.manager, in_flight, self.directory)  # an earlier save's failure names its own step
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                                      metrics={self.metric: value})
        except Exception as e:
            raise CheckpointError(f"cannot save the best checkpoint (step {step}) in {self.directory}: "
                                  f"{_first_line(e)}") from None
        if saved:
            self._kept, self._in_flight = (step, value), step
        return saved

    def close(self) -> None:
        """Wait for the save in flight and release the manager; raise CheckpointError if it failed."""
        step, self._in_flight = self._in_flight, None
        _close(self.manager, step, self.directory)


def _wait_for(manager: ocp.CheckpointManager, step: int | None, directory: str) -> None:
    """Wait for `manager`'s async save (of `step`, where known); CheckpointError naming the step if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _save_failed(step, directory, e) from None


def _save_failed(step: int | None, directory: str, error: Exception) -> CheckpointError:
    """The one line for an async save (of `step`, where known) that failed."""
    what = f"step {step}" if step is not None else "save"
    return CheckpointError(f"checkpoint {what} in {directory} failed to save: {_first_line(error)}")


def _close(manager: ocp.CheckpointManager, step: int | None, directory: str) -> None:
    """Wait for `manager`'s save in flight and close it; the first failure as one CheckpointError (Orbax's
    `close` waits again and raises the same failure raw)."""
    error = None
    try:
        _wait_for(manager, step, directory)
    except CheckpointError as e:
        error = e
    try:
        manager.close()
    except Exception as e:
        error = error or _save_failed(step, directory, e)
    if error is not None:
        raise error


def _shape_mismatch(step_dir: str, abstract_state: Any) -> str | None:
    """Which arrays of a saved step have other shapes than `abstract_state` wants; None if all fit."""
    from dlfx import inspection

    try:
        saved = inspection.checkpoint_shapes(step_dir)
    except CheckpointError:
        return None  # unreadable: restoring says so and walks back
    wanted = inspection.flatten(abstract_state)
    differ = [(p, saved[p][0], shape) for p, (shape, _) in wanted.items() if p in saved and saved[p][0] != shape]
    if not differ:
        return None
    path, old, new = differ[0]
    more = f" (and {len(differ) - 1} more arrays)" if len(differ) > 1 else ""
    return f"{path} is {old} in the checkpoint but {new} in the config{more}"


OWNER_FILE = "dlfx_run.json"  # in the checkpoint folder: the config and workdir of the run that saves there


def _owner(directory: str) -> dict | None:
    """The run that owns a checkpoint folder: its `dlfx_run.json`, or for a folder from before owner files
    the `config.json` of the workdir it sits in (`WORKDIR/checkpoints`); None if unknown."""
    folder = epath.Path(directory)
    for path, key in ((folder / OWNER_FILE, None), (folder.parent / "config.json", "config")):
        if not path.exists() or (key and folder.name != "checkpoints"):
            continue
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is damaged; it says which run owns {directory}") from None
        if key is None and not (isinstance(value, dict) and isinstance(value.get("config"), dict)
                                and isinstance(value.get("workdir"), str)):
            raise CheckpointError(f"{path} is damaged (it must hold the owner's 'config' object and 'workdir' "
                                  f"path); it says which run owns {directory}")
        if not isinstance(value, dict):
            raise CheckpointError(f"{path} must hold a JSON object; it says which run owns {directory}")
        return value if key is None else {"config": value, "workdir": str(folder.parent)}
    return None


def _has_steps(directory: str) -> bool:
    folder = epath.Path(directory)
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_owner(directory: str, config: Any, workdir: str, force: bool = False) -> None:
    """Refuse a checkpoint folder holding checkpoints of another run (another config, or another workdir
    for a folder outside the workdir), unless forced: resuming from them would train on that run's state
    and Orbax's keep-N would delete its checkpoints."""
    from dlfx import config as config_lib

    if force or not _has_steps(directory):
        return
    owner = _owner(directory)
    if owner is None:
        log.warning("%s holds checkpoints from before dlfx recorded their run; assuming they are this run's",
                    directory)
        return
    # where the checkpoints live is not part of what the run is
    changes = [c for c in config_lib.config_changes(owner.get("config") or {}, config)
               if not c.startswith("train.checkpoint_dir:")]
    other, ours = owner.get("workdir"), _resolve(workdir)
    # a folder inside the workdir travels with it (a copied or moved workdir is the same run); for one outside,
    # a workdir that was moved or deleted (a TPU VM's) leaves no claim, one that still holds a run does
    inside = _resolve(directory).startswith(ours.rstrip("/") + "/")
    other_run = (not inside and bool(other) and other != ours
                 and (epath.Path(other) / "config.json").exists())
    if changes or other_run:
        why = (f"its config differs: {config_lib.describe_changes(changes)}" if changes
               else f"it was made by workdir {other}")
        raise CheckpointError(f"checkpoint folder {directory} holds checkpoints of another run ({why}); "
                              "give each run its own train.checkpoint_dir, or use --force to continue from them")


def claim(directory: str, config: Any, workdir: str) -> None:
    """Record this run (config and workdir) as the owner of a checkpoint folder (process 0 only)."""
    from dlfx import config as config_lib

    folder = epath.Path(directory)
    tmp = folder / (OWNER_FILE + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"workdir": _resolve(workdir), "config": config_lib.to_dict(config)}, indent=2,
                                  sort_keys=True))
        tmp.replace(folder / OWNER_FILE)
    except Exception as e:  # a full disk: no empty .tmp left, and the folder named (not the workdir)
        try:
            tmp.unlink(missing_ok=True)
        except Exception:
            pass
        raise CheckpointError(f"cannot write {folder / OWNER_FILE}: {_first_line(e)}") from None


def check_writable(directory: str) -> None:
    """Refuse a checkpoint folder that cannot be written (a file, a read-only folder) before training starts:
    a save that fails inside Orbax leaves its background threads waiting for good."""
    if "://" in directory:  # object stores: a permission error surfaces at the first save
        if directory.startswith("gs://") and not _importable("google.cloud.storage"):
            raise CheckpointError(f"checkpoint folder {directory}: Orbax needs google-cloud-storage to write to "
                                  "gs:// (pip install 'dlfx[tpu]'), or set train.checkpoint_dir to a local folder")
        return
    path = os.path.abspath(directory)
    parent = path
    while not os.path.lexists(parent):  # the folder is made later, by the first save: check where it will go
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointError(f"checkpoint folder {directory}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint folder {directory}: {parent} is not writable")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def _resolve(path: str) -> str:
    from dlfx import remote

    return remote.origin(path)


def _iterator_state(iterator: Any) -> dict:
    """A data iterator's position as a JSON-able dict (grain iterators give a dict, dlfx's prefetcher bytes)."""
    state = iterator.get_state()
    return json.loads(state) if isinstance(state, bytes) else state


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for `tree`, the restore target Orbax needs."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
