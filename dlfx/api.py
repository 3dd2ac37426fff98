"""`dlfx.load_run`: a trained run as config, model, variables and a jitted `predict`, for notebooks and scripts."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from dlfx import data


@dataclasses.dataclass
class Run:
    """A restored run. `variables` are host arrays (`params`, and `batch_stats` for batch-norm models)."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model: Any
    variables: dict
    dataset: data.Dataset
    predict: Callable[[Any], jax.Array]  # x (as the data gives it) -> logits, jit-compiled, eval mode
    task: Any = None  # the objective it was trained with (dlfx.tasks)


def load_run(workdir: str, step: int | str | None = None) -> Run:
    """Restore a run's newest valid checkpoint (or the given step, or "best": its best eval under
    train.keep_best); changes no file in the workdir."""
    from dlfx import restore

    exp, state, step = restore.restore_run(workdir, step)
    variables = {"params": jax.device_get(state.params)}
    if state.batch_stats:
        variables["batch_stats"] = jax.device_get(state.batch_stats)
    model = exp.model
    transform = exp.preprocess or (lambda x: x)  # e.g. uint8 images are normalised as in training
    predict = jax.jit(lambda x: model.apply(variables, transform(x), train=False))
    return Run(workdir, step, exp.config, model, variables, exp.dataset, predict, exp.task)
