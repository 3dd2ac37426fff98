"""Every zoo config trains a few steps end to end through the runner (tiny sizes); LM runs sample text."""

import json
import os

import numpy as np
import pytest

from dlfx import config as config_lib, data, runner, sampling
from dlfx.errors import ConfigError, DataError

FEW_STEPS = ["train.epochs=0", "train.steps=4", "train.log_every=2", "train.eval_every=0",
             "train.checkpoint_every=4", "optimizer.warmup_steps=1", "parallel.num_devices=1"]  # 8 devices: test_zoo_parallel

TINY = {
    "configs/mnist1d.py:gru": ["model.hidden_dim=8", "data.num_samples=400"],
    "configs/mnist1d.py:resnet": ["model.width=4", "model.name=resnet10", "data.num_samples=400"],  # fewer blocks
    "configs/mnist1d.py:transformer": ["model.embed_dim=8", "model.num_layers=1", "model.num_heads=2",
                                       "data.num_samples=400"],
    "configs/mnist1d.py:mlp": ["data.num_samples=400"],
    "configs/mnist1d.py:cnn": ["data.num_samples=400"],
    "configs/digits_resnet.py": ["model.width=4", "model.name=resnet10", "data.batch_size=64"],
    "configs/digits_vit.py": ["model.embed_dim=8", "model.num_layers=1", "model.num_heads=2", "data.batch_size=64"],
    "configs/digits_mlp.py": [],
    "configs/digits_vae.py": ["model.hidden_dims=(16,)", "model.latent_dim=2"],
    "configs/sines.py": ["model.features=(8, 8)", "data.num_train=256", "data.num_test=64", "data.batch_size=32"],
    "configs/char_lstm.py": ["model.hidden_dim=16", "model.num_layers=1", "data.seq_len=32", "data.batch_size=16"],
    "configs/char_gpt.py": ["model.embed_dim=16", "model.num_layers=1", "model.num_heads=2", "data.seq_len=32",
                            "data.batch_size=16", "model.max_len=64"],
}


@pytest.mark.parametrize("spec", sorted(TINY))
def test_config_trains_end_to_end(repo_root, tmp_path, monkeypatch, spec):
    path, _, arg = spec.partition(":")
    config = config_lib.load(os.path.join(repo_root, path) + (f":{arg}" if arg else ""), FEW_STEPS + TINY[spec])
    workdir = str(tmp_path / "run")
    summary = runner.train(config, workdir)
    assert summary["status"] == "finished" and summary["step"] == 4
    assert np.isfinite(summary["train"]["loss"])
    if config.task.name == "regression":
        assert {"mse", "mae", "r2"} <= set(summary["eval"])
    elif config.task.name == "autoencoder":
        assert np.isfinite(summary["eval"]["elbo"])
    else:
        assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    if config.data.name == "text":
        assert summary["eval"]["bits_per_char"] > 0
        with open(os.path.join(workdir, "data.json")) as f:
            vocab = json.load(f)["metadata"]["vocab"]

        def no_data(*args, **kwargs):
            raise AssertionError("sampling must not load the data set")

        monkeypatch.setattr(data, "load", no_data)  # the model is built from data.json
        texts = sampling.sample_workdir(workdir, "def ", length=70, temperature=0.8, num_samples=2)
        assert len(texts) == 2 and all(t.startswith("def ") and len(t) == 74 for t in texts)  # > seq_len 32
        assert all(c in vocab for c in texts[0])
        with pytest.raises(DataError, match="not in the run's vocabulary"):
            sampling.sample_workdir(workdir, "\u2603", length=5)


def test_sampling_a_classifier_run_is_refused(repo_root, tmp_path):
    config = config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"), FEW_STEPS)
    runner.train(config, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="cannot be sampled as text"):
        sampling.sample_workdir(str(tmp_path / "run"), "a", 5)


def test_text_source_windows_and_split(tmp_path):
    corpus = "abcdefghij" * 50
    path = tmp_path / "corpus.txt"
    path.write_text(corpus)
    ds = data.load({"name": "text", "path": str(path), "seq_len": 8, "val_fraction": 0.2})
    assert ds.metadata["vocab"] == list("abcdefghij") and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train["x"][:, 1:], ds.train["y"][:, :-1])  # y is x shifted by one
    assert len(ds.train["x"]) == (400 - 1) // 8 and len(ds.test["x"]) == (100 - 1) // 8
    decoded = "".join(ds.metadata["vocab"][i] for i in ds.train["x"][0])
    assert decoded == corpus[:8]
    with pytest.raises(DataError, match="text file not found"):
        data.load({"name": "text", "path": str(tmp_path / "missing.txt")})
    default = data.load({"name": "text"})
    assert default.num_classes > 50 and len(default.train["x"]) > 1000


def test_image_augmentation_is_seeded_and_shape_preserving():
    arrays = {"x": np.random.default_rng(0).random((64, 8, 8, 1)).astype(np.float32),
              "y": np.zeros(64, np.int32)}
    plain = next(data.train_iterator(arrays, 16, seed=3))
    augmented = next(data.train_iterator(arrays, 16, seed=3, crop_padding=2, random_flip=True))
    again = next(data.train_iterator(arrays, 16, seed=3, crop_padding=2, random_flip=True))
    assert augmented["x"].shape == plain["x"].shape
    assert not np.array_equal(augmented["x"], plain["x"])
    np.testing.assert_array_equal(augmented["x"], again["x"])
    np.testing.assert_array_equal(augmented["y"], plain["y"])
    flipped = data.augment_images({"x": plain["x"]}, np.random.default_rng(0), 0, True)["x"]
    for original, out in zip(plain["x"], flipped):
        assert np.array_equal(out, original) or np.array_equal(out, original[:, ::-1])
