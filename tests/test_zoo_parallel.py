"""ResNet (batch norm) and GPT (per-token loss) on 8 devices give the 1-device result."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfx import config as config_lib, data, models, optim, parallel, steps

NUM_STEPS = 3


def _run(model, example, batches, devices, mode):
    mesh = parallel.make_mesh(devices)
    # SGD: Adam divides near-zero gradients by their own magnitude, which turns float32 rounding of
    # the gradient sum into visible parameter differences; SGD shows the step itself.
    opt = config_lib.base_config().optimizer.to_dict() | {"name": "sgd", "learning_rate": 0.05,
                                                          "schedule": "constant", "weight_decay": 0.01}
    tx, schedule = optim.build(opt, 100)

    def init():
        key = jax.random.PRNGKey(0)
        return steps.create_train_state(steps.init_variables(model, example, key), tx, key)

    state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
    train_step = parallel.compile_step(steps.make_train_step(model, tx, schedule), mode, mesh, donate_state=True)
    losses = []
    for batch in batches:
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh, mode))
        losses.append(metrics["loss"])
    return state, jnp.stack(losses)


def _digits(rng, n):
    ds = data.load({"name": "digits"})
    index = rng.choice(len(ds.train["y"]), n, replace=False)
    return {"x": ds.train["x"][index], "y": ds.train["y"][index]}


CASES = {
    "resnet": (lambda: models.build("resnet10", num_classes=10, width=4, stem="cifar", axis_name="data"),
               lambda rng: _digits(rng, 64)),
    "cnn": (lambda: models.build("cnn", num_classes=10, features=(4, 8), hidden_dim=16, axis_name="data"),
            lambda rng: _digits(rng, 64)),  # batch norm at a fraction of ResNet's compile time (test_scale)
    "gpt": (lambda: models.build("gpt", vocab_size=31, max_len=16, num_layers=2, num_heads=2, embed_dim=16),
            lambda rng: {"x": rng.integers(0, 31, (16, 12)).astype(np.int32),
                         "y": rng.integers(0, 31, (16, 12)).astype(np.int32)}),
}


@functools.lru_cache(maxsize=None)
def _batches_and_reference(case):
    """The batches of a case and its 1-device result, computed once for both modes."""
    make_model, make_batch = CASES[case]
    rng = np.random.default_rng(0)
    batches = [make_batch(rng) for _ in range(NUM_STEPS)]
    example = jnp.asarray(batches[0]["x"][:1])
    return batches, example, _run(make_model(), example, batches, jax.devices()[:1], "shard_map")


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
@pytest.mark.parametrize("case", ["gpt", "resnet"])
def test_zoo_model_on_eight_devices_matches_one(case, mode):
    batches, example, (reference, ref_losses) = _batches_and_reference(case)
    state, losses = _run(CASES[case][0](), example, batches, jax.devices(), mode)
    chex.assert_trees_all_close(state.params, reference.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state.batch_stats, reference.batch_stats, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(losses, ref_losses, rtol=1e-6, atol=1e-6)
