"""Restoring a finished (or running) run from its workdir: its checkpoint folder, state, evaluation."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from etils import epath

from dlfx import config as config_lib, data, remote, steps
from dlfx.checkpoint import BEST_FOLDER, Checkpointer, check_owner
from dlfx.errors import CheckpointError, ConfigError, DataError
from dlfx.experiment import Experiment, build, evaluate
from dlfx.workdir import DATA_FILE, read_json


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where a run's checkpoints live: `config.train.checkpoint_dir` (e.g. gs://...) or `workdir/checkpoints`."""
    if config.train.checkpoint_dir:
        try:
            remote.is_remote(config.train.checkpoint_dir)  # a URL dlfx cannot reach is refused here
        except ConfigError as e:
            raise ConfigError(f"config.train.checkpoint_dir: {e}") from None
        return config.train.checkpoint_dir
    base = remote.origin(workdir)  # a mirror's checkpoints are those of the remote folder, read in place
    return remote.join(base, "checkpoints") if remote.is_remote(base) else os.path.join(workdir, "checkpoints")


def restore_run(workdir: str, step: int | str | None = None,
                load_data: bool = True) -> tuple[Experiment, steps.TrainState, int]:
    """A run's experiment and its newest valid (or the given, or with step="best" its best-eval) checkpointed
    state (the one live copy, on its devices); changes no file. The public, host-side view is `dlfx.load_run`.

    `load_data=False` builds the model from the run's `data.json` instead of loading the data set (the
    experiment's dataset is then a two-example stand-in of zeros)."""
    with remote.readable(workdir) as local:  # a gs:// run: its small files pulled, its checkpoints read in place
        return _restore_run(local, step, load_data)


def _restore_run(workdir: str, step: int | str | None, load_data: bool) -> tuple[Experiment, steps.TrainState, int]:
    if isinstance(step, str) and step != "best":
        if not step.isdigit():
            raise CheckpointError(f"step={step!r}: give a step number, \"best\" or None (the newest)")
        step = int(step)
    config = config_lib.read_workdir_config(workdir)
    directory = checkpoint_dir(config, workdir)
    if not epath.Path(directory).is_dir():
        raise CheckpointError(f"no checkpoint folder {directory}")
    check_owner(directory, config, workdir)  # another run's checkpoints are not this run's result
    if step == "best":
        directory, step = _best_step(config, directory)
    description = os.path.join(workdir, DATA_FILE)
    if load_data or not os.path.isfile(description):  # runs from before data.json load their data
        exp = build(config)
    else:
        try:
            stand_in = data.stand_in(read_json(description))
        except DataError as e:
            raise DataError(f"{description} is damaged: {e}") from None
        exp = build(config, stand_in)
    checkpointer = Checkpointer(directory, keep=config.train.keep)
    try:
        if step is None:
            restored = checkpointer.restore_latest(exp.abstract_state, quarantine=False)
            if restored is None:
                raise CheckpointError(f"no checkpoint in {directory}")
            state, step = restored
        else:
            if step not in checkpointer.steps():
                raise CheckpointError(f"no checkpoint at step {step} in {directory} "
                                      f"(saved: {checkpointer.steps()})")
            state = checkpointer.restore(step, exp.abstract_state)
    finally:
        checkpointer.close()
    return exp, state, step


def _best_step(config: ml_collections.ConfigDict, directory: str) -> tuple[str, int]:
    """The folder and step of a run's best-eval checkpoint (train.keep_best)."""
    best = epath.Path(directory) / BEST_FOLDER
    if best.exists() and not best.is_dir():
        raise CheckpointError(f"{best} is a file, not the best-checkpoint folder")
    saved = sorted(int(p.name) for p in best.iterdir()  # finished saves only: a stray empty folder masks nothing
                   if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()) if best.is_dir() else []
    if not saved:
        why = ("it was trained without config.train.keep_best" if not config.train.keep_best
               else f"no eval of {config.train.keep_best!r} has been saved yet")
        raise CheckpointError(f"no best checkpoint in {best}: {why}")
    return str(best), saved[-1]


def evaluate_workdir(workdir: str, step: int | str | None = None) -> dict[str, Any]:
    """Restore a run's newest valid (or the given, or "best") checkpoint and evaluate it on the test split."""
    exp, state, step = restore_run(workdir, step)
    return {"step": step, **evaluate(exp, state, exp.eval_step())}
