"""Tasks (classification, lm, regression, a user's) and import paths for models, data and tasks."""

import json
import os
import re
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from dlfx import config as config_lib, log, runner
from dlfx.errors import ConfigError, DataError

from checks import assert_bit_identical

REGRESSION = ["model.name=mlp", "model.hidden_dims=(32,)", "model.dropout_rate=0.0", "data.name=sines", "data.length=16",
              "data.num_train=256", "data.num_test=64", "task.name=regression", "data.batch_size=32",
              "train.epochs=0", "train.steps=40", "train.log_every=10", "train.eval_every=0",
              "optimizer.warmup_steps=2", "optimizer.learning_rate=0.01", "train.steps_per_call=1"]
CUSTOM = "experiments/custom_research/config.py"
CUSTOM_TINY = ["model.features=8", "model.num_layers=2", "data.length=16", "data.num_train=128", "data.num_test=64",
               "data.batch_size=32", "train.steps=12", "train.log_every=4", "train.eval_every=0",
               "train.checkpoint_every=6", "optimizer.warmup_steps=2"]


def _config(repo_root, path, base, *extra):
    return config_lib.load(os.path.join(repo_root, path), base + list(extra))


def test_regression_trains_reports_r2_and_matches_one_device(repo_root, tmp_path):
    one = runner.train(_config(repo_root, "configs/digits_mlp.py", REGRESSION, "parallel.num_devices=1"),
                       str(tmp_path / "one"))
    losses = [r["loss"] for r in log.read_metrics(str(tmp_path / "one")) if r["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert set(one["eval"]) == {"loss", "mse", "mae", "r2"} and 0.0 < one["eval"]["r2"] <= 1.0
    assert one["eval"]["loss"] == pytest.approx(one["eval"]["mse"])
    for mode in ("pmap", "shard_map", "fsdp"):  # 8 fake devices
        many = runner.train(_config(repo_root, "configs/digits_mlp.py", REGRESSION, f"parallel.mode={mode}"),
                            str(tmp_path / mode))
        chex.assert_trees_all_close(one["state"], many["state"], rtol=1e-5, atol=1e-6)


def test_lm_task_reports_perplexity_and_bits_per_char(repo_root, tmp_path):
    summary = runner.train(_config(repo_root, "configs/char_lstm.py", [
        "model.hidden_dim=32", "model.embed_dim=16", "data.seq_len=32", "data.batch_size=16", "train.epochs=0",
        "train.steps=4", "train.log_every=2", "train.eval_every=0", "optimizer.warmup_steps=1",
        "parallel.num_devices=1"]), str(tmp_path / "lm"))
    metrics = summary["eval"]
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-6)
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / np.log(2), rel=1e-6)


VAE_TINY = ["model.latent_dim=4", "model.hidden_dims=(32,)", "data.batch_size=32", "train.steps=30",
            "train.log_every=10", "train.eval_every=0", "optimizer.warmup_steps=2", "parallel.num_devices=1"]


@pytest.mark.parametrize("kl_weight", [0.0, 1.0])
def test_autoencoder_and_vae_train_report_their_terms_and_draw_reconstructions(repo_root, tmp_path, kl_weight):
    workdir = str(tmp_path / "ae")
    summary = runner.train(_config(repo_root, "configs/digits_vae.py", VAE_TINY, f"task.kl_weight={kl_weight}"),
                           workdir)
    losses = [r["loss"] for r in log.read_metrics(workdir) if r["split"] == "train"]
    assert losses[-1] < losses[0]
    metrics = summary["eval"]
    if kl_weight:
        assert set(metrics) == {"loss", "reconstruction", "kl", "elbo"} and metrics["kl"] > 0
        assert metrics["elbo"] == pytest.approx(-(metrics["reconstruction"] + metrics["kl"]))
    else:
        assert set(metrics) == {"loss", "reconstruction"}
    assert os.path.getsize(os.path.join(workdir, "plots", "reconstructions.png")) > 0
    assert os.path.getsize(os.path.join(workdir, "plots", "curves.png")) > 0


def test_label_smoothing_moves_from_loss_to_task_and_old_key_still_works(repo_root):
    old = _config(repo_root, "configs/digits_cnn.py", ["loss.label_smoothing=0.1"])
    new = _config(repo_root, "configs/digits_cnn.py", ["task.label_smoothing=0.1"])
    from dlfx import data, tasks

    dataset = data.load(old.data)
    assert tasks.build(old.task, dataset, old.loss.label_smoothing).label_smoothing == 0.1
    assert tasks.build(new.task, dataset, new.loss.label_smoothing).label_smoothing == 0.1


def test_user_model_data_and_task_train_through_the_cli_and_resume_bit_identically(repo_root, tmp_path):
    folder = tmp_path / "research"  # a research repo of its own: config, nets, data and task side by side
    shutil.copytree(os.path.join(repo_root, "experiments/custom_research"), folder)
    workdir, elsewhere = str(tmp_path / "run"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    train = ["train", "--config", str(folder / "config.py"), "--workdir", workdir,
             *[f"--config.{o}" for o in CUSTOM_TINY], "--config.parallel.num_devices=1"]
    preempted = subprocess.run([sys.executable, os.path.join(repo_root, "tests", "data", "sigterm_at.py"), "mid_run",
                                *train], cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                               env={**os.environ, "DLFX_TEST_SIGTERM_STEP": "3"})
    assert preempted.returncode == 0, preempted.stderr[-2000:]
    assert "preempted: saved step 4" in preempted.stderr
    resumed = subprocess.run([sys.executable, "-m", "dlfx", *train], cwd=str(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 4" in resumed.stderr and "gain_db=" in resumed.stdout
    with open(os.path.join(workdir, "imports.json")) as f:  # where nets/data/tasks were imported from
        assert json.load(f) == {"search_dirs": [str(folder)]}
    evaluated = subprocess.run([sys.executable, "-m", "dlfx", "eval", "--workdir", workdir], cwd=str(elsewhere),
                               capture_output=True, text=True, timeout=300)  # no config file near
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["step"] == 12 and "gain_db" in json.loads(evaluated.stdout)

    config = _config(repo_root, CUSTOM, CUSTOM_TINY, "parallel.num_devices=1")
    reference = runner.train(config, str(tmp_path / "uninterrupted"))
    from checks import restore_newest

    state, step = restore_newest(config, os.path.join(workdir, "checkpoints"))
    assert step == 12
    assert_bit_identical(reference["state"], state)


BAD = [
    (["task.name=nosuch"], "config.task.name='nosuch'"),
    (["task.name=regression", "task.nosuch=1"], "config.task.nosuch"),
    (["task.name=regression", "task.loss_name=l3"], "config.task.loss_name"),
    (["model.name=no_such_module_xyz:Net"], "no module 'no_such_module_xyz'"),
    (["model.name=nets:Missing"], "nets (imported from "),
    (["model.name=data:noisy_waves"], "not a flax.linen.Module class"),
    (["data.name=data:not_a_dataset"], "returned a list, not a dlfx.data.Dataset"),
    (["data.name=data:unequal"], "unequal lengths"),
    (["task.name=tasks:VectorLoss"], "the loss must be a scalar"),
    (["task.name=tasks:Denoising", "task.weight=2"], "config.task.weight"),
    (["task.name=nets:Denoiser"], "config.task"),
    (["task.name=tasks:IntLoss"], "the loss must be a float scalar to differentiate, got int32"),
    (["task.name=tasks:NoGain"], "declares eval_metrics ['loss', 'input_mse', 'gain_db'] but finalize returns"),
    (["task.name=tasks:BadFinalize"], "finalize must return a dict of metrics, got list"),
    (["model.name=nets:Raises"], "config.model (nets:Raises) failed when initialized"),
    (["model.name=/somewhere/nets.py:Denoiser"], "give a module name, not a file path"),
    (["data.name=data:no_x"], "its train examples have no 'x' (the model's input); they have 'inp', 'clean'"),
    (["data.name=data:objects"], "train 'clean' has dtype object, not numbers"),
    (["data.name=data:bad_labels", "task.name=classification"],
     "train labels 'y' span 5..7, outside 0..2 for its num_classes=3"),
]


@pytest.mark.parametrize("overrides, expected", BAD)
def test_bad_user_targets_are_one_clear_error_and_leave_no_workdir(repo_root, tmp_path, monkeypatch, overrides,
                                                                  expected):
    folder = tmp_path / "research"
    shutil.copytree(os.path.join(repo_root, "experiments/custom_research"), folder)
    with open(folder / "data.py", "a") as f:
        f.write("\n\ndef not_a_dataset(**kwargs):\n    return [1, 2]\n"
                "\n\ndef unequal(**kwargs):\n    import numpy as np\n    return Dataset(train={'x': np.zeros((4, 16, 1)), "
                "'clean': np.zeros((3, 16, 1))}, test={'x': np.zeros((2, 16, 1)), 'clean': np.zeros((2, 16, 1))})\n"
                "\n\ndef no_x(**kwargs):\n    d = noisy_waves(length=16, num_train=64, num_test=16)\n"
                "    return Dataset(train={'inp': d.train['x'], 'clean': d.train['clean']}, test=d.test)\n"
                "\n\ndef objects(**kwargs):\n    import numpy as np\n    d = noisy_waves(length=16, num_train=64, num_test=16)\n"
                "    return Dataset(train={'x': d.train['x'], 'clean': np.array([None] * 64)}, test=d.test)\n"
                "\n\ndef bad_labels(**kwargs):\n    import numpy as np\n    d = noisy_waves(length=16, num_train=64, num_test=16)\n"
                "    y = lambda n: np.arange(n, dtype=np.int32) % 3 + 5\n"
                "    return Dataset(train={**d.train, 'y': y(64)}, test={**d.test, 'y': y(16)}, num_classes=3)\n")
    with open(folder / "nets.py", "a") as f:
        f.write("\n\nclass Raises(Denoiser):\n    @nn.compact\n    def __call__(self, x, train=False):\n"
                "        raise RuntimeError('my model is broken')\n")
    with open(folder / "tasks.py", "a") as f:
        f.write("\n\nclass VectorLoss(Denoising):\n    def loss(self, model, variables, batch, rng, train=True):\n"
                "        out, updates = apply_model(model, variables, batch['x'], rng, train)\n"
                "        err = jnp.square(out - batch['clean']).mean(axis=(1, 2))\n"
                "        return err, {'loss': err.mean()}, updates\n"
                "\n\nclass IntLoss(Denoising):\n    def loss(self, model, variables, batch, rng, train=True):\n"
                "        out, updates = apply_model(model, variables, batch['x'], rng, train)\n"
                "        return jnp.int32(1), {'loss': jnp.float32(1)}, updates\n"
                "\n\nclass NoGain(Denoising):\n    def finalize(self, totals):\n        return means(totals)\n"
                "\n\nclass BadFinalize(Denoising):\n    def finalize(self, totals):\n        return [totals['loss']]\n")
    for name in ("nets", "data", "tasks"):
        sys.modules.pop(name, None)  # each case imports its own copy ...
    monkeypatch.syspath_prepend(str(folder))  # ... from its own folder, ahead of another test's
    workdir = str(tmp_path / "run")
    with pytest.raises((ConfigError, DataError), match=re.escape(expected)):
        config = config_lib.load(str(folder / "config.py"), CUSTOM_TINY + ["parallel.num_devices=1"] + overrides)
        runner.train(config, workdir)
    assert not os.path.exists(workdir)
    for name in ("nets", "data", "tasks"):
        sys.modules.pop(name, None)
