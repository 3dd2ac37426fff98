"""Model registry, shapes, train/eval behaviour and precision options."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfx import models
from dlfx.models.dropout import keep_mask, random_bits
from dlfx.errors import ConfigError


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, shape, kwargs", [
    ("mlp", (4, 8, 8, 1), {"hidden_dims": (32, 16)}),
    ("cnn", (4, 8, 8, 1), {"features": (8, 16)}),
    ("cnn", (4, 28, 28, 3), {}),
    ("cnn1d", (4, 40, 1), {}),
    ("cnn1d", (4, 40), {}),
])
def test_logits_shape(name, shape, kwargs):
    model = models.build(name, num_classes=7, **kwargs)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
    logits = model.apply(variables, jnp.ones(shape), train=False)
    chex.assert_shape(logits, (shape[0], 7))
    chex.assert_tree_all_finite(logits)


def test_parameter_counts_match_the_architecture():
    model = models.build("cnn", num_classes=10, features=(32, 64), hidden_dim=128)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    # conv 3*3*1*32 + BN 2*32 + conv 3*3*32*64 + BN 2*64 + dense 256*128+128 + head 128*10+10
    assert _count(variables["params"]) == 288 + 64 + 18432 + 128 + 32896 + 1290
    assert _count(variables["batch_stats"]) == 2 * (32 + 64)
    mlp = models.build("mlp", num_classes=10, hidden_dims=(256, 256))
    assert _count(mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]) == 64 * 256 + 256 + 256 * 256 + 256 + 2570


def test_dropout_only_in_training():
    model = models.build("mlp", hidden_dims=(64,), dropout_rate=0.5)
    x = jnp.ones((2, 16))
    variables = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b)
    chex.assert_trees_all_equal(model.apply(variables, x), model.apply(variables, x))


def test_batch_norm_updates_statistics_in_training_only():
    model = models.build("cnn", features=(4,))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 1)) * 3 + 1
    variables = model.init(jax.random.PRNGKey(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])
    _, frozen = model.apply(variables, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(frozen["batch_stats"], variables["batch_stats"])


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.build("cnn", features=(4,), dtype=jnp.bfloat16)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, jnp.ones((2, 8, 8, 1))).dtype == jnp.float32


def test_registry_errors_name_the_problem():
    with pytest.raises(ConfigError, match="config.model.name='vgg' is not one of"):
        models.build("vgg")
    with pytest.raises(ConfigError, match="config.model.width: model 'mlp' takes no argument 'width'"):
        models.build("mlp", width=3)
    assert {"mlp", "cnn", "cnn1d"} <= set(models.names())
    assert "axis_name" in models.fields("cnn") and "axis_name" not in models.fields("mlp")


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.03])
def test_dropout_drops_at_its_rate_and_keeps_the_mean(rate):
    """The dropped fraction is the rate, kept entries are scaled so the mean is unchanged, and the bits are
    `jax.random.bits`."""
    x = jnp.ones((1001, 999), jnp.float32)
    y = models.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - rate) < 0.003 and abs(float(jnp.mean(y)) - 1.0) < 0.005
    kept = np.unique(np.asarray(y[y != 0]))
    np.testing.assert_allclose(kept, [1 / (round((1 - rate) * 2**32) / 2**32)], rtol=1e-6)
    key = jax.random.fold_in(jax.random.key(3), 1)
    bits = jax.jit(random_bits, static_argnums=1)(key, x.shape)  # the fused rounds, as in a train step
    chex.assert_trees_all_equal(bits, jax.random.bits(key, x.shape, jnp.uint32))
    mask, keep = keep_mask(key, 1 - rate, x.shape)
    assert random_bits(key, (0, 1 << 16, 1 << 16)).shape == (0, 1 << 16, 1 << 16)  # empty, counts past 2**32
    chex.assert_trees_all_equal(mask, bits < np.uint32(round((1 - rate) * 2**32)))
    other = models.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(4)})
    assert float(jnp.mean((y == 0) != (other == 0))) > rate  # another key, another mask


def test_dropout_modes_broadcast_and_dtype():
    x = jnp.arange(2 * 3 * 4, dtype=jnp.bfloat16).reshape(2, 3, 4) + 1
    rngs = {"dropout": jax.random.PRNGKey(0)}
    chex.assert_trees_all_equal(models.Dropout(0.5).apply({}, x, deterministic=True), x)
    chex.assert_trees_all_equal(models.Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs), x)
    chex.assert_trees_all_equal(models.Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs), jnp.zeros_like(x))
    per_example = models.Dropout(0.5, broadcast_dims=(1, 2)).apply(
        {}, jnp.ones((64, 3, 4)), deterministic=False, rngs=rngs)
    assert all(len(np.unique(np.asarray(row))) == 1 for row in per_example)  # one draw per example
    assert 0 < float(jnp.mean(per_example[:, 0, 0] == 0)) < 1
    negative = models.Dropout(0.5, broadcast_dims=(-2, -1)).apply({}, jnp.ones((64, 3, 4)), deterministic=False,
                                                                  rngs=rngs)
    chex.assert_trees_all_equal(negative, per_example)  # dims counted from the end: the same mask
    with_key = [models.Dropout(0.5).apply({}, jnp.ones((64, 4)), deterministic=False, rng=jax.random.PRNGKey(k))
                for k in (7, 7, 8)]  # a key passed to the call, as nn.Dropout takes one
    chex.assert_trees_all_equal(with_key[0], with_key[1])
    assert not np.array_equal(with_key[0], with_key[2])
    assert models.Dropout(0.2).apply({}, x, deterministic=False, rngs=rngs).dtype == jnp.bfloat16
    rbg = jax.random.key(5, impl="rbg")  # another generator: its own jax.random.bits
    y = models.Dropout(0.5).apply({}, jnp.ones((64, 4)), deterministic=False, rng=rbg)
    chex.assert_trees_all_equal(y != 0, jax.random.bits(rbg, (64, 4), jnp.uint32) < np.uint32(2**31))


def test_dropout_masks_of_a_sharded_batch_are_drawn_in_parts():
    """Under jit with the batch split over 8 devices, each device hashes only its rows' random bits."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    sharding = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), P("data"))
    drop = jax.jit(lambda x, key: models.Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": key}),
                   in_shardings=(sharding, None), out_shardings=sharding)
    x = jax.device_put(jnp.ones((64, 3, 10)), sharding)
    text = drop.lower(x, jax.random.PRNGKey(0)).compile().as_text()
    assert not any(op in text for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
    chex.assert_trees_all_equal(drop(x, jax.random.PRNGKey(0)), jax.jit(drop.__wrapped__)(np.ones((64, 3, 10), np.float32),
                                                                          jax.random.PRNGKey(0)))
    scalar = models.Dropout(0.5).apply({}, jnp.float32(2.0), deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert scalar.shape == () and float(scalar) in (0.0, 4.0)


def test_dense_flattens_leading_axes_with_nn_dense_parameters_outputs_and_gradients():
    from dlfx.models.dense import Dense, flat_dot_general

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7, 4))
    ours, theirs = Dense(6, name="d"), nn.Dense(6, name="d")
    params = theirs.init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.PRNGKey(1), x), params)
    chex.assert_trees_all_close(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (ours, theirs)]
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    w = jnp.ones((7, 4))  # any other contraction is lax.dot_general's own
    numbers = (((1,), (0,)), ((), ()))
    chex.assert_trees_all_equal(flat_dot_general(x[0], w, numbers), jax.lax.dot_general(x[0], w, numbers))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("approximate", [True, False])
def test_dense_gelu_is_nn_dense_then_gelu_with_a_recomputed_gradient_on_gpu(monkeypatch, backend, approximate):
    """DenseGelu: nn.Dense's parameters (same init), outputs, gradients and forward-mode tangents, bfloat16
    too; on a GPU its gradient recomputes the GELU behind an optimization barrier (nothing but the output kept)."""
    from dlfx.models.dense import DenseGelu

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        ours, dense = DenseGelu(6, approximate, dtype=dtype, name="fc"), nn.Dense(6, dtype=dtype, name="fc")
        params = dense.init(jax.random.PRNGKey(1), x)
        chex.assert_trees_all_equal(ours.init(jax.random.PRNGKey(1), x), params)

        def theirs(p, x):
            return nn.gelu(dense.apply(p, x), approximate=approximate)

        chex.assert_trees_all_close(ours.apply(params, x), theirs(params, x), rtol=tol, atol=tol)
        grads = [jax.grad(lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32))), argnums=(0, 1))(params, x)
                 for f in (ours.apply, theirs)]
        chex.assert_trees_all_close(grads[0], grads[1], rtol=tol, atol=tol)
        tangents = jax.tree.map(jnp.ones_like, params)
        chex.assert_trees_all_close(jax.jvp(ours.apply, (params, x), (tangents, x)),
                                    jax.jvp(theirs, (params, x), (tangents, x)), rtol=tol, atol=tol)
    backward = jax.jit(jax.grad(lambda p: jnp.sum(ours.apply(p, x).astype(jnp.float32)))).lower(params).as_text()
    assert ("optimization_barrier" in backward) == (backend == "gpu")
