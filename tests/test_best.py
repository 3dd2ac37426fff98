"""train.keep_best: the state of the best eval is kept in checkpoints/best and restored by eval/load_run."""

import os
import shutil

import pytest

import dlfx
from dlfx import config as config_lib, log, runner, tasks
from dlfx.checkpoint import BestCheckpoint
from dlfx.errors import CheckpointError, ConfigError

RUN = ["train.epochs=0", "train.steps=8", "train.eval_every=2", "train.log_every=2", "train.checkpoint_every=4",
       "optimizer.warmup_steps=1", "optimizer.learning_rate=0.05", "model.hidden_dims=(16,)"]


def _config(repo_root, *extra):
    return config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"), RUN + list(extra))


def test_best_eval_is_kept_restored_and_survives_a_resume(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    runner.train(_config(repo_root, "train.keep_best=loss"), workdir)
    evals = [r for r in log.read_metrics(workdir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    best = min(evals, key=lambda r: r["loss"])
    assert os.listdir(os.path.join(workdir, "checkpoints", "best")) == [str(best["step"])]
    result = runner.evaluate_workdir(workdir, "best")
    assert result["step"] == best["step"] and result["loss"] == pytest.approx(best["loss"], rel=1e-6)
    assert dlfx.load_run(workdir, step="best").step == best["step"]
    stray = os.path.join(workdir, "checkpoints", "best", "99")
    os.makedirs(stray)  # an empty step folder (a save cut off before it began) masks nothing
    assert runner.evaluate_workdir(workdir, "best")["step"] == best["step"]
    os.rmdir(stray)
    kept = BestCheckpoint(os.path.join(workdir, "checkpoints"), "loss", "min")
    assert kept.best() == (best["step"], pytest.approx(best["loss"], rel=1e-6))  # a resumed run starts from it
    kept.close()

    # a kill before the final save: the rerun resumes at step 4 and ends with the same best checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    summary = runner.train(_config(repo_root, "train.keep_best=loss"), workdir)
    assert summary["status"] == "finished"
    assert os.listdir(os.path.join(workdir, "checkpoints", "best")) == [str(best["step"])]
    assert runner.evaluate_workdir(workdir, "best")["loss"] == pytest.approx(best["loss"], rel=1e-6)


def test_keep_best_refuses_unknown_metrics_and_runs_without_it(repo_root, tmp_path):
    with pytest.raises(ConfigError, match="not an eval metric of this task .one of loss, accuracy, top5_accuracy"):
        runner.train(_config(repo_root, "train.keep_best=acc"), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
    workdir = str(tmp_path / "plain")
    runner.train(_config(repo_root, "train.steps=2", "train.eval_every=0"), workdir)
    with pytest.raises(CheckpointError, match="trained without config.train.keep_best"):
        runner.evaluate_workdir(workdir, "best")
    with open(os.path.join(workdir, "checkpoints", "best"), "w") as f:
        f.write("not a folder")
    with pytest.raises(CheckpointError, match="is a file, not the best-checkpoint folder"):
        runner.evaluate_workdir(workdir, "best")


def test_best_mode_knows_the_built_in_metrics():
    classification, regression = tasks.Classification(num_classes=10), tasks.Regression()
    assert tasks.best_mode("accuracy", classification) == "max"
    assert tasks.best_mode("loss", classification) == "min"
    assert tasks.best_mode("r2", regression) == "max"
    assert tasks.best_mode("mae", regression) == "min"
    assert tasks.best_mode("r2", regression, "min") == "min"  # an explicit mode wins

    class Custom:
        eval_metrics = ("psnr",)

    with pytest.raises(ConfigError, match="set config.train.best_mode"):
        tasks.best_mode("psnr", Custom())
