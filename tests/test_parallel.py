"""pmap and shard_map on 8 devices give the 1-device result; dropout differs per device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfx import config as config_lib, data, models, optim, parallel, steps

NUM_STEPS = 5
GLOBAL_BATCH = 64


def _batches():
    ds = data.load({"name": "digits"})
    it = data.train_iterator(ds.train, GLOBAL_BATCH, seed=0)
    return [next(it) for _ in range(NUM_STEPS)], ds.test


def _setup(model_name, devices, mode, **model_kwargs):
    mesh = parallel.make_mesh(devices)
    model = models.build(model_name, **model_kwargs)
    opt = config_lib.base_config().optimizer.to_dict() | {"name": "sgd", "learning_rate": 0.05,
                                                          "schedule": "constant", "weight_decay": 1e-3}
    tx, schedule = optim.build(opt, 100)

    def init():
        key = jax.random.PRNGKey(0)
        return steps.create_train_state(steps.init_variables(model, jnp.zeros((1, 8, 8, 1)), key), tx, key)

    state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
    train_step = parallel.compile_step(steps.make_train_step(model, tx, schedule), mode, mesh, donate_state=True)
    eval_step = parallel.compile_step(steps.make_eval_step(model), mode, mesh)
    return mesh, state, train_step, eval_step


def _train(model_name, devices, mode, batches, **model_kwargs):
    mesh, state, train_step, eval_step = _setup(model_name, devices, mode, **model_kwargs)
    losses = []
    for batch in batches:
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh, mode))
        losses.append(metrics["loss"])
    return state, jnp.stack(losses), (mesh, eval_step)


def _evaluate(state, test, mesh, eval_step, mode):
    totals = [eval_step(state, parallel.shard_batch(b, mesh, mode)) for b in data.eval_batches(test, GLOBAL_BATCH)]
    return jax.tree.map(lambda *x: sum(x), *jax.device_get(totals))


@pytest.mark.parametrize("model_name, kwargs", [("cnn", {"features": (8, 16), "axis_name": "data"}),
                                                ("mlp", {"hidden_dims": (32,)})])
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eight_devices_match_one_device(model_name, kwargs, mode):
    batches, test = _batches()
    reference, ref_losses, (ref_mesh, ref_eval) = _train(model_name, jax.devices()[:1], "shard_map", batches, **kwargs)
    state, losses, (mesh, eval_step) = _train(model_name, jax.devices(), mode, batches, **kwargs)
    assert mesh.devices.size == 8
    chex.assert_trees_all_close(state.params, reference.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state.batch_stats, reference.batch_stats, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(losses, ref_losses, rtol=1e-6, atol=1e-6)
    assert int(state.step) == NUM_STEPS
    eval_8 = _evaluate(state, test, mesh, eval_step, mode)
    eval_1 = _evaluate(reference, test, ref_mesh, ref_eval, "shard_map")
    assert eval_8["count"] == eval_1["count"] == len(test["y"])  # padded batches, nothing dropped
    chex.assert_trees_all_close(eval_8, eval_1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_state_stays_global_and_replicated(mode):
    batches, _ = _batches()
    state, _, _ = _train("cnn", jax.devices(), mode, batches, features=(4,), axis_name="data")
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == 8 and all(np.array_equal(shards[0], s) for s in shards)


def test_batch_norm_without_axis_name_would_diverge():
    """Guards the test above: per-device BN statistics are measurably different from synced ones."""
    batches, _ = _batches()
    synced, _, _ = _train("cnn", jax.devices(), "shard_map", batches, features=(4,), axis_name="data")
    local, _, _ = _train("cnn", jax.devices(), "shard_map", batches, features=(4,), axis_name=None)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), synced.batch_stats, local.batch_stats)
    assert max(jax.tree.leaves(diff)) > 1e-4


@pytest.mark.parametrize("dropout_rate, should_match", [(0.0, True), (0.5, False)])
def test_dropout_masks_differ_per_device(dropout_rate, should_match):
    """Eight devices fed the same shard match one device only if every device drew the same mask."""
    batches, _ = _batches()
    shard = [{k: v[:8] for k, v in b.items()} for b in batches]
    tiled = [{k: np.concatenate([v] * 8) for k, v in b.items()} for b in shard]
    one, _, _ = _train("mlp", jax.devices()[:1], "shard_map", shard, hidden_dims=(32,), dropout_rate=dropout_rate)
    eight, _, _ = _train("mlp", jax.devices(), "shard_map", tiled, hidden_dims=(32,), dropout_rate=dropout_rate)
    close = all(np.allclose(a, b, atol=1e-5) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)))
    assert close == should_match


def test_dispatch_limit_waits_for_the_call_depth_back(monkeypatch):
    """The runner's run-ahead bound: adding call k+depth blocks on call k, and on nothing before."""
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waited.append(int(x)) or x)
    limit = parallel.DispatchLimit(depth=2)
    for k in range(5):
        limit.add(jnp.asarray(k))
        assert waited == list(range(max(0, k - 1)))


def test_a_batch_array_without_a_batch_axis_is_refused_by_name():
    mesh = parallel.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="batch key 'y' has shape \\(\\): batch arrays need a leading batch axis"):
        parallel.shard_batch({"x": np.zeros((4, 2), np.float32), "y": np.int32(3)}, mesh, "shard_map")
    with pytest.raises(ValueError, match=r"'x' has shape \(4,\).*\(steps, batch\)"):
        parallel.shard_batch({"x": np.zeros((4,), np.float32)}, mesh, "shard_map", stacked=True)
