"""Looking inside a trained classifier: gradient saliency, SmoothGrad, integrated gradients, attention maps.

Every method is jit-compiled and batched with `vmap` (over examples, noise samples or path steps);
inputs are whatever the model takes (NHWC images, (T, C) sequences). Logits are pre-softmax scores.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlfx.inspection import path_str


def logit_fn(model: Any, variables: dict) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """`f(x, target)`: the target-class logit of one example (eval mode)."""

    def f(x, target):
        return model.apply(variables, x[None], train=False)[0, target]

    return f


def saliency(model: Any, variables: dict, x: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """d logit[target] / d input, per example."""
    return jax.jit(jax.vmap(jax.grad(logit_fn(model, variables))))(x, target)


def smoothgrad(model: Any, variables: dict, x: jnp.ndarray, target: jnp.ndarray, rng: jnp.ndarray,
               num_samples: int = 32, noise: float = 0.15) -> jnp.ndarray:
    """Saliency averaged over `num_samples` copies with Gaussian noise of std `noise` x (input range)."""
    grad = jax.grad(logit_fn(model, variables))

    @jax.jit
    def run(x, target, rng):
        scale = noise * (jnp.max(x) - jnp.min(x))
        keys = jax.random.split(rng, x.shape[0])

        def one(xi, ti, key):
            noisy = xi[None] + scale * jax.random.normal(key, (num_samples, *xi.shape), xi.dtype)
            return jax.vmap(grad, in_axes=(0, None))(noisy, ti).mean(axis=0)

        return jax.vmap(one)(x, target, keys)

    return run(x, target, rng)


def integrated_gradients(model: Any, variables: dict, x: jnp.ndarray, target: jnp.ndarray,
                         baseline: jnp.ndarray | None = None, steps: int = 64) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Integrated gradients (midpoint rule on `steps` points) and each example's completeness error.

    The error is |sum(attributions) - (f(x) - f(baseline))| / |f(x) - f(baseline)|.
    """
    f = logit_fn(model, variables)
    grad = jax.grad(f)
    baseline = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)

    @jax.jit
    def run(x, baseline, target):
        alphas = (jnp.arange(steps, dtype=x.dtype) + 0.5) / steps

        def one(xi, bi, ti):
            path = bi[None] + alphas.reshape(-1, *([1] * xi.ndim)) * (xi - bi)[None]
            attribution = (xi - bi) * jax.vmap(grad, in_axes=(0, None))(path, ti).mean(axis=0)
            delta = f(xi, ti) - f(bi, ti)
            return attribution, jnp.abs(attribution.sum() - delta) / jnp.maximum(jnp.abs(delta), 1e-12)

        return jax.vmap(one)(x, baseline, target)

    return run(x, baseline, target)


def attention_maps(model: Any, variables: dict, x: jnp.ndarray) -> list[jnp.ndarray]:
    """Attention weights of every layer, in layer order: each (batch, heads, queries, keys)."""
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(variables, x)
    leaves = [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
              if "attention_weights" in path_str(p)]
    if not leaves:
        raise ValueError(f"{type(model).__name__} records no attention weights (not a Transformer/ViT)")

    def layer_index(path: str) -> int:
        found = re.findall(r"h_(\d+)", path)
        return int(found[-1]) if found else 0

    maps = []
    for _, leaf in sorted(leaves, key=lambda item: layer_index(item[0])):
        maps.extend(list(leaf) if leaf.ndim == 5 else [leaf])  # scanned layers stack a layer axis
    return maps


def attention_rollout(maps: list[jnp.ndarray]) -> jnp.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): head-averaged attention plus identity, multiplied over layers."""
    rollout = None
    for weights in maps:
        a = weights.mean(axis=1)
        a = a + jnp.eye(a.shape[-1])[None]
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: Any, variables: dict, x: jnp.ndarray) -> jnp.ndarray:
    return jnp.argmax(model.apply(variables, x, train=False), axis=-1)


def predictions(model: Any, variables: dict, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted classes for a whole array, in jitted batches of one shape (the last one padded): one
    compilation per model and input shape, whatever the weights."""
    out = []
    for i in range(0, len(x), batch_size):
        chunk = np.asarray(x[i:i + batch_size])
        real = len(chunk)
        if real < batch_size and len(x) > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_predict(model, variables, chunk))[:real])
    return np.concatenate(out)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels.astype(int), predicted.astype(int)), 1)
    return counts


def parse_indices(text: str, limit: int) -> list[int]:
    """`0..7` (inclusive), `3` or `1,4,9` -> example indices, checked against the split size."""
    from dlfx.errors import ConfigError

    try:
        if ".." in text:
            first, last = (int(v) for v in text.split(".."))
            if first <= last and not (0 <= first and last < limit):  # checked before a list of them is made
                raise ConfigError(f"--index {text!r}: indices must be in [0, {limit})")
            indices = list(range(first, last + 1))
        else:
            indices = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--index {text!r}: expected N, A..B or A,B,C") from None
    if not indices:
        raise ConfigError(f"--index {text!r} selects no example (A..B needs A <= B)")
    bad = [i for i in indices if not 0 <= i < limit]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ConfigError(f"--index {text!r}: indices must be in [0, {limit}) (bad: {shown})")
    return indices


METHODS = ("saliency", "smoothgrad", "integrated_gradients", "attention")


def interpret_workdir(workdir: str, out: str, split: str = "test", index: str = "0..7",
                      methods: tuple[str, ...] = ("saliency", "smoothgrad", "integrated_gradients"),
                      step: int | None = None, ig_steps: int = 64, seed: int = 0) -> dict:
    """Attribution (or attention-rollout) figure for examples of a run's split; returns what was measured."""
    from dlfx import data, load_run, plot, remote, tasks
    from dlfx.data import access
    from dlfx.errors import ConfigError

    if not methods:
        raise ConfigError(f"--method names no method (one or more of {', '.join(METHODS)})")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--method {m!r} is not one of {', '.join(METHODS)}")
    if "attention" in methods and len(methods) > 1:
        raise ConfigError("--method attention makes its own figure; give it alone")
    if ig_steps < 1:
        raise ConfigError(f"--ig-steps must be >= 1, got {ig_steps}")
    out = plot.output_path(out, "interpret.png")
    run = load_run(workdir, step)
    if type(run.task) is not tasks.Classification:  # attributions explain a class score
        raise ConfigError(f"{workdir} is a {type(run.task).__name__} run; interpret works on classifiers")
    held = {"train": run.dataset.train, "test": run.dataset.test}.get(split)
    if held is None:
        raise ConfigError(f"--split {split!r} is not one of train, test")
    indices = parse_indices(index, access.length(held))
    examples = access.read(held, indices)
    transform = data.input_transform(run.dataset.metadata)  # attributions are over the model's own input
    x = jnp.asarray(transform(examples["x"]) if transform else examples["x"])
    y = np.asarray(examples["y"])
    predicted = np.asarray(jnp.argmax(run.model.apply(run.variables, x, train=False), axis=-1))
    titles = [f"#{i} y={t} p={p}" for i, t, p in zip(indices, y, predicted)]
    target = jnp.asarray(predicted)
    result: dict = {"indices": indices, "labels": y.tolist(), "predicted": predicted.tolist(), "out": out}
    if "attention" in methods:
        try:
            maps = attention_maps(run.model, run.variables, x)
        except ValueError as e:
            raise ConfigError(f"--method attention: {e}; use it on a transformer or vit run") from None
        rollout = np.asarray(attention_rollout(maps))
        tokens = rollout.shape[-1]
        patch = getattr(run.model, "patch_size", None)
        grid = (x.shape[1] // patch, x.shape[2] // patch) if patch and x.ndim == 4 else None
        if grid and grid[0] * grid[1] != tokens - 1:
            grid = None
        with remote.writable_file(out) as local:  # a gs:// figure is written locally, then uploaded
            plot.plot_attention(np.asarray(x), rollout, grid, titles, local)
        result["layers"] = len(maps)
        return result
    attributions = {}
    if "saliency" in methods:
        attributions["saliency"] = saliency(run.model, run.variables, x, target)
    if "smoothgrad" in methods:
        attributions["smoothgrad"] = smoothgrad(run.model, run.variables, x, target, jax.random.PRNGKey(seed))
    if "integrated_gradients" in methods:
        attributions["integrated gradients"], error = integrated_gradients(run.model, run.variables, x, target,
                                                                           steps=ig_steps)
        result["ig_completeness_error"] = float(jnp.max(error))
    with remote.writable_file(out) as local:
        plot.plot_attributions(np.asarray(x), {k: np.asarray(v) for k, v in attributions.items()}, titles, local)
    return result
