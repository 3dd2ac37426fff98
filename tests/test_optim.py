"""Optimizers, schedules, clipping and the weight-decay mask built from config."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlfx import config as config_lib, optim
from dlfx.errors import ConfigError


def _opt(**kw):
    o = config_lib.base_config().optimizer.to_dict()
    o.update(kw)
    return o


def test_schedules_hit_their_endpoints():
    s = optim.make_schedule(_opt(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=10), 110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    s = optim.make_schedule(_opt(schedule="linear", learning_rate=1.0, end_learning_rate=0.1), 100)
    np.testing.assert_allclose([s(0), s(50), s(100)], [1.0, 0.55, 0.1], atol=1e-6)
    s = optim.make_schedule(_opt(schedule="step", learning_rate=1.0, boundaries=(0.5, 0.75), decay_factor=0.1), 100)
    np.testing.assert_allclose([s(49), s(51), s(80)], [1.0, 0.1, 0.01], atol=1e-7)
    s = optim.make_schedule(_opt(schedule="constant", learning_rate=0.3), 100)
    np.testing.assert_allclose([s(0), s(99)], [0.3, 0.3], atol=1e-7)
    s = optim.make_schedule(_opt(schedule="cosine", learning_rate=1.0, end_learning_rate=0.2), 100)
    np.testing.assert_allclose([s(0), s(100)], [1.0, 0.2], atol=1e-6)


def test_schedule_misconfiguration_is_an_error():
    with pytest.raises(ConfigError, match="warmup_steps must be > 0 for schedule 'warmup_cosine'"):
        optim.make_schedule(_opt(schedule="warmup_cosine", warmup_steps=0), 100)
    with pytest.raises(ConfigError, match="warmup_steps=200 must be smaller"):
        optim.make_schedule(_opt(schedule="cosine", warmup_steps=200), 100)
    with pytest.raises(ConfigError, match="boundaries must be fractions"):
        optim.make_schedule(_opt(schedule="step", boundaries=(50,)), 100)


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "bn": {"scale": jnp.ones(2)}}
    tx, _ = optim.build(_opt(name="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5,
                             schedule="constant"), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 0.95)
    chex.assert_trees_all_equal(new["dense"]["bias"], params["dense"]["bias"])
    chex.assert_trees_all_equal(new["bn"]["scale"], params["bn"]["scale"])


def test_global_norm_clipping():
    params = {"w": jnp.zeros(4)}
    tx, _ = optim.build(_opt(name="sgd", momentum=0.0, learning_rate=1.0, clip_norm=2.0, schedule="constant"), 10)
    updates, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 2.0, rtol=1e-6)


@pytest.mark.parametrize("name, extra", [("sgd", {"nesterov": True}), ("sgd", {"momentum": 0.0}),
                                         ("adam", {}), ("adamw", {"weight_decay": 0.01}), ("lion", {"b2": 0.99})])
def test_each_optimizer_minimizes_a_quadratic(name, extra):
    tx, _ = optim.build(_opt(name=name, learning_rate=0.05, schedule="constant", **extra), 200)
    params = {"w": jnp.array([3.0, -2.0])}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(200):
        params, state = step(params, state)
    assert loss(params) < 0.05 * 13.0
