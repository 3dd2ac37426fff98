"""The experiment loop: artifacts, exact resume, walking back over a broken checkpoint, refusals."""

import os
import shutil

import chex
import jax
import numpy as np
import pytest

from dlfx import config as config_lib, feed, log, runner
from dlfx.errors import ConfigError
from dlfx.experiment import build
from dlfx.workdir import read_json


def tiny_config(repo_root, *overrides):
    base = ["model.features=(8, 16)", "model.hidden_dim=32", "model.dropout_rate=0.2", "data.batch_size=64",
            "train.epochs=0", "train.steps=20", "train.checkpoint_every=10", "train.log_every=5",
            "train.eval_every=10", "optimizer.warmup_steps=5"]
    return config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), base + list(overrides))


def _train_records(workdir):
    return {r["step"]: r for r in log.read_metrics(workdir) if r["split"] == "train"}


def test_run_writes_all_artifacts(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    summary = runner.train(tiny_config(repo_root, "train.keep=1"), workdir)
    assert summary["status"] == "finished" and summary["step"] == 20
    assert summary["step_traces"] == 1  # the train step compiled once: no retracing across steps or evals
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "data.json", "events", "metrics.jsonl", "plots",
                                       "status.json"]
    assert os.path.getsize(os.path.join(workdir, "plots", "curves.png")) > 10_000
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "dlfx_run.json"]  # keep=1, owner
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "events")))
    records = log.read_metrics(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20]
    assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20]
    for r in records:
        assert {"step", "split", "loss", "accuracy", "wall_time"} <= set(r)
    assert {"grad_norm", "learning_rate", "steps_per_sec"} <= set(records[0])
    assert summary["eval"] == {k: records[-1][k] for k in ("loss", "accuracy", "top5_accuracy")}  # 10 classes
    assert config_lib.to_dict(config_lib.read_workdir_config(workdir)) == config_lib.to_dict(tiny_config(repo_root, "train.keep=1"))
    evaluated = runner.evaluate_workdir(workdir)
    assert evaluated["step"] == 20
    np.testing.assert_allclose(evaluated["accuracy"], summary["eval"]["accuracy"], rtol=1e-6)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_resume_from_checkpoint_matches_uninterrupted_run(repo_root, tmp_path, mode):
    config = tiny_config(repo_root, f"parallel.mode={mode}")
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    full = runner.train(config, full_dir)
    # the same run, "killed" after its step-10 checkpoint: drop everything it wrote later
    shutil.copytree(full_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "20"))
    resumed = runner.train(config, resumed_dir)
    assert resumed["step"] == 20
    for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical, dropout and data order included
    full_log, resumed_log = _train_records(full_dir), _train_records(resumed_dir)
    for step in (15, 20):  # same batches after the resume point give the same loss
        assert full_log[step]["loss"] == resumed_log[step]["loss"]
    steps = [(r["step"], r["split"]) for r in log.read_metrics(resumed_dir)]
    assert len(steps) == len(set(steps))  # resumed steps are not logged twice


def test_checkpoint_min_interval_thins_the_scheduled_saves(repo_root, tmp_path):
    """A save scheduled by checkpoint_every within checkpoint_min_interval_s of the last one is skipped; the
    final save always happens, and the run trains the same."""
    states = []
    for interval, saved in [(0, ["10", "20"]), (1e6, ["20"])]:
        workdir = tmp_path / f"run{interval}"
        summary = runner.train(tiny_config(repo_root, "parallel.num_devices=1", "train.eval_every=0",
                                           f"train.checkpoint_min_interval_s={interval}"), str(workdir))
        assert summary["status"] == "finished"
        assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == saved
        states.append(summary["state"])
    chex.assert_trees_all_equal(*states)
    with pytest.raises(ConfigError, match="config.train.checkpoint_min_interval_s must be"):
        config_lib.validate(tiny_config(repo_root, "train.checkpoint_min_interval_s=-1"))


def test_one_device_runs_a_plain_jit_step_equal_to_shard_map(repo_root, tmp_path):
    # parallel.mode=auto on one device compiles the step without shard_map (it costs ~4 % on small models)
    single = runner.train(tiny_config(repo_root, "parallel.num_devices=1", "train.checkpoint_every=0"),
                          str(tmp_path / "single"))
    saved = [d for d in os.listdir(tmp_path / "single" / "checkpoints") if d.isdigit()]
    assert saved == ["20"]  # checkpoint_every=0: only at the end
    mapped = runner.train(tiny_config(repo_root, "parallel.num_devices=1", "parallel.mode=shard_map"),
                          str(tmp_path / "mapped"))
    assert (single["mode"], mapped["mode"]) == ("single", "shard_map")
    chex.assert_trees_all_close(single["state"], mapped["state"], rtol=1e-6, atol=1e-6)
    assert _train_records(str(tmp_path / "single"))[20]["loss"] == pytest.approx(
        _train_records(str(tmp_path / "mapped"))[20]["loss"], rel=1e-6)


def test_steps_per_call_equals_one_step_per_call_and_resumes_across_it(repo_root, tmp_path):
    # 8 devices, batch norm and dropout; 3 steps per call does not divide the log (5) and checkpoint (10)
    # points, so calls of 1 step fill up to them
    one = runner.train(tiny_config(repo_root), str(tmp_path / "one"))
    multi_dir = str(tmp_path / "multi")
    multi = runner.train(tiny_config(repo_root, "train.steps_per_call=3"), multi_dir)
    assert multi["step"] == 20 and multi["step_traces"] == 2  # the 3-step call and the 1-step call, once each
    chex.assert_trees_all_close(one["state"], multi["state"], rtol=1e-5, atol=1e-6)
    one_log, multi_log = _train_records(str(tmp_path / "one")), _train_records(multi_dir)
    assert sorted(multi_log) == [5, 10, 15, 20]
    for step in multi_log:
        assert multi_log[step]["loss"] == pytest.approx(one_log[step]["loss"], rel=1e-5)
    # resumed from step 10 with 1 step per call: the data position is in batches, not calls
    shutil.rmtree(os.path.join(multi_dir, "checkpoints", "20"))
    resumed = runner.train(tiny_config(repo_root), multi_dir, force=True)
    chex.assert_trees_all_close(one["state"], resumed["state"], rtol=1e-5, atol=1e-6)


def test_several_batches_per_transfer_equal_one_and_resume_inside_a_chunk(repo_root, tmp_path, monkeypatch):
    # one device, one step per call: 16 host batches travel per transfer; the checkpoint at 10 is inside a chunk
    chunked_dir = str(tmp_path / "chunked")
    config = tiny_config(repo_root, "parallel.num_devices=1", "data.on_device=off")
    assert feed.transfer_chunk(build(config)) == 16
    chunked = runner.train(config, chunked_dir)
    monkeypatch.setattr(feed, "MAX_TRANSFER_CHUNK", 1)
    single = runner.train(config, str(tmp_path / "single"))
    chex.assert_trees_all_close(chunked["state"], single["state"], rtol=1e-6, atol=1e-7)
    shutil.rmtree(os.path.join(chunked_dir, "checkpoints", "20"))
    monkeypatch.undo()
    resumed = runner.train(config, chunked_dir, force=True)
    chex.assert_trees_all_close(chunked["state"], resumed["state"], rtol=1e-6, atol=1e-7)


# Orbax's failed restore leaves an "Event loop is closed" error in a background thread; it is noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_walks_back_over_a_broken_checkpoint(repo_root, tmp_path, caplog):
    config = tiny_config(repo_root)
    workdir = str(tmp_path / "run")
    full = runner.train(config, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "20", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if name != "_METADATA":
                with open(os.path.join(root, name), "wb"):
                    pass  # truncate every data file of the newest checkpoint
    with caplog.at_level("WARNING", logger="dlfx"):
        again = runner.train(config, workdir, force=True)
    assert "checkpoints/20 is unreadable" in caplog.text
    chex.assert_trees_all_equal(jax.device_get(full["state"].params), jax.device_get(again["state"].params))


def test_different_config_is_refused_and_nothing_changes(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    runner.train(tiny_config(repo_root, "train.steps=5", "train.eval_every=0", "optimizer.warmup_steps=2"), workdir)
    before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(ConfigError, match="different config .*optimizer.learning_rate"):
        runner.train(tiny_config(repo_root, "train.steps=5", "train.eval_every=0", "optimizer.warmup_steps=2", "optimizer.learning_rate=0.5"), workdir)
    assert before == {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}


def test_a_rerun_may_change_how_the_run_is_logged_and_saved(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    base = ["train.steps=10", "train.eval_every=0", "optimizer.warmup_steps=2", "train.checkpoint_every=5"]
    full = runner.train(tiny_config(repo_root, *base), str(tmp_path / "full"))
    runner.train(tiny_config(repo_root, *base), workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "10"))  # resume from step 5
    cadence = ["train.log_every=2", "train.checkpoint_every=3", "train.checkpoint_min_interval_s=1", "train.keep=2"]
    resumed = runner.train(tiny_config(repo_root, *base, *cadence), workdir)
    assert resumed["step"] == 10 and read_json(os.path.join(workdir, "config.json"))["train"]["keep"] == 2
    chex.assert_trees_all_equal(resumed["state"], full["state"])


def test_finished_run_is_not_retrained(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(repo_root, "train.steps=5", "train.eval_every=0", "optimizer.warmup_steps=2")
    runner.train(config, workdir)
    records = log.read_metrics(workdir)
    again = runner.train(config, workdir)
    assert again["step"] == 5 and again["status"] == "finished"
    assert log.read_metrics(workdir) == records  # nothing retrained, re-evaluated or logged twice


def test_failed_start_leaves_no_workdir(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="config.data.batch_size=100 is not divisible by the 8 devices"):
        runner.train(tiny_config(repo_root, "data.batch_size=100"), workdir)
    with pytest.raises(ConfigError, match="config.model.num_classes=5 but the data has 10 classes"):
        runner.train(_with_num_classes(repo_root, 5), workdir)
    assert not os.path.exists(workdir)


def _with_num_classes(repo_root, n):
    path = os.path.join(os.path.dirname(__file__), "data", "mlp_num_classes.py")
    return config_lib.load(path + f":{n}")


def test_loop_schedule_reads_metrics_before_every_eval_and_save():
    import ml_collections

    from dlfx.train_metrics import Due, due

    train = ml_collections.ConfigDict({"log_every": 10, "eval_every": 25, "checkpoint_every": 20})
    assert due(10, 100, train, False) == Due(log=True, read=False, eval=False, save=False)  # read one call later
    assert due(20, 100, train, False) == Due(log=True, read=True, eval=False, save=True)
    assert due(25, 100, train, False) == Due(log=True, read=True, eval=True, save=False)  # off the log grid
    assert due(7, 100, train, True) == Due(log=True, read=True, eval=False, save=False)  # preempted: the runner saves
    assert due(100, 100, train, False) == Due(log=True, read=True, eval=False, save=False)  # final eval/save: runner's
    assert due(3, 100, ml_collections.ConfigDict({"log_every": 10, "eval_every": 0, "checkpoint_every": 0}),
               False) == Due(log=False, read=False, eval=False, save=False)


def test_a_long_metrics_window_is_stacked_in_bounded_pieces(monkeypatch):
    """A window of many calls (a long log_every, or one a SIGTERM closes) is stacked `STACK_CHUNK` records at a
    time: one concatenation of thousands took XLA ~100 s to compile and held the preemption save back."""
    import ml_collections

    from dlfx import train_metrics

    sizes = []
    stack = train_metrics.stack
    monkeypatch.setattr(train_metrics, "stack", lambda records: sizes.append(len(records)) or stack(records))
    names = ["loss", "nonfinite", "first_nonfinite_group"]
    config = ml_collections.ConfigDict({"train": {"nan_policy": "skip", "max_skipped": 5}})
    read = []
    window = train_metrics.Window(names, config, ["w"], 0, lambda step, metrics: read.append((step, metrics)))
    steps = 0
    for i in range(150):  # 10-step calls with one-step calls between, as calls split at log points
        count = 10 if i % 3 else 1
        window.add(jax.numpy.stack([jax.numpy.array([float(steps + j), 0.0, -1.0]) for j in range(count)])
                   if count > 1 else jax.numpy.array([float(steps), 0.0, -1.0]))
        steps += count
    window.close(steps, read_now=True)
    assert max(sizes) <= train_metrics.STACK_CHUNK and sum(sizes) == 150
    assert read[0][0] == steps and read[0][1]["loss"] == pytest.approx((steps - 1) / 2)  # every step, once


def test_build_lays_the_run_out_on_the_devices_it_is_given(repo_root):
    """build(devices=...) (e.g. an ahead-of-time topology's): the mesh and the state's shardings use them."""
    devices = jax.devices()[2:4]
    exp = build(tiny_config(repo_root), devices=devices)
    assert list(exp.mesh.devices.flat) == devices
    assert all(set(leaf.sharding.device_set) == set(devices) for leaf in jax.tree.leaves(exp.abstract_state))
