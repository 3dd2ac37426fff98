"""Hardening: shared checkpoint folders, failed saves, torn metrics, restarted-PID locks, SIGTERM in every
phase of a run, reruns of finished runs (tests for the README's Guarantees table)."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from dlfx import cli, config as config_lib, log, runner, workdir as workdir_lib
from dlfx.errors import CheckpointError

from checks import assert_bit_identical, restore_newest

TINY = ["model.features=(8, 16)", "model.hidden_dim=32", "data.batch_size=64", "train.epochs=0",
        "train.steps=20", "train.log_every=5", "train.eval_every=0", "train.checkpoint_every=10",
        "optimizer.warmup_steps=2", "parallel.num_devices=1"]  # one device: these tests are about files


def tiny(repo_root, *extra):
    return config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), TINY + list(extra))


def dlfx(repo_root, *args, script=None, env=None, timeout=300):
    prefix = [sys.executable, os.path.join(repo_root, "tests", "data", script)] if script else \
        [sys.executable, "-m", "dlfx"]
    return subprocess.run([*prefix, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def train_args(workdir, *extra):
    return ["train", "--config", "configs/digits_cnn.py", "--workdir", str(workdir),
            *[f"--config.{o}" for o in TINY + list(extra)]]


@pytest.fixture(scope="module")
def reference(repo_root, tmp_path_factory):
    """The uninterrupted tiny run's final state."""
    return runner.train(tiny(repo_root), str(tmp_path_factory.mktemp("ref") / "run"))["state"]


# --- 1. A checkpoint folder belongs to one run ---------------------------------------------------

def test_shared_checkpoint_folder_is_refused_and_nothing_is_deleted(repo_root, tmp_path):
    runner.train(tiny(repo_root, "train.steps=10"), str(tmp_path / "a"))
    shared = tmp_path / "a" / "checkpoints"
    snapshot = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    # another grid point of a sweep pointed at run a's checkpoints, and the same config from another workdir
    for other, extra in (("b", ["optimizer.learning_rate=0.01"]), ("c", [])):
        with pytest.raises(CheckpointError, match="holds checkpoints of another run"):
            runner.train(tiny(repo_root, "train.steps=10", f"train.checkpoint_dir={shared}", *extra),
                         str(tmp_path / other))
        assert not (tmp_path / other).exists()
    assert snapshot == {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    # --force takes the folder over deliberately; then a's result is no longer in it, and eval says so
    forced = runner.train(tiny(repo_root, f"train.checkpoint_dir={shared}", "optimizer.learning_rate=0.01"),
                          str(tmp_path / "b"), force=True)
    assert forced["step"] == 20
    with pytest.raises(CheckpointError, match="holds checkpoints of another run"):
        runner.evaluate_workdir(str(tmp_path / "a"))


def test_checkpoint_folder_survives_a_lost_workdir_with_the_same_config(repo_root, tmp_path):
    """A TPU VM's workdir goes with the VM; the relaunch (same config) resumes from the bucket's checkpoints."""
    shared = tmp_path / "bucket"
    runner.train(tiny(repo_root, f"train.checkpoint_dir={shared}", "train.steps=10"), str(tmp_path / "vm1"))
    import shutil

    shutil.rmtree(tmp_path / "vm1")
    summary = runner.train(tiny(repo_root, f"train.checkpoint_dir={shared}", "train.steps=10"), str(tmp_path / "vm2"))
    assert summary["status"] == "finished" and summary["step_traces"] == 0  # nothing left to train


# --- 2. A checkpoint save that fails ends the process --------------------------------------------

def test_checkpoint_folder_that_is_a_file_is_refused_before_training(repo_root, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = dlfx(repo_root, *train_args(tmp_path / "run", f"train.checkpoint_dir={tmp_path / 'afile'}"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"dlfx: error: checkpoint folder {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder"
    assert not (tmp_path / "run").exists()


def test_failed_save_mid_run_exits_within_seconds(repo_root, tmp_path):
    start = time.time()
    result = dlfx(repo_root, *train_args(tmp_path / "run"), script="fail_save.py",
                  env={"DLFX_TEST_FAIL_AT_STEP": "20"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "dlfx: error: checkpoint step 20 in " in result.stderr and "Not a directory" in result.stderr
    assert time.time() - start < 90  # Orbax's own threads would wait for ~30 minutes
    assert workdir_lib.read_status(str(tmp_path / "run"))["status"] == "failed"
    assert not (tmp_path / "run" / ".lock").exists()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints.moved")) == ["10", "dlfx_run.json"]


# --- 3. A torn last line of metrics.jsonl ----------------------------------------------------------

def test_torn_metrics_line_is_dropped_on_resume_and_skipped_when_read(repo_root, tmp_path, reference, capsys):
    workdir = tmp_path / "run"
    runner.train(tiny(repo_root), str(workdir))
    import shutil

    shutil.rmtree(workdir / "checkpoints" / "20")  # as if killed after step 10's checkpoint, mid-write of a line
    workdir_lib.write_status(str(workdir), "running", pid=-1)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 160, "split": "tr')
    assert [r["step"] for r in log.read_metrics(str(workdir))][-1] == 20
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert "failed" in capsys.readouterr().out  # killed
    assert cli.main(["plot", str(workdir), "-o", str(tmp_path / "c.png")]) == 0
    summary = runner.train(tiny(repo_root), str(workdir))
    assert summary["status"] == "finished" and summary["step"] == 20 and summary["step_traces"] > 0
    assert_bit_identical(reference, summary["state"])
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 20 for line in lines)


def test_one_damaged_run_does_not_hide_the_others(repo_root, tmp_path, capsys):
    runner.train(tiny(repo_root, "train.steps=5"), str(tmp_path / "good"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_bytes(b"\x00\xff binary")
    capsys.readouterr()
    assert cli.main(["runs", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "good" in out and "damaged" in out
    assert "bad/config.json is not a text file" in err


# --- 4. A lock that names this process's own PID --------------------------------------------------

def test_lock_with_own_pid_from_an_earlier_life_is_taken_over(repo_root, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    script = f"echo \"$(hostname) $$\" > {workdir}/.lock; exec {sys.executable} -m dlfx " + shlex.join(
        train_args(workdir, "train.steps=5"))
    result = subprocess.run(["bash", "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "taking over stale lock" in result.stderr and not (workdir / ".lock").exists()


def test_lock_of_a_reused_pid_or_another_boot_is_stale(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".lock"
        host = socket.gethostname()
        ticks = workdir_lib._start_ticks(sleeper.pid)
        lock.write_text(f"{host} {sleeper.pid} {workdir_lib._boot_id()} {ticks}\n")
        assert workdir_lib.read_lock(str(lock))[2]  # live: the process that wrote it
        lock.write_text(f"{host} {sleeper.pid} {workdir_lib._boot_id()} {int(ticks) - 1}\n")
        assert not workdir_lib.read_lock(str(lock))[2]  # the PID now belongs to a newer process
        lock.write_text(f"{host} {sleeper.pid} another-boot {ticks}\n")
        assert not workdir_lib.read_lock(str(lock))[2]
        lock.write_text(f"{host} {sleeper.pid}\n")  # a lock from before start times were recorded
        assert workdir_lib.read_lock(str(lock))[2]
    finally:
        sleeper.kill()
        sleeper.wait()


# --- 5. SIGTERM in every phase of a run ------------------------------------------------------------

@pytest.mark.parametrize("phase,status,saved", [("startup", "preempted", []), ("final_save", "preempted", ["10", "20"]),
                                                ("final_eval", "finished", ["10", "20"]),
                                                ("plots", "finished", ["10", "20"])])
def test_sigterm_outside_the_step_loop_saves_and_exits_0(repo_root, tmp_path, reference, phase, status, saved):
    workdir = tmp_path / "run"
    result = dlfx(repo_root, phase, *train_args(workdir), script="sigterm_at.py", env={"DLFX_TEST_STEPS": "20"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert workdir_lib.read_status(str(workdir))["status"] == status
    assert sorted(p for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == saved
    assert not (workdir / ".lock").exists()
    if status == "preempted":
        assert "rerun the same command to resume" in result.stderr
        resumed = runner.train(tiny(repo_root), str(workdir))
        assert resumed["status"] == "finished" and resumed["step"] == 20
    evals = [r for r in log.read_metrics(str(workdir)) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20]
    assert (workdir / "plots" / "curves.png").exists()
    state, step = restore_newest(tiny(repo_root), workdir / "checkpoints")
    assert step == 20
    assert_bit_identical(reference, state)


def test_real_sigterm_during_startup_exits_0_and_leaves_a_resumable_run(repo_root, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "dlfx", *train_args(workdir)], cwd=repo_root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not workdir.exists():
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert workdir_lib.read_status(str(workdir))["status"] in ("preempted", "finished")
    assert not (workdir / ".lock").exists()


# --- 6. Rerunning a finished run -------------------------------------------------------------------

def test_rerun_of_a_finished_run_is_a_no_op(repo_root, tmp_path):
    workdir = tmp_path / "run"
    first = runner.train(tiny(repo_root, "train.steps=10"), str(workdir))
    files = {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}
    result = dlfx(repo_root, *train_args(workdir, "train.steps=10"))
    assert result.returncode == 0 and "already finished all 10 steps" in result.stderr
    assert "finished: step 10/10" in result.stdout
    again = runner.train(tiny(repo_root, "train.steps=10"), str(workdir))
    assert again["step_traces"] == 0 and again["eval"] == first["eval"]
    assert files == {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}
    assert [r["step"] for r in log.read_metrics(str(workdir)) if r["split"] == "eval"] == [10]
    assert workdir_lib.read_status(str(workdir))["wall_time"] == pytest.approx(first["wall_time"])
