"""Fault injection: crashes mid-save, corrupt checkpoints, NaNs, full or unwritable disks, locks, pickles.

SIGTERM (preemption) is proved in tests/test_preemption.py; bad-input errors in tests/test_cli.py.
"""

import errno
import glob
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from dlfx import config as config_lib, log, parallel, runner, stopping
from dlfx.checkpoint import Checkpointer
from dlfx.errors import CheckpointError, ConfigError, DataError, NonFiniteError, WorkdirError

from checks import assert_bit_identical, restore_newest

TINY = ["model.features=(8, 16)", "model.hidden_dim=32", "data.batch_size=64", "train.epochs=0",
        "train.steps=20", "train.log_every=5", "train.eval_every=0", "train.checkpoint_every=10",
        "optimizer.warmup_steps=2"]


def tiny(repo_root, *extra):
    return config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), TINY + list(extra))


def cli_args(*extra):
    return [f"--config.{o}" for o in TINY + list(extra)]


@pytest.fixture(scope="module")
def reference(repo_root, tmp_path_factory):
    """The uninterrupted tiny run: final state after 20 (and after 30) steps."""
    root = tmp_path_factory.mktemp("reference")
    return {steps: runner.train(tiny(repo_root, f"train.steps={steps}"), str(root / str(steps)))["state"]
            for steps in (20, 30)}


# --- 2. SIGKILL while an async checkpoint save is running -------------------------------------

def test_sigkill_during_save_resumes_from_previous_checkpoint(repo_root, tmp_path, reference):
    workdir = str(tmp_path / "run")
    command = ["train", "--config", "configs/digits_cnn.py", "--workdir", workdir, *cli_args("train.steps=30")]
    killed = subprocess.run([sys.executable, "tests/data/kill_during_save.py", *command], cwd=repo_root,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, DLFX_TEST_KILL_AT_STEP="20"))
    assert killed.returncode == -signal.SIGKILL
    assert os.path.exists(os.path.join(workdir, ".lock"))  # the dead process left its lock behind
    finished = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert "10" in finished
    resumed = subprocess.run([sys.executable, "-m", "dlfx", *command], cwd=repo_root, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_from = int(resumed.stderr.split("resumed from step ")[1].split()[0])
    assert resumed_from in (10, 20)  # 20 only if its background write had already committed
    assert "taking over stale lock" in resumed.stderr
    state, step = restore_newest(tiny(repo_root, "train.steps=30"), os.path.join(workdir, "checkpoints"))
    assert step == 30
    assert_bit_identical(state, reference[30])
    assert not os.path.exists(os.path.join(workdir, ".lock"))


# --- 3. Corrupt checkpoints ----------------------------------------------------------------------

def _corrupt(step_dir, how):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
    data_files = [f for f in files if os.sep + "d" + os.sep in f] or files
    if how == "truncate":
        for f in data_files:
            open(f, "wb").close()
    elif how == "delete":
        for f in data_files:
            os.remove(f)
    elif how == "empty":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's event-loop noise
@pytest.mark.parametrize("how", ["truncate", "delete", "empty"])
def test_corrupt_latest_checkpoint_falls_back_and_is_quarantined(repo_root, tmp_path, reference, how, caplog):
    config = tiny(repo_root)
    workdir = str(tmp_path / "run")
    runner.train(config, workdir)
    _corrupt(os.path.join(workdir, "checkpoints", "20"), how)
    with caplog.at_level("WARNING", logger="dlfx"):
        summary = runner.train(config, workdir)
    assert "checkpoints/20 is unreadable" in caplog.text and "moved unreadable checkpoint step 20" in caplog.text
    assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == 1  # kept, not deleted
    assert summary["step"] == 20
    state, step = restore_newest(config, os.path.join(workdir, "checkpoints"))  # step 20 saved again, reads back
    assert step == 20
    assert_bit_identical(state, reference[20])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_valid_checkpoint_is_a_clear_error_and_nothing_is_removed(repo_root, tmp_path):
    config = tiny(repo_root)
    workdir = str(tmp_path / "run")
    runner.train(config, workdir)
    for step in ("10", "20"):
        _corrupt(os.path.join(workdir, "checkpoints", step), "truncate")
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(CheckpointError, match=r"no valid checkpoint in .*checkpoints \(tried steps \[10, 20\]"):
        runner.train(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
    assert not os.path.exists(os.path.join(workdir, ".lock"))


# --- 4. NaN / Inf -----------------------------------------------------------------------------

DIVERGE = ["optimizer.name=sgd", "optimizer.learning_rate=1e30", "optimizer.schedule=constant",
           "optimizer.warmup_steps=0", "train.checkpoint_every=2", "train.log_every=1"]


def test_nan_policy_error_stops_without_saving_the_poisoned_state(repo_root, tmp_path):
    workdir = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "dlfx", "train", "--config", "configs/digits_cnn.py",
                             "--workdir", workdir, *cli_args(*DIVERGE)], cwd=repo_root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("dlfx: error:")]
    assert len(error) == 1 and "(train.nan_policy='error')" in error[0], result.stderr[-2000:]
    bad_step = int(error[0].split(" at step ")[1].split()[0])
    assert "non-finite loss" in error[0] or "non-finite gradient of " in error[0]
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert all(s < bad_step for s in saved)
    if saved:
        state, _ = restore_newest(tiny(repo_root, *DIVERGE), os.path.join(workdir, "checkpoints"))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_nan_policy_skip_drops_a_poisoned_batch_and_goes_on(repo_root, tmp_path, monkeypatch):
    place = parallel.shard_batch
    calls = {"train": 0}

    def poison_third_train_batch(batch, mesh, mode):
        if "mask" not in batch:  # train batches only
            calls["train"] += 1
            if calls["train"] == 3:
                batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
        return place(batch, mesh, mode)

    monkeypatch.setattr(parallel, "shard_batch", poison_third_train_batch)
    workdir = str(tmp_path / "run")
    summary = runner.train(tiny(repo_root, "train.nan_policy=skip", "train.log_every=1", "data.on_device=off"), workdir)
    assert summary["status"] == "finished" and summary["step"] == 20
    records = {r["step"]: r for r in log.read_metrics(workdir) if r["split"] == "train"}
    assert [s for s, r in records.items() if r["skipped_steps"]] == [3]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(summary["state"].params))
    assert np.isfinite(summary["eval"]["loss"])


def test_nan_policy_skip_stops_after_max_skipped_in_a_row(repo_root, tmp_path):
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row up to step \d+, .*train.max_skipped=3"):
        runner.train(tiny(repo_root, *DIVERGE, "train.nan_policy=skip", "train.max_skipped=3"), str(tmp_path / "r"))


# --- 5. Full or unwritable disk ---------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_at_save_is_surfaced_and_last_checkpoint_survives(repo_root, small_tmpfs):
    config = tiny(repo_root, "train.steps=10")
    workdir = os.path.join(small_tmpfs, "run")
    runner.train(config, workdir)
    filler = os.path.join(small_tmpfs, "filler")
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte ...
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, os.path.getsize(filler) - 32 * 1024)  # ... then leave room for logs, not checkpoints
    longer = tiny(repo_root, "train.steps=20")
    with pytest.raises(CheckpointError, match="No space left on device"):
        runner.train(longer, workdir, force=True)
    os.remove(os.path.join(small_tmpfs, "filler"))
    state, step = restore_newest(config, os.path.join(workdir, "checkpoints"))
    assert step == 10 and int(state.step) == 10


def test_unwritable_workdir_is_a_clear_error(repo_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot use workdir .*a_file/run"):
        runner.train(tiny(repo_root), str(blocker / "run"))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                             capture_output=True)
    if mounted.returncode == 0:  # a real read-only file system (chmod does not stop root)
        try:
            with pytest.raises(ConfigError, match="cannot use workdir|not writable"):
                runner.train(tiny(repo_root), str(read_only / "run"))
        finally:
            subprocess.run(["umount", "-l", str(read_only)], check=False)


# --- 6. Bad input leaves an existing run as it was (one-line errors: tests/test_cli.py) -------------

def test_failed_start_on_an_existing_run_changes_nothing(repo_root, tmp_path):
    workdir = tmp_path / "run"
    runner.train(tiny(repo_root, "train.steps=5"), str(workdir))
    snapshot = {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}
    for bad in (["data.batch_size=100"], ["model.name=resnet18", "data.name=text"], ["data.num_test=0"]):
        with pytest.raises((ConfigError, DataError)):
            runner.train(config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"),
                                         TINY + ["train.steps=5"] + (["data.name=synthetic"] if "data.num_test=0" in bad else []) + bad),
                         str(workdir), force=True)
    assert snapshot == {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}


# --- 7. One live run per workdir --------------------------------------------------------------

def test_live_lock_refuses_and_stale_lock_is_taken_over(repo_root, tmp_path):
    import socket

    workdir = tmp_path / "run"
    workdir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        with pytest.raises(ConfigError, match=f"in use by running process {sleeper.pid}"):
            runner.train(tiny(repo_root, "train.steps=5"), str(workdir))
        assert (workdir / ".lock").read_text().split()[1] == str(sleeper.pid)  # not stolen
        assert not (workdir / "config.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    summary = runner.train(tiny(repo_root, "train.steps=5"), str(workdir))  # the PID is dead now: stale
    assert summary["status"] == "finished" and not (workdir / ".lock").exists()


# --- 8. Nothing is ever unpickled ---------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def test_malicious_pickles_in_a_workdir_are_never_loaded(repo_root, tmp_path):
    marker = str(tmp_path / "PWNED")
    evil = pickle.dumps(_Payload(marker))
    config = tiny(repo_root, "train.steps=10")
    workdir = str(tmp_path / "run")
    runner.train(config, workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "10", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(evil)
    with open(os.path.join(workdir, "checkpoints", "model.pkl"), "wb") as f:
        f.write(evil)
    np.savez(str(tmp_path / "evil.npz"), weights=np.array([_Payload(marker)], dtype=object))
    for args in (["eval", "--workdir", workdir], ["inspect", workdir], ["inspect", str(tmp_path / "evil.npz")],
                 ["train", "--config", "configs/digits_cnn.py", "--workdir", workdir, *cli_args("train.steps=10")]):
        result = subprocess.run([sys.executable, "-m", "dlfx", *args], cwd=repo_root, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert not os.path.exists(marker), args


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's own
def test_a_dead_event_writer_ends_the_run_log_with_one_error_not_a_hang(tmp_path):
    """tensorboardX's writer thread dies on a write error (a full disk): `RunLogger.write` then raises a
    WorkdirError naming the events folder instead of blocking for good on the dead thread's queue."""
    logger = log.RunLogger(str(tmp_path), 100, 0)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger._events.file_writer.event_writer._ev_writer.write_event = disk_full
    outcome = []

    def write_many():
        for step in range(1, 60):  # 13 scalars a step: the library's queue of 10 filled on the first
            logger.write(step, "train", {"loss": 1.0, **{f"m{i}": 0.0 for i in range(12)}})
            if logger.failure is not None:
                outcome.append(str(logger.failure))
                return
            time.sleep(0.01)
        outcome.append("no error")

    writer = threading.Thread(target=write_many, daemon=True)
    writer.start()
    writer.join(30)
    assert not writer.is_alive(), "RunLogger.write blocked on a dead event-writer thread"
    assert outcome[0].startswith(f"cannot write TensorBoard events to {tmp_path / 'events'}")
    logger.close()  # still closes: the queue has room for the writer's shutdown signal


def test_a_run_file_error_keeps_the_steps_since_the_last_checkpoint(repo_root, tmp_path, monkeypatch, capsys):
    """A metrics write that fails mid-run (a full local disk; a gs:// run's mirror) saves the newest step first
    where the checkpoints can still be written, and the rerun resumes from it to the uninterrupted result."""
    config = tiny(repo_root, "train.checkpoint_every=0", "train.eval_every=5")
    record = log.RunLogger._record

    def full_from_step_15(self, entry):
        if entry["step"] >= 15:
            return WorkdirError("cannot write metrics.jsonl: No space left on device")
        return record(self, entry)

    monkeypatch.setattr(log.RunLogger, "_record", full_from_step_15)
    workdir = str(tmp_path / "run")
    with pytest.raises(WorkdirError, match="metrics.jsonl"):
        runner.train(config, workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = checkpointer.steps()
    kept = checkpointer.unwritten_logs(saved[-1])
    checkpointer.close()
    assert len(saved) == 1 and saved[0] >= 15  # the logged step 15 is read while the next call runs
    assert {(r["step"], r["split"]) for r in kept} >= {(15, "train"), (15, "eval")}
    assert f"saved step {saved[0]} and the {len(kept)} metric records" in capsys.readouterr().err
    monkeypatch.setattr(log.RunLogger, "_record", record)
    resumed = runner.train(config, workdir)
    whole = runner.train(config, str(tmp_path / "whole"))
    assert resumed["step"] == 20
    assert_bit_identical(resumed["state"].params, whole["state"].params)
    drop = ("wall_time", "steps_per_sec")  # the same history, line for line
    lines = [[{k: v for k, v in r.items() if k not in drop} for r in log.read_metrics(w)] for w in (workdir,
                                                                                                   whole["workdir"])]
    assert lines[0] == lines[1]


def test_a_failed_async_save_is_reported_with_its_own_step(tmp_path, monkeypatch):
    """An async save that failed in the background surfaces at the next save; the error names the failed
    step, not the one being saved."""
    ckpt = Checkpointer(str(tmp_path / "ck"))
    state = {"w": np.zeros(3, np.float32)}
    ckpt.save(4, state)

    def disk_full():
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device")

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", disk_full)
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* failed to save: No space left on device"):
        ckpt.save(8, state)
    monkeypatch.undo()
    ckpt.close()


def test_files_that_fail_to_write_leave_no_temporary_or_empty_file(tmp_path, monkeypatch):
    """A full disk mid-write: `write_json` keeps the old file and no `.tmp`; the lock leaves no empty `.lock`;
    the status, whose atomic write needs a new block, is written over the old one."""
    from dlfx import workdir as workdir_lib

    path = tmp_path / "config.json"
    workdir_lib.write_json(str(path), {"old": 1})
    workdir_lib.write_status(str(tmp_path), "running")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        workdir_lib.write_json(str(path), {"new": 2})
    workdir_lib.write_status(str(tmp_path), "failed", error="disk full")
    monkeypatch.undo()
    assert workdir_lib.read_json(str(path)) == {"old": 1}
    assert workdir_lib.read_status(str(tmp_path))["error"] == "disk full"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "status.json"]

    class FullFile:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            disk_full()

    monkeypatch.setattr(os, "fdopen", FullFile)
    with pytest.raises(ConfigError, match=r"cannot write the lock .*\.lock: No space left on device"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    assert not os.path.exists(tmp_path / ".lock")


def test_closing_after_a_failed_save_reports_one_error_and_closes_every_writer(tmp_path, monkeypatch, capsys):
    """Orbax's own `close` re-raises a failed save raw: the checkpointers turn it into the one CheckpointError;
    the runner closes the best checkpoint and the logs even when the first close fails, and an error already
    ending the run stays the one reported."""
    ckpt = Checkpointer(str(tmp_path / "ck"))
    ckpt.save(4, {"w": np.zeros(3, np.float32)})
    ckpt.wait()

    def raw(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.manager, "close", raw)
    with pytest.raises(CheckpointError, match="No space left on device"):
        ckpt.close()
    closed = []

    class Writer:
        def __init__(self, name, error=None):
            self.name, self.error = name, error

        def close(self):
            closed.append(self.name)
            if self.error:
                raise self.error

    first = CheckpointError("checkpoint step 30 failed to save")
    writers = Writer("checkpointer", first), Writer("best", CheckpointError("best failed")), Writer("logger")
    with pytest.raises(CheckpointError, match="step 30"):
        stopping.close_writers(*writers, failing=None)
    assert closed == ["checkpointer", "best", "logger"]
    assert "warning: best failed" in capsys.readouterr().err
    stopping.close_writers(*writers, failing=CheckpointError("checkpoint step 20 failed to save"))  # not raised
    assert "warning" not in capsys.readouterr().err  # the same failure, not a second line
    events_lost = Writer("logger", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(WorkdirError, match="could not flush the run logs .*: No space left on device"):
        stopping.close_writers(Writer("checkpointer"), None, events_lost, failing=None)  # not a finished run


def test_a_full_disk_under_the_event_writer_names_its_reason_without_a_thread_traceback(tmp_path):
    logger = log.RunLogger(str(tmp_path), 100, 0)
    worker = logger._events.file_writer.event_writer._worker

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger._events.file_writer.event_writer._ev_writer._py_recordio_writer.write = disk_full
    for step in range(1, 200):
        logger.write(step, "train", {"loss": 1.0})
        if logger.failure is not None:
            break
        time.sleep(0.01)
    assert re.match(r"cannot write TensorBoard events to .*events: No space left on device", str(logger.failure))
    assert logger.unwritten and logger.unwritten[0]["step"] == step  # kept for the checkpoint
    assert worker.is_alive()  # it kept the error for the training thread instead of dying with a traceback
    with pytest.raises(OSError, match="No space left on device"):  # and close says the events are incomplete
        logger.close()


def test_a_start_that_cannot_write_its_status_or_checkpoint_owner_fails_cleanly(repo_root, tmp_path, monkeypatch):
    """A full disk at start: the `running` status is part of the start (a run without any status would list as
    `unknown`), so the half-made workdir is removed; the checkpoint folder's owner file is named when it cannot
    be written, and leaves no `.tmp`."""
    from dlfx import workdir as workdir_lib

    def status_disk_full(*args, strict=False, **kwargs):
        if strict:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "write_status", status_disk_full)
    with pytest.raises(ConfigError, match="cannot use workdir .*: No space left on device"):
        runner.train(tiny(repo_root, "train.steps=5"), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    monkeypatch.setattr(runner, "write_status", workdir_lib.write_status)

    from etils import epath

    def owner_disk_full(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(epath.Path(str(tmp_path))), "replace", owner_disk_full)
    ck = tmp_path / "ck"
    with pytest.raises(CheckpointError, match=f"cannot write {ck}/dlfx_run.json: No space left on device"):
        runner.train(tiny(repo_root, "train.steps=5", f"train.checkpoint_dir={ck}"), str(tmp_path / "run2"))
    assert not os.path.exists(ck / "dlfx_run.json.tmp")


def test_plots_a_full_disk_kept_from_being_written_are_made_by_the_rerun(repo_root, tmp_path, monkeypatch):
    from dlfx import plot

    workdir = str(tmp_path / "run")
    config = tiny(repo_root, "train.steps=5")
    save_figure = plot.save_figure

    def disk_full(*args):
        raise ConfigError("cannot write figure: No space left on device")

    monkeypatch.setattr(plot, "save_figure", disk_full)
    assert runner.train(config, workdir)["status"] == "finished"
    plots = os.path.join(workdir, "plots")
    trained = runner.read_status(workdir)
    assert trained["plots"] == "failed" and not (os.path.exists(plots) and os.listdir(plots))
    monkeypatch.setattr(plot, "save_figure", save_figure)
    runner.train(config, workdir)
    again = runner.read_status(workdir)
    assert "curves.png" in os.listdir(os.path.join(workdir, "plots")) and "plots" not in again
    assert (again["wall_time"], again["steps_per_sec"]) == (trained["wall_time"], trained["steps_per_sec"])


def test_the_command_line_keeps_a_sigterm_from_before_the_run_starts(repo_root, tmp_path, monkeypatch, capsys):
    """`dlfx train` takes SIGTERM from its first moment (JAX's import takes ~1 s): one that lands before the
    runner starts ends the run as preempted with exit 0, nothing trained, the same command then resumes."""
    from dlfx import cli

    monkeypatch.setattr(parallel, "enable_compilation_cache", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    workdir = str(tmp_path / "run")
    args = ["train", "--config", os.path.join(repo_root, "configs/digits_cnn.py"), "--workdir", workdir,
            *cli_args("train.steps=5")]
    assert cli.main(args) == 0
    assert "preempted" in capsys.readouterr().err
    assert runner.read_status(workdir)["status"] == "preempted"
    monkeypatch.undo()
    assert cli.main(args) == 0 and runner.read_status(workdir)["status"] == "finished"


@pytest.mark.parametrize("per_call", [1, 5])
def test_a_run_file_error_between_log_points_loses_no_record(repo_root, tmp_path, monkeypatch, per_call):
    """Plain log points are read one call late: the run file fails when the step-5 window is read (at step 6, or
    at 10 with 5 steps per call). The run goes on to the next log point (10), reads its window now and saves step 10 with every unwritten record:
    the rerun's history equals an uninterrupted run's, line for line (no partial window at step 6)."""
    config = tiny(repo_root, "train.checkpoint_every=0", "train.eval_every=0", f"train.steps_per_call={per_call}")
    record = log.RunLogger._record

    def full_from_step_5(self, entry):
        return WorkdirError("cannot write metrics.jsonl: No space left on device") if entry["step"] >= 5 \
            else record(self, entry)

    monkeypatch.setattr(log.RunLogger, "_record", full_from_step_5)
    workdir = str(tmp_path / "run")
    with pytest.raises(WorkdirError):
        runner.train(config, workdir)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [10]
    monkeypatch.setattr(log.RunLogger, "_record", record)
    runner.train(config, workdir)
    assert _history(workdir) == _history(runner.train(config, str(tmp_path / "whole"))["workdir"])


def _history(workdir: str) -> list[dict]:
    """A run's metric records without their timings (equal for equal runs)."""
    return [{k: v for k, v in r.items() if k not in ("wall_time", "steps_per_sec")} for r in log.read_metrics(workdir)]


@pytest.mark.parametrize("disk_full", [False, True])
def test_sigterm_while_the_reader_holds_the_next_batch_back_loses_no_record(repo_root, tmp_path, monkeypatch,
                                                                            disk_full):
    """The step-5 log point is read one call late; a SIGTERM while the reader stalls on step 6's batch ends the run
    before that call: the step-5 line is written before the save (or, on a full disk, saved with it), and the
    rerun's history equals an uninterrupted run's."""
    from dlfx import data

    config = tiny(repo_root, "train.steps=10", "train.steps_per_call=1")
    real_next, calls, record = data.DevicePrefetcher.__next__, [], log.RunLogger._record

    def stalls_at_step_6(self):
        calls.append(1)
        if len(calls) == 6:
            raise data.Interrupted("interrupted while waiting for the next batch")
        return real_next(self)

    def full_from_step_5(self, entry):
        return WorkdirError("cannot write metrics.jsonl: No space left on device") if entry["step"] >= 5 \
            else record(self, entry)

    monkeypatch.setattr(data.DevicePrefetcher, "__next__", stalls_at_step_6)
    workdir = str(tmp_path / "run")
    if disk_full:
        monkeypatch.setattr(log.RunLogger, "_record", full_from_step_5)
        with pytest.raises(WorkdirError, match="No space left"):
            runner.train(config, workdir)
    else:
        assert runner.train(config, workdir)["status"] == "preempted"
    monkeypatch.undo()
    assert runner.train(config, workdir)["status"] == "finished"
    assert _history(workdir) == _history(runner.train(config, str(tmp_path / "whole"))["workdir"])