"""Tasks: the objective and eval metrics of an experiment, picked by `config.task.name`.

A task is any object with
  `train_metrics` / `eval_metrics`  names of what `loss` and `finalize` return (declared up front),
  `loss(model, variables, batch, rng, train) -> (scalar loss, {name: scalar}, updated mutable collections)`,
  `eval_sums(model, variables, batch) -> {name: sum over the real (batch['mask'] = 1) examples, 'count': ...}`,
  `finalize(totals) -> {name: float}` (the sums totalled over the whole eval split),
and optionally `model_defaults(dataset) -> {model argument: value}` (e.g. the number of logits).
Built-ins are frozen dataclasses whose fields are the `config.task.*` keys; a `package.module:Class`
target works the same way.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlfx import imports
from dlfx.errors import ConfigError, one_line
from dlfx.tasks.autoencoder import Autoencoder
from dlfx.tasks.classification import Classification
from dlfx.tasks.common import apply_model, means, per_example
from dlfx.tasks.lm import LanguageModel
from dlfx.tasks.regression import Regression

log = logging.getLogger("dlfx")

TASKS: dict[str, type] = {"autoencoder": Autoencoder, "classification": Classification, "lm": LanguageModel,
                          "regression": Regression}
REQUIRED = ("train_metrics", "eval_metrics", "loss", "eval_sums", "finalize")

__all__ = ["Autoencoder", "Classification", "LanguageModel", "Regression", "TASKS", "apply_model", "best_mode", "build",
           "default_name",
           "check", "means", "per_example", "resolve"]


LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_char", "bits_per_token", "mse", "mae", "huber", "kl",
                   "reconstruction", "error")
HIGHER_IS_BETTER = ("accuracy", "top5_accuracy", "r2", "elbo")


def best_mode(metric: str, task: Any, mode: str = "auto") -> str:
    """`max` or `min` for `config.train.keep_best=metric`: an eval metric of the task; `auto` knows the built-ins'."""
    if metric not in task.eval_metrics:
        raise ConfigError(f"config.train.keep_best={metric!r} is not an eval metric of this task "
                          f"(one of {', '.join(task.eval_metrics)})")
    if mode != "auto":
        return mode
    if metric in LOWER_IS_BETTER or metric.endswith("loss"):
        return "min"
    if metric in HIGHER_IS_BETTER or metric.endswith("accuracy"):
        return "max"
    raise ConfigError(f"config.train.keep_best={metric!r}: set config.train.best_mode to 'max' or 'min' "
                      "(dlfx cannot tell which way is better for this metric)")


def default_name(dataset: Any) -> str:
    """The task of a config that names none: `lm` for token data (text, token folders), else `classification`."""
    metadata = getattr(dataset, "metadata", {})
    return "lm" if metadata.get("kind") == "tokens" or "vocab" in metadata else "classification"


def resolve(name: str, search_dirs: tuple[str, ...] = ()) -> Any:
    """The class (or object) `config.task.name` names: a built-in or a `package.module:attr` target."""
    return imports.resolve(name, TASKS, "config.task.name", "a task class or object", lambda t: True, search_dirs)

def arguments(target: Any) -> dict[str, Any]:
    """Constructor arguments of a task class and their defaults (inspect.Parameter.empty if required)."""
    if not inspect.isclass(target):
        return {}
    return {n: p.default for n, p in inspect.signature(target).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build(task_config: ml_collections.ConfigDict, dataset: Any, legacy_label_smoothing: float = 0.0,
          search_dirs: tuple[str, ...] = ()) -> Any:
    """The task of `config.task` for `dataset`, its arguments checked like a model's."""
    name = task_config.get("name", "") or default_name(dataset)
    target = resolve(name, search_dirs)
    kwargs = {k: v for k, v in task_config.items() if k != "name"}
    accepted = arguments(target)
    if inspect.isclass(target):
        for key in kwargs:
            if key not in accepted:
                raise ConfigError(f"config.task.{key}: task {name!r} takes no argument {key!r} "
                                  f"(valid: {', '.join(accepted) or 'none'})")
        if "label_smoothing" in accepted and legacy_label_smoothing:  # the old config.loss.label_smoothing
            kwargs.setdefault("label_smoothing", legacy_label_smoothing)
        for field, value in (("num_classes", dataset.num_classes), ("vocab_size", dataset.num_classes),
                             ("char_level", bool(dataset.metadata.get("char_level", True)))):
            if field in accepted and field not in kwargs and value is not None:
                kwargs[field] = value
        try:
            task = target(**kwargs)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"config.task ({name}): {one_line(e)}") from None
    elif kwargs:
        raise ConfigError(f"config.task.{next(iter(kwargs))}: task {name!r} is an object and takes no arguments")
    else:
        task = target
    missing = [attr for attr in REQUIRED if not hasattr(task, attr)]
    if missing:
        raise ConfigError(f"config.task.name={name!r} is not a task: it lacks {', '.join(missing)} "
                          "(see dlfx.tasks)")
    return task



def check(task: Any, model: Any, state: Any, batch: dict, name: str = "", axis_name: str = "data") -> None:
    """Trace (no compute) the task's loss and eval sums on a two-example batch, so a task that does not fit
    the model or data, returns a non-scalar loss or other metrics than it declares fails in one ConfigError
    line before anything is written."""
    label = name or type(task).__name__
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], batch)  # a mapped axis binds the device-axis name

    def train_loss(v, b):
        return jax.vmap(lambda x: task.loss(model, v, x, jax.random.PRNGKey(0), True), axis_name=axis_name)(b)

    def eval_sums(v, b):
        return jax.vmap(lambda x: task.eval_sums(model, v, {**x, "mask": jnp.ones(len(next(iter(x.values()))),
                                                                                  jnp.float32)}),
                        axis_name=axis_name)(b)

    try:  # the state may be abstract (shapes only): it goes in as an argument, never as a constant
        loss, metrics, _ = jax.eval_shape(train_loss, variables, stacked)
        sums = jax.eval_shape(eval_sums, variables, stacked)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config.task ({label}) fails on this model and data (batch keys "
                          f"{sorted(batch)}): {one_line(e)}") from None
    if not hasattr(loss, "shape") or loss.shape != (1,):
        raise ConfigError(f"config.task ({label}): the loss must be a scalar, got "
                          f"{f'shape {loss.shape[1:]}' if hasattr(loss, 'shape') else type(loss).__name__}")
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ConfigError(f"config.task ({label}): the loss must be a float scalar to differentiate, got "
                          f"{loss.dtype}")
    for what, value in (("loss's metrics", metrics), ("eval_sums", sums)):
        if not isinstance(value, dict):
            raise ConfigError(f"config.task ({label}): the {what} must be a dict of scalars, got "
                              f"{type(value).__name__}")
    if set(metrics) != set(task.train_metrics):
        raise ConfigError(f"config.task ({label}) declares train_metrics {sorted(task.train_metrics)} but its loss "
                          f"returns {sorted(metrics)}")
    bad = [k for k, v in {**metrics, **sums}.items() if v.shape != (1,)]
    if bad:
        raise ConfigError(f"config.task ({label}): metric {bad[0]!r} is not a scalar")
    if "count" not in sums:
        raise ConfigError(f"config.task ({label}): eval_sums must return a 'count' (the real examples summed)")
    _check_finalize(task, label, sums)


def _check_finalize(task: Any, label: str, sums: dict) -> None:
    """Call `finalize` on stand-in totals (distinct values, count 8): it must return a mapping holding every
    declared eval metric, or the run would fail only at its first eval. A finalize that raises on made-up totals
    (its arithmetic may need real ones) is a warning, not a refusal."""
    totals = {k: np.full(v.shape[1:], 8.0 if k == "count" else 2.0 + i, np.dtype(v.dtype))
              for i, (k, v) in enumerate(sorted(sums.items()))}
    try:
        final = task.finalize(totals)
    except ConfigError:
        raise
    except Exception as e:
        log.warning("config.task (%s): finalize fails on stand-in totals with keys %s (%s); check it before the "
                    "first eval", label, sorted(totals), one_line(e))
        return
    if not isinstance(final, Mapping):
        raise ConfigError(f"config.task ({label}): finalize must return a dict of metrics, got {type(final).__name__}")
    missing = [m for m in task.eval_metrics if m not in final]
    if missing:
        raise ConfigError(f"config.task ({label}) declares eval_metrics {list(task.eval_metrics)} but finalize "
                          f"returns {sorted(final)} (no {', '.join(repr(m) for m in missing)})")
