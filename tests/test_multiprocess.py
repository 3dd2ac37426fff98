"""A real multi-process run: 2 processes x 4 CPU devices over loopback (jax.distributed, gloo) equal 1 x 8."""

import os
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from dlfx import config as config_lib, log, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["model.features=(8, 16)", "model.hidden_dim=32", "data.batch_size=64", "train.epochs=0",
             "train.steps=30", "train.checkpoint_every=10", "train.log_every=5", "optimizer.warmup_steps=5",
             "optimizer.name=sgd", "optimizer.learning_rate=0.05"]  # the split lives on the devices (data.on_device)


def _launch(workdir, processes=2):
    """`launch/local.sh` with 4 fake devices per process; every wait is bounded."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(DLFX_LOCAL_DEVICES=str(8 // processes), PYTHON=sys.executable, DLFX_TIMEOUT="240",
               DLFX_COMPILATION_CACHE="off")
    cmd = ["bash", os.path.join(REPO, "launch/local.sh"), str(processes), "configs/digits_cnn.py", "--workdir",
           workdir] + [f"--config.{o}" for o in OVERRIDES]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _final_params(workdir):
    _, state, step = runner.restore_run(workdir)  # restored here: 1 process, 8 devices
    return state, step


def _train_losses(workdir):
    return [r["loss"] for r in log.read_metrics(workdir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one") / "run")
    summary = runner.train(config_lib.load(os.path.join(REPO, "configs/digits_cnn.py"), OVERRIDES), workdir)
    return workdir, summary["state"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, reference):
    """The 1-process run's workdir as it was after its step-10 checkpoint, continued 10 -> 30 by 2 processes
    (one launch covers both the 2-process run and the 1 -> 2 elastic resume)."""
    workdir = str(tmp_path_factory.mktemp("two") / "run")
    shutil.copytree(reference[0], workdir)
    for step in ("20", "30"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    _launch(workdir)
    return workdir


def test_two_processes_equal_one_and_restore_in_one(reference, two_process_run):
    ref_dir, ref_state = reference
    records = [r for r in log.read_metrics(two_process_run) if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(5, 31, 5))  # steps after 10 logged once, by the 2 processes
    np.testing.assert_allclose(_train_losses(two_process_run), _train_losses(ref_dir), rtol=1e-5)
    state, step = _final_params(two_process_run)
    assert step == 30
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.batch_stats, ref_state.batch_stats, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(two_process_run)) == ["checkpoints", "config.json", "data.json", "events", "metrics.jsonl",
                                                   "plots",
                                                   "status.json"]  # one set of logs (process 0)


def test_elastic_resume_two_to_one(reference, two_process_run, tmp_path):
    _, ref_state = reference
    workdir = str(tmp_path / "elastic")
    shutil.copytree(two_process_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))  # as if the 2 processes had stopped after step 20
    config = config_lib.load(os.path.join(REPO, "configs/digits_cnn.py"), OVERRIDES)
    one = runner.train(config, workdir)  # 1 process continues 20 -> 30 from the 2 processes' checkpoint
    chex.assert_trees_all_close(one["state"].params, ref_state.params, rtol=1e-5, atol=1e-6)


def test_launcher_dry_run_and_usage():
    out = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "--dry-run", "2", "configs/x.py", "--workdir",
                          "w"], capture_output=True, text=True, env={**os.environ, "DLFX_PORT": "12345"}, timeout=30)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2
    assert lines[1].endswith("-m dlfx train --config configs/x.py --coordinator-address 127.0.0.1:12345 "
                             "--num-processes 2 --process-id 1 --workdir w")
    bad = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "two"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_tpu_vm_dry_run_prints_every_command():
    args = ["--dry-run", "--name", "t1", "--zone", "us-central2-b", "--accelerator", "v4-16", "--version",
            "tpu-ubuntu2204-base", "--checkpoint-dir", "gs://b/runs/x", "--", "configs/char_gpt.py",
            "--config.train.steps=10"]
    out = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_vm.sh"), *args], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create t1 --zone us-central2-b --accelerator-type v4-16")
    assert any("--worker=all" in line and "dlfx.tar.gz" in line for line in lines)
    assert any(".\\[tpu\\]" in line or "[tpu]" in line for line in lines)
    train = next(line for line in lines if "dlfx\\ train" in line or "dlfx train" in line)
    assert "DLFX_DISTRIBUTED=1" in train and "gs://b/runs/x" in train and "train.steps=10" in train
    assert lines[-1].startswith("gcloud compute tpus tpu-vm delete t1")
    copy = lines[-2].replace("\\ ", " ")  # printf %q escapes the spaces
    assert "--worker=0" in copy and "gsutil -m rsync -r dlfx/runs/tpu gs://b/runs/x/workdir" in copy
    local = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_vm.sh"), *args[:-5], "/tmp/x", "--", "c.py"],
                           capture_output=True, text=True, timeout=30)
    assert local.returncode == 2 and "gs://" in local.stderr


def test_slurm_dry_run():
    out = subprocess.run(["bash", os.path.join(REPO, "launch/slurm_gpu.sbatch"), "--dry-run", "configs/char_gpt.py",
                          "runs/g"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.strip().startswith("srun --kill-on-bad-exit=1 env DLFX_DISTRIBUTED=1")
    assert out.stdout.strip().endswith("-m dlfx train --config configs/char_gpt.py --workdir runs/g")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launch_scripts_pass_shellcheck():
    scripts = [os.path.join(REPO, "launch", f) for f in ("local.sh", "tpu_vm.sh", "slurm_gpu.sbatch")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
