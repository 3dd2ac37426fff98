"""Optax optimizers and learning-rate schedules built from `config.optimizer`."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import re

import jax
import numpy as np
import optax

from dlfx.errors import ConfigError
from dlfx.inspection import path_str


def make_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """The learning-rate schedule: optional linear warmup, then constant/cosine/linear/step decay."""
    peak, end, warmup = opt["learning_rate"], opt["end_learning_rate"], opt["warmup_steps"]
    name = opt["schedule"]
    if name == "warmup_cosine" and warmup <= 0:
        raise ConfigError("config.optimizer.warmup_steps must be > 0 for schedule 'warmup_cosine'")
    if warmup >= total_steps and name != "constant":
        raise ConfigError(f"config.optimizer.warmup_steps={warmup} must be smaller than the "
                          f"{total_steps} training steps")
    decay_steps = max(total_steps - warmup, 1)
    if name == "constant":
        main = optax.constant_schedule(peak)
    elif name in ("cosine", "warmup_cosine"):
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif name == "linear":
        main = optax.linear_schedule(peak, end, decay_steps)
    elif name == "step":
        boundaries = opt["boundaries"]
        if any(not 0 < b < 1 for b in boundaries):
            raise ConfigError(f"config.optimizer.boundaries must be fractions in (0, 1), got {tuple(boundaries)}")
        main = optax.piecewise_constant_schedule(
            peak, {int(b * decay_steps): opt["decay_factor"] for b in boundaries})
    else:
        raise ConfigError(f"config.optimizer.schedule={name!r} is unknown")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: kernels and embeddings, not biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build(opt: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer as one optax chain: clip -> direction (sgd/adam/lion) -> decoupled decay -> -lr."""
    schedule = make_schedule(opt, total_steps)
    name = opt["name"]
    if name == "sgd":
        direction = (optax.trace(decay=opt["momentum"], nesterov=opt["nesterov"])
                     if opt["momentum"] > 0 else optax.identity())
    elif name in ("adam", "adamw"):
        direction = optax.scale_by_adam(b1=opt["b1"], b2=opt["b2"], eps=opt["eps"])
    elif name == "lion":
        direction = optax.scale_by_lion(b1=opt["b1"], b2=opt["b2"])
    else:
        raise ConfigError(f"config.optimizer.name={name!r} is unknown")
    parts = []
    if opt["clip_norm"] > 0:
        parts.append(optax.clip_by_global_norm(opt["clip_norm"]))
    parts.append(direction)
    if opt["weight_decay"] > 0:
        parts.append(optax.add_decayed_weights(opt["weight_decay"], mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    freeze = tuple(opt.get("freeze", ()))
    if freeze:  # frozen parameters get a zero update: no gradient step, no weight decay, no optimizer state
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                   lambda params: freeze_labels(params, freeze))
    return tx, schedule


def is_frozen(path: str, patterns: Iterable[str]) -> bool:
    """True if a regex of `optimizer.freeze` matches the whole `a/b/c` path."""
    return any(re.fullmatch(p, path) for p in patterns)


def freeze_labels(params: Any, patterns: Iterable[str]) -> Any:
    """'frozen' for parameters whose path matches a freeze regex, 'trainable' for the rest."""
    patterns = tuple(patterns)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if is_frozen(path_str(p), patterns) else "trainable", params)


def count_frozen(params: Any, patterns: Iterable[str]) -> tuple[int, int]:
    """(trainable, frozen) parameter counts under the freeze regexes."""
    labels = jax.tree.leaves(freeze_labels(params, patterns))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    frozen = sum(s for s, label in zip(sizes, labels) if label == "frozen")
    return sum(sizes) - frozen, frozen


def check_freeze(params: Any, patterns: Iterable[str]) -> None:
    """Every freeze regex must be valid and match at least one parameter path."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.optimizer.freeze: {pattern!r} is not a valid regex ({e})") from None
        if not any(re.fullmatch(pattern, path) for path in paths):
            raise ConfigError(f"config.optimizer.freeze: {pattern!r} matches no parameter "
                              f"(paths look like {paths[0]!r}; see `dlfx inspect`)")
