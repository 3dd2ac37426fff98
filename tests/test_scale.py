"""Scale-out: FSDP equals one device, shards parameters; grad accumulation; bf16; restore on any device count."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfx import config as config_lib, experiment, optim, parallel, runner, sharding, steps
from dlfx.errors import ConfigError
from test_zoo_parallel import CASES, NUM_STEPS, _batches_and_reference


def _sgd(total=100):
    opt = config_lib.base_config().optimizer.to_dict() | {"name": "sgd", "learning_rate": 0.05,
                                                          "schedule": "constant", "weight_decay": 0.01}
    return optim.build(opt, total)


@pytest.mark.parametrize("case", ["cnn", "gpt"])  # batch norm and a per-token loss
def test_fsdp_on_eight_devices_matches_one(case):
    batches, example, (reference, ref_losses) = _batches_and_reference(case)
    model = CASES[case][0]()
    if hasattr(model, "axis_name"):
        model = model.clone(axis_name=None)  # fsdp runs one global program: batch norm sees the global batch
    mesh = parallel.make_mesh(jax.devices(), mode="fsdp", data=2, fsdp=4)
    tx, schedule = _sgd()

    def init():
        key = jax.random.PRNGKey(0)
        return steps.create_train_state(steps.init_variables(model, example, key), tx, key)

    layout = sharding.state_shardings(jax.eval_shape(init), mesh, min_size=0)
    state = jax.jit(init, out_shardings=layout)()
    split = [p for p in jax.tree.leaves(state.params) if p.sharding.spec != jax.P()]
    assert split, "some parameters must actually be sharded over fsdp"
    train_step = parallel.compile_step(steps.make_train_step(model, tx, schedule, axis_name=None), "fsdp", mesh,
                                       donate_state=True, state_sharding=layout)
    losses = []
    for batch in batches:
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh, "fsdp"))
        losses.append(metrics["loss"])
    assert len(losses) == NUM_STEPS and train_step.traces[0] == 1
    chex.assert_trees_all_close(state.params, reference.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state.batch_stats, reference.batch_stats, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jnp.stack(losses), ref_losses, rtol=1e-6, atol=1e-6)
    for new, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(layout.params)):
        assert new.sharding.spec == want.spec


def test_fsdp_cuts_per_device_parameter_bytes(repo_root):
    spec = os.path.join(repo_root, "configs/char_gpt.py")
    replicated = experiment.build(config_lib.load(spec, ["data.seq_len=32"])).init()
    fsdp_exp = experiment.build(config_lib.load(spec, ["data.seq_len=32", "parallel.mode=fsdp"]))
    fsdp = fsdp_exp.init()
    full, split = sharding.bytes_per_device(replicated.params), sharding.bytes_per_device(fsdp.params)
    assert fsdp_exp.mesh.shape == {"data": 1, "fsdp": 8}
    assert split < full / 6  # 8-way split of the big kernels; small vectors stay replicated
    assert sharding.bytes_per_device(fsdp.opt_state) < sharding.bytes_per_device(replicated.opt_state) / 6


def test_fsdp_rules_and_mesh_errors():
    rules = sharding.parse_rules(["wte/.*=replicate", "h/.*/fc1/kernel=0"])
    assert sharding.param_spec("wte/embedding", (64, 32), 4, rules, 0) == jax.P()
    assert sharding.param_spec("h/h_0/fc1/kernel", (32, 128), 4, rules, 0) == jax.P("fsdp", None)
    assert sharding.param_spec("h/h_0/fc2/kernel", (128, 32), 4, rules, 0) == jax.P("fsdp", None)
    assert sharding.param_spec("ln/scale", (32,), 4, rules, 10**6) == jax.P()  # small: replicated
    with pytest.raises(ConfigError, match="cannot be split"):
        sharding.param_spec("h/h_0/fc1/kernel", (30, 128), 4, rules, 0)
    with pytest.raises(ConfigError, match="does not match the 8 devices"):
        parallel.make_mesh(jax.devices(), mode="fsdp", data=3, fsdp=2)


@pytest.mark.parametrize("devices", [1, 8])
def test_grad_accumulation_equals_the_large_batch(devices):
    batches, example, _ = _batches_and_reference("gpt")
    model = CASES["gpt"][0]()
    tx, schedule = _sgd()
    mesh = parallel.make_mesh(jax.devices()[:devices])

    def run(accum):
        key = jax.random.PRNGKey(0)
        state = jax.jit(lambda: steps.create_train_state(steps.init_variables(model, example, key), tx, key),
                        out_shardings=parallel.replicated(mesh))()
        step = parallel.compile_step(steps.make_train_step(model, tx, schedule, grad_accum_steps=accum),
                                     "shard_map", mesh, donate_state=True)
        for batch in batches:
            state, metrics = step(state, parallel.shard_batch(batch, mesh, "shard_map"))
        return state, metrics

    big, big_metrics = run(1)
    accumulated, metrics = run(2)
    chex.assert_trees_all_close(accumulated.params, big.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], big_metrics["loss"], rtol=1e-5)


def test_grad_accumulation_must_divide_the_batch(repo_root):
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        experiment.build(config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"),
                                         ["data.batch_size=64", "optimizer.grad_accum_steps=3"]))


def _cnn(repo_root, *overrides):
    base = ["model.features=(8, 16)", "model.hidden_dim=32", "model.dropout_rate=0.0", "data.batch_size=64",
            "train.epochs=0", "train.steps=30", "train.checkpoint_every=10", "train.log_every=10",
            "optimizer.name=sgd", "optimizer.learning_rate=0.05", "optimizer.schedule=constant"]
    return config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), base + list(overrides))


def test_bfloat16_trains_close_to_float32(repo_root, tmp_path):
    f32 = runner.train(_cnn(repo_root, "train.steps=60"), str(tmp_path / "f32"))
    bf16 = runner.train(_cnn(repo_root, "train.steps=60", "precision.compute_dtype=bfloat16"), str(tmp_path / "bf16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16["state"].params))  # params stay float32
    first = [r for r in runner.log.read_metrics(str(tmp_path / "bf16")) if r["split"] == "train"][0]
    assert bf16["train"]["loss"] < 0.5 * first["loss"]  # it learns
    assert abs(bf16["eval"]["accuracy"] - f32["eval"]["accuracy"]) < 0.05


def test_checkpoint_moves_between_device_counts_and_modes(repo_root, tmp_path):
    """8 devices (shard_map) -> 1 device -> 8 devices (fsdp) in one workdir equals one uninterrupted run."""
    reference = runner.train(_cnn(repo_root, "parallel.num_devices=1"), str(tmp_path / "ref"))
    workdir = str(tmp_path / "moving")
    runner.train(_cnn(repo_root, "train.steps=10"), workdir)
    runner.train(_cnn(repo_root, "train.steps=20", "parallel.num_devices=1"), workdir, force=True)
    moved = runner.train(_cnn(repo_root, "parallel.mode=fsdp", "parallel.fsdp_min_size=0"), workdir, force=True)
    assert moved["step"] == 30 and moved["devices"] == 8 and moved["mode"] == "fsdp"
    chex.assert_trees_all_close(moved["state"].params, reference["state"].params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(moved["state"].batch_stats, reference["state"].batch_stats, rtol=1e-5, atol=1e-6)
