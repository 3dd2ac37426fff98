"""Device-resident train data (`config.data.on_device`): the same batches as the host pipeline, exact resume."""

import os
import shutil

import chex
import jax
import numpy as np
import pytest

from dlfx import config as config_lib, data, runner
from dlfx.data import files, resident
from dlfx.errors import ConfigError
from dlfx.experiment import build


def tiny_config(repo_root, *overrides):
    base = ["model.features=(4, 8)", "model.hidden_dim=16", "model.dropout_rate=0.2", "data.batch_size=32",
            "train.epochs=0", "train.steps=12", "train.checkpoint_every=6", "train.log_every=3",
            "train.eval_every=0", "optimizer.warmup_steps=2"]
    return config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), base + list(overrides))


@pytest.mark.parametrize("extra", [("train.steps_per_call=4",), ("parallel.num_devices=1",),
                                   ("parallel.num_devices=1", "train.steps_per_call=4", "train.steps=48",
                                    "train.log_every=16", "train.checkpoint_every=24")])
def test_resident_split_trains_bit_identically_to_the_host_pipeline_and_resumes_across_the_switch(
        repo_root, tmp_path, extra):
    # 8 devices (shard_map), 4 steps per call (calls of 1 up to the log points); or one device, one step per
    # call, the row indices of 16 steps in one transfer (read inline); or one device, 4-step calls read inline
    # 8 calls per transfer (steps 0-31; the 4 calls before the end go in a zero-padded one); dropout, batch norm
    on_dir = str(tmp_path / "on")
    on = runner.train(tiny_config(repo_root, "data.on_device=on", *extra), on_dir)
    off = runner.train(tiny_config(repo_root, "data.on_device=off", *extra), str(tmp_path / "off"))
    assert build(tiny_config(repo_root, *extra)).resident  # auto picks it for the digits
    chex.assert_trees_all_equal(on["state"], off["state"])
    assert on["step_traces"] == off["step_traces"]  # padded chunks of calls: one program per call length
    # a checkpoint written with the data on the devices resumes with the data on the host: same position
    last = max(int(p) for p in os.listdir(os.path.join(on_dir, "checkpoints")) if p.isdigit())
    shutil.rmtree(os.path.join(on_dir, "checkpoints", str(last)))
    resumed = runner.train(tiny_config(repo_root, "data.on_device=off", *extra), on_dir, force=True)
    chex.assert_trees_all_equal(resumed["state"], off["state"])


def test_index_batches_are_the_host_pipeline_rows():
    arrays = {"x": np.arange(40, dtype=np.float32).reshape(20, 2), "y": np.arange(20)}
    rows = data.train_iterator(arrays, 4, seed=5, process_index=1, process_count=2, indices_only=True)
    examples = data.train_iterator(arrays, 4, seed=5, process_index=1, process_count=2)
    for _ in range(7):  # across an epoch boundary (5 batches per epoch)
        index, batch = next(rows)["index"], next(examples)
        assert index.dtype == np.int32 and index.shape == (2,)
        np.testing.assert_array_equal(arrays["x"][index], batch["x"])


def test_auto_keeps_only_small_in_memory_unaugmented_splits_and_on_says_why_not(repo_root, tmp_path, monkeypatch):
    config = tiny_config(repo_root)
    mesh = build(config).mesh
    split = {"x": np.zeros((64, 8, 8, 1), np.float32), "y": np.zeros(64, np.int32)}
    assert resident.decide(config, split, mesh)
    assert not resident.decide(tiny_config(repo_root, "data.on_device=off"), split, mesh)
    assert not resident.decide(tiny_config(repo_root, "data.crop_padding=1"), split, mesh)
    with pytest.raises(ConfigError, match="data.crop_padding / data.random_flip augment batches on the host"):
        resident.decide(tiny_config(repo_root, "data.on_device=on", "data.random_flip=True"), split, mesh)
    path = tmp_path / "x.npy"
    np.save(path, split["x"])
    mapped = {"x": np.load(path, mmap_mode="r"), "y": split["y"]}
    assert not resident.decide(config, mapped, mesh)  # file-backed: stays on the host unless asked
    assert resident.decide(tiny_config(repo_root, "data.on_device=on"), mapped, mesh)
    np.save(tmp_path / "y.npy", np.arange(64, dtype=np.int32) % 3)
    subset = files.arrays(str(tmp_path), test_fraction=0.25).train  # rows of memory-mapped arrays
    assert not resident.decide(config, subset, mesh)
    assert resident.decide(tiny_config(repo_root, "data.on_device=on"), subset, mesh)
    chex.assert_trees_all_equal(jax.device_get(resident.place(subset, mesh))["y"], subset.rows()["y"])
    monkeypatch.setattr(resident, "UNKNOWN_MEMORY_LIMIT", 1000)  # CPU devices report no memory size
    assert not resident.decide(config, split, mesh)
    with pytest.raises(ConfigError, match="config.data.on_device='on' cannot be used: the train split is a streamed"):
        resident.decide(tiny_config(repo_root, "data.on_device=on"), _Streamed(), mesh)
    with pytest.raises(ConfigError, match="config.data.on_device='maybe' is not one of auto, on, off"):
        tiny_config(repo_root, "data.on_device=maybe")


class _Streamed:
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": np.zeros((8, 8, 1), np.float32), "y": np.int32(0)}


def test_auto_steps_per_call_times_the_step_and_switches_mid_run(repo_root, tmp_path, monkeypatch, capsys):
    # auto measures on accelerators only; here the CPU stands in, and the measured choice is fixed at 3
    from dlfx import feed

    def choose(calls_per_target, *args):  # a step time that asks for this many steps per call (before caps)
        return feed.choose_steps_per_call(feed.CALL_TARGET_S / calls_per_target, *args)

    assert choose(24.5, 512) == 25 and choose(1, 512) == 1 and choose(0.2, 512) == 1
    assert feed.choose_steps_per_call(1e-6, 32 << 20) == 2  # at most 64 MiB of stacked batches per call
    # a divisor of the log/eval/checkpoint intervals where one fits: no one-step calls to fill up to them
    assert choose(3.5, 512, (50, 500, 500)) == 5  # 4 wanted
    assert choose(24.5, 512, (50, 0, 200)) == 25
    assert choose(99.5, 512, (50, 0, 0)) == 50  # 100 wanted, 50 at most
    assert choose(3.5, 512, (7, 0, 0)) == 7
    assert choose(3.5, 512, (3,)) == 3  # 4 would make every call cross a point
    assert choose(24.5, 512, (10, 0, 500)) == 10
    assert choose(3.5, 32 << 20, (25,)) == 2  # 2 fit, none divides 25: the 2
    config = tiny_config(repo_root, "parallel.num_devices=1", "train.steps=40", "train.log_every=5",
                         "train.checkpoint_every=20", "train.steps_per_call=0")
    assert not feed.can_tune(build(config))  # auto on CPU: one step per call
    monkeypatch.setattr(feed, "AUTO_PLATFORMS", ("cpu",))
    monkeypatch.setattr(feed, "choose_steps_per_call", lambda seconds, nbytes, every: 3)
    auto = runner.train(config, str(tmp_path / "auto"))
    assert "train.steps_per_call=auto: 3" in capsys.readouterr().err
    # the 1-step call on a chunk of row indices (with its slot), the 3-step call, and after the switch 1-step
    # calls on one batch of row indices (up to the log points)
    assert auto["steps_per_call"] == 3 and auto["step_traces"] == 3
    monkeypatch.undo()
    one = runner.train(tiny_config(repo_root, "parallel.num_devices=1", "train.steps=40", "train.log_every=5",
                                   "train.checkpoint_every=20", "train.steps_per_call=1"), str(tmp_path / "one"))
    chex.assert_trees_all_close(auto["state"], one["state"], rtol=1e-5, atol=1e-6)
