"""A real multi-process run: 2 processes x 4 CPU devices over loopback (jax.distributed, gloo) equal 1 x 8."""

import json
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
             "optimizer.name=sgd", "optimizer.learning_rate=0.05",  # the split lives on the devices (data.on_device)
             "train.checkpoint_min_interval_s=0.001"]  # every save still due; 2 processes agree through process 0


def _launch(workdir, processes=2, config="configs/digits_cnn.py", overrides=OVERRIDES, pythonpath="", check=True):
    """`launch/local.sh` with 4 fake devices per process; every wait is bounded."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(DLFX_LOCAL_DEVICES=str(8 // processes), PYTHON=sys.executable, DLFX_TIMEOUT="240",
               DLFX_COMPILATION_CACHE="off")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    cmd = ["bash", os.path.join(REPO, "launch/local.sh"), str(processes), config, "--workdir",
           workdir] + [f"--config.{o}" for o in overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


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


_FULL_FROM_STEP_15 = '''
import runpy

from dlfx import log
from dlfx.errors import WorkdirError

_record = log.RunLogger._record


def _full_from_step_15(self, entry):  # process 0 alone writes the run files
    if entry["step"] >= 15:
        return WorkdirError("cannot write metrics.jsonl: No space left on device")
    return _record(self, entry)


log.RunLogger._record = _full_from_step_15
get_config = runpy.run_path(CONFIG)["get_config"]
'''


def test_a_run_file_error_on_process_0_stops_every_process_and_loses_nothing(reference, tmp_path):
    """Process 0's run files fail at step 15: both processes stop together at the next point where they read the
    metrics (the step-20 save), keep step 20 with the unwritten records, and the rerun ends equal to 1 process."""
    ref_dir, ref_state = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    for step in ("20", "30"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    full = tmp_path / "full_disk.py"
    full.write_text(_FULL_FROM_STEP_15.replace("CONFIG", repr(os.path.join(REPO, "configs/digits_cnn.py"))))
    failed = _launch(workdir, config=str(full), check=False)
    assert failed.returncode != 0
    assert "cannot write metrics.jsonl: No space left on device" in failed.stderr
    assert "saved step 20 and the 2 metric records the run files could not take" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [10, 20]
    _launch(workdir)
    records = [r for r in log.read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(5, 31, 5))
    np.testing.assert_allclose(_train_losses(workdir), _train_losses(ref_dir), rtol=1e-5)
    state, step = _final_params(workdir)
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)


def test_a_resume_process_0_refuses_stops_every_process(reference, tmp_path):
    """Only process 0 is sure to hold the run's data.json: when its data-set check refuses to resume, process 1
    stops too (it would wait for process 0 in the first collective)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    described = os.path.join(workdir, "data.json")
    with open(described) as f:
        description = json.load(f)
    description["num_examples"]["train"] += 1
    with open(described, "w") as f:
        json.dump(description, f)
    failed = _launch(workdir, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert "the data set changed" in failed.stderr and "process 0 stopped the run" in failed.stderr
    assert "timed out" not in failed.stderr.lower()


_LOGGED_ARRAYS = '''
import jax
from dlfx.data import Dataset, files


class Logged:
    """A memory-mapped train split that appends the rows of every batch it reads to PATH.reads.<process>."""

    def __init__(self, split, log):
        self.split, self.log = split, log

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split[i]

    def gather(self, indices):
        with open(f"{self.log}.{jax.process_index()}", "a") as f:
            f.write(" ".join(str(int(i)) for i in indices) + "\\n")
        return self.split.gather(indices)

    def __repr__(self):
        return f"Logged({len(self)})"


def make(path="", **_):
    arrays = files.arrays(path, test_fraction=0.25)
    return Dataset(train=Logged(arrays.train, path + ".reads"), test=arrays.test, name="logged",
                   num_classes=arrays.num_classes)
'''


def _batches_read(log, size):
    """The train batches of `size` rows a process read, in order (set-up reads of a few rows left out)."""
    with open(log) as f:
        return [rows for rows in (set(map(int, line.split())) for line in f) if len(rows) == size]


def test_two_processes_stream_disjoint_rows_of_a_file_and_equal_one(tmp_path, monkeypatch):
    """A streamed (host pipeline) split read from a memory-mapped file: each process reads only its half of
    every global batch, and 2 processes x 4 devices train to the state of 1 x 8."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(400, 12)).astype(np.float32),
             y=rng.integers(0, 3, 400).astype(np.int32))
    (tmp_path / "logged_arrays.py").write_text(_LOGGED_ARRAYS)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["data.name=logged_arrays:make", f"data.path={tmp_path / 'a.npz'}", "data.batch_size=32",
                 "model.hidden_dims=(16,)", "train.epochs=0", "train.steps=8", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.log_every=4", "train.steps_per_call=4"]
    one = runner.train(config_lib.load(os.path.join(REPO, "configs/digits_mlp.py"), overrides), str(tmp_path / "one"))
    os.rename(tmp_path / "a.npz.reads.0", tmp_path / "one.reads")
    _launch(str(tmp_path / "two"), config="configs/digits_mlp.py", overrides=overrides, pythonpath=str(tmp_path))
    ref = _batches_read(tmp_path / "one.reads", 32)
    first, second = (_batches_read(tmp_path / f"a.npz.reads.{p}", 16) for p in (0, 1))
    assert min(len(ref), len(first), len(second)) >= 8  # read ahead: maybe more
    for whole, a, b in list(zip(ref, first, second))[:8]:
        assert not a & b and a | b == whole
    two, _ = _final_params(str(tmp_path / "two"))
    chex.assert_trees_all_close(two.params, one["state"].params, rtol=1e-5, atol=1e-6)


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
