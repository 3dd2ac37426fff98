"""Workdirs on gs://: every workdir file written and read back through a non-local filesystem.

gs:// is served here by an fsspec filesystem that keeps its objects under a temporary folder and, like GCS,
refuses appends; dlfx reaches it only through etils.epath, as it would reach GCS (offline, no credentials).
Checkpoints go to a local `train.checkpoint_dir`: on real GCS Orbax writes them through TensorStore, which
this fake cannot serve.
"""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import chex
import pytest

import dlfx
from dlfx import checkpoint, cli, config as config_lib, inspection, log, remote, runner, workdir
from dlfx.errors import CheckpointError, ConfigError, WorkdirError


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The folder that holds the fake bucket's objects; gs://bucket/x is `<folder>/bucket/x`."""
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=True, **kwargs):
            super().__init__(auto_mkdir=True)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            if path.startswith(str(root)):  # fsspec strips paths more than once
                return path.rstrip("/")
            for prefix in ("gs://", "gcs://"):
                path = path[len(prefix):] if path.startswith(prefix) else path
            return str(root / path.lstrip("/")).rstrip("/")

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError("GCS objects cannot be appended to")
            return super()._open(path, mode, **kwargs)

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, FakeGCS, clobber=True)
    monkeypatch.setattr(remote, "LOCK_SETTLE_SECONDS", 0.0)  # one writer at a time here (see the race test)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()


def _config(repo_root, tmp_path, *extra):
    return config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"), [
        "model.hidden_dims=(16,)", "train.epochs=0", "train.steps=8", "train.log_every=2", "train.eval_every=4",
        "train.checkpoint_every=4", "optimizer.warmup_steps=1", "parallel.num_devices=1", "train.steps_per_call=1",
        f"train.checkpoint_dir={tmp_path / 'ckpt'}", *extra])


def test_a_gs_workdir_holds_every_file_and_reads_back(repo_root, tmp_path, gcs, capsys):
    url = "gs://bucket/runs/a"
    summary = runner.train(_config(repo_root, tmp_path), url)
    assert summary["status"] == "finished" and summary["workdir"] == url
    run = gcs / "bucket" / "runs" / "a"
    names = sorted(os.listdir(run))
    assert names == ["config.json", "data.json", "events", "imports.json", "metrics.jsonl", "plots",
                     "status.json"] or names == ["config.json", "data.json", "events", "metrics.jsonl", "plots",
                                                 "status.json"]  # no lock left behind
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert os.listdir(run / "events") and "curves.png" in os.listdir(run / "plots")
    assert [r["step"] for r in log.read_metrics(str(run)) if r["split"] == "eval"] == [4, 8]

    # every reader takes the URL
    evaluated = runner.evaluate_workdir(url)
    assert evaluated["step"] == 8 and evaluated["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-6)
    loaded = dlfx.load_run(url)
    assert loaded.step == 8 and loaded.workdir == url
    chex.assert_trees_all_close(loaded.variables["params"], summary["state"].params)
    capsys.readouterr()
    assert cli.main(["runs", "gs://bucket/runs", "--csv"]) == 0
    table = capsys.readouterr().out
    assert "gs://bucket/runs/a" in table and "finished" in table
    assert cli.main(["plot", url, "-o", "gs://bucket/figures/ab.png"]) == 0
    assert capsys.readouterr().out.strip() == "gs://bucket/figures/ab.png"
    assert (gcs / "bucket" / "figures" / "ab.png").stat().st_size > 1000
    assert cli.main(["interpret", "--workdir", url, "--index", "0..1", "--method", "saliency", "-o", "gs://bucket/figures/"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == "gs://bucket/figures/interpret.png"
    assert (gcs / "bucket" / "figures" / "interpret.png").stat().st_size > 1000
    assert not os.path.exists("gs:")  # nothing written under a local folder named after the scheme
    with pytest.raises(CheckpointError, match="gs://bucket/runs/a: inspect reads a local path"):
        inspection.read_shapes(url)

    # a rerun resumes from the checkpoints and keeps one log line per step
    shutil.rmtree(tmp_path / "ckpt" / "8")  # as if killed before the last save
    again = runner.train(_config(repo_root, tmp_path), url)
    assert again["status"] == "finished"
    steps = [r["step"] for r in log.read_metrics(str(run)) if r["split"] == "train"]
    assert steps == [2, 4, 6, 8]
    chex.assert_trees_all_close(again["state"].params, summary["state"].params, rtol=1e-6, atol=1e-7)
    # another config is refused naming the URL, not the temporary local copy it was checked in
    with pytest.raises(ConfigError, match=r"^workdir gs://bucket/runs/a holds a run with a different config"):
        runner.train(_config(repo_root, tmp_path, "optimizer.learning_rate=0.5"), url)


def test_a_live_remote_lock_is_refused_a_stale_one_taken_over_and_a_failed_start_leaves_nothing(
        repo_root, tmp_path, gcs, monkeypatch, capsys):
    folder = gcs / "bucket" / "b"
    folder.mkdir(parents=True)
    (folder / ".lock").write_text(json.dumps({"host": "tpu-vm-7", "pid": 12, "time": time.time() - 5}))
    with pytest.raises(ConfigError, match=r"gs://bucket/b is in use by process 12 on host tpu-vm-7 .its lock"):
        runner.train(_config(repo_root, tmp_path), "gs://bucket/b")
    (folder / ".lock").write_text(json.dumps({"host": "tpu-vm-7", "pid": 12, "time": time.time() - 3600}))
    assert runner.train(_config(repo_root, tmp_path, "train.steps=2", "train.eval_every=0",
                                "train.checkpoint_every=0"), "gs://bucket/b")["status"] == "finished"
    assert not (folder / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a fresh lock of a process of this machine that is gone: taken over at once
    (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "boot": workdir._boot_id(),
                                              "pid": dead.pid, "time": time.time() - 5}))
    assert runner.train(_config(repo_root, tmp_path, "train.steps=2", "train.eval_every=0",
                                "train.checkpoint_every=0"), "gs://bucket/b")["status"] == "finished"
    assert "which is no longer running" in capsys.readouterr().err

    with pytest.raises(CheckpointError, match=r"checkpoint folder gs://bucket/c/checkpoints: Orbax needs "
                                              r"google-cloud-storage .* or set train.checkpoint_dir"):
        monkeypatch.setattr(checkpoint, "_importable", lambda module: False)
        runner.train(_config(repo_root, tmp_path, "train.checkpoint_dir="), "gs://bucket/c")
    assert not (gcs / "bucket" / "c").exists() or not os.listdir(gcs / "bucket" / "c")

    with pytest.raises(ConfigError):  # bad input: refused before anything is written remote
        runner.train(_config(repo_root, tmp_path, "data.batch_size=0"), "gs://bucket/new")
    assert not (gcs / "bucket" / "new").exists() or not os.listdir(gcs / "bucket" / "new")
    with pytest.raises(ConfigError, match="no such run folder: gs://bucket/none"):
        runner.evaluate_workdir("gs://bucket/none")


def test_a_mirror_pushes_what_changed_and_names_its_origin(tmp_path, gcs):
    mirror = remote.Mirror("gs://bucket/m", writer=True)
    try:
        assert remote.origin(mirror.local) == "gs://bucket/m" and remote.origin("runs/x") == os.path.abspath("runs/x")
        os.makedirs(mirror.local)
        with open(os.path.join(mirror.local, "metrics.jsonl"), "w") as f:
            f.write('{"step": 1}\n')
        mirror.push()
        assert not (gcs / "bucket" / "m" / "metrics.jsonl").exists()  # no status.json: the run has not started
        with open(os.path.join(mirror.local, "status.json"), "w") as f:
            f.write('{"status": "running"}')
        mirror.push()
        assert (gcs / "bucket" / "m" / "metrics.jsonl").read_text() == '{"step": 1}\n'
        with open(os.path.join(mirror.local, "metrics.jsonl"), "a") as f:  # appended locally, rewritten remote
            f.write('{"step": 2}\n')
        os.remove(os.path.join(mirror.local, "status.json"))
        with open(os.path.join(mirror.local, "status.json"), "w") as f:
            f.write('{"status": "finished"}')
    finally:
        mirror.close()
    assert (gcs / "bucket" / "m" / "metrics.jsonl").read_text().count("step") == 2
    assert not (gcs / "bucket" / "m" / ".lock").exists() and not os.path.exists(mirror.root)


def test_a_mirror_refuses_a_url_without_a_bucket_and_names_a_local_folder_it_cannot_write(tmp_path, gcs,
                                                                                            monkeypatch):
    for url in ("gs://", "gs:///runs/x"):  # the fake (and GCS) would take these for the filesystem's root
        with pytest.raises(ConfigError, match="names no bucket: give a folder such as gs://BUCKET/runs/NAME"):
            remote.Mirror(url, writer=True)
    assert not list(gcs.iterdir())
    full = tmp_path / "full"
    full.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(full))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (gcs / "bucket" / "p").mkdir(parents=True)
    (gcs / "bucket" / "p" / "metrics.jsonl").write_text('{"step": 1}\n')
    mirror = remote.Mirror("gs://bucket/p")  # a run log that fills the local copy's disk names the run's URL
    try:
        message = str(log._cannot_write(mirror.local, "metrics.jsonl", OSError(errno.ENOSPC, "No space left")))
    finally:
        mirror.close()
    assert message.startswith("cannot write gs://bucket/p/metrics.jsonl: No space left (in the local copy under ")
    assert "TMPDIR" in message
    with monkeypatch.context() as patched:  # the pull's local copy of a file: not blamed on the bucket
        patched.setattr(remote.os, "makedirs", no_space)
        with pytest.raises(WorkdirError, match=re.escape(f"cannot keep the local copy of gs://bucket/p in {full}")):
            remote.Mirror("gs://bucket/p")
    monkeypatch.setattr(remote.Mirror, "_write_owner", no_space)  # the local copy's bookkeeping file
    with pytest.raises(WorkdirError, match=re.escape(f"cannot keep the local copy of gs://bucket/n in {full}") +
                       ".*No space left on device"):
        remote.Mirror("gs://bucket/n", writer=True)
    assert not list(full.iterdir()) and not (gcs / "bucket" / "n").exists()


def test_a_dead_writers_mirror_is_pushed_by_the_run_that_takes_over_and_a_dead_readers_is_deleted(
        tmp_path, gcs, monkeypatch, capsys):
    monkeypatch.setattr(remote.tempfile, "tempdir", str(tmp_path / "tmp"))  # only this test's mirrors
    os.makedirs(tmp_path / "tmp")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def as_dead(mirror, start="-"):
        """Leave `mirror` as a SIGKILLed process leaves it: no last push, its owner (and lock) a dead pid."""
        if mirror._thread is not None:
            mirror._stop.set()
            mirror._wake.set()
            mirror._thread.join()
        owner_file = os.path.join(mirror.root, remote.OWNER)
        with open(owner_file) as f:
            owner = dict(json.load(f), pid=dead.pid, start=start)
        with open(owner_file, "w") as f:
            json.dump(owner, f)
        if mirror.writer:
            (gcs / "bucket" / "k" / ".lock").write_text(json.dumps(dict(owner, time=time.time())))

    writer = remote.Mirror("gs://bucket/k", writer=True)
    os.makedirs(writer.local)
    for name, text in [("status.json", '{"status": "running"}'), ("metrics.jsonl", '{"step": 1}\n')]:
        with open(os.path.join(writer.local, name), "w") as f:
            f.write(text)
    writer.push()
    with open(os.path.join(writer.local, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2}\n')  # logged, not yet pushed when the process died
    as_dead(writer, start="200")
    earlier = str(tmp_path / "tmp" / "dlfx-mirror-earlier")  # the same pid in an earlier container: not this one
    shutil.copytree(writer.root, earlier)
    with open(os.path.join(earlier, remote.OWNER), "w") as f:
        json.dump({"host": socket.gethostname(), "boot": workdir._boot_id(), "pid": dead.pid, "start": "100",
                   "writer": True, "pulled": True}, f)
    half = str(tmp_path / "tmp" / "dlfx-mirror-half")  # killed during its pull: files maybe half-written
    shutil.copytree(writer.root, half)
    with open(os.path.join(half, remote.OWNER), "w") as f:
        json.dump({"host": socket.gethostname(), "boot": workdir._boot_id(), "pid": dead.pid, "start": "200",
                   "writer": True, "pulled": False}, f)
    open(os.path.join(half, "k", "metrics.jsonl"), "w").close()
    reader = remote.Mirror("gs://bucket/k")
    assert not os.path.exists(half)  # swept: it has nothing of its own
    as_dead(reader)
    alive = remote.Mirror("gs://bucket/k")  # a live reader's mirror stays
    assert os.path.isdir(writer.root) and not os.path.exists(reader.root)  # the next mirror sweeps dead readers'

    real_write = type(remote.epath.Path("gs://bucket/k")).write_bytes
    monkeypatch.setattr(type(remote.epath.Path("gs://bucket/k")), "write_bytes",
                        lambda self, data: (_ for _ in ()).throw(OSError("bucket unreachable")))
    with pytest.raises(ConfigError, match=f"cannot copy the files that process {dead.pid} left in .* unreachable"):
        remote.Mirror("gs://bucket/k", writer=True)
    assert json.loads((gcs / "bucket" / "k" / ".lock").read_text())["pid"] == dead.pid  # put back: retried
    monkeypatch.setattr(type(remote.epath.Path("gs://bucket/k")), "write_bytes", real_write)
    capsys.readouterr()
    taker = remote.Mirror("gs://bucket/k", writer=True)
    try:
        err = capsys.readouterr().err
        assert "which is no longer running" in err and f"what process {dead.pid} had not pushed" in err
        assert f"{earlier} holds files of an earlier run in gs://bucket/k" in err  # named, kept, not pushed
        assert (gcs / "bucket" / "k" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
        with open(os.path.join(taker.local, "metrics.jsonl")) as f:
            assert f.read().count("step") == 2  # pulled after the dead writer's files were pushed
        assert not os.path.exists(writer.root) and os.path.isdir(alive.root) and os.path.isdir(earlier)
    finally:
        taker.close()
        alive.close()
    assert os.listdir(tmp_path / "tmp") == ["dlfx-mirror-earlier"]


def test_urls_dlfx_cannot_reach_are_one_line_errors_and_one_folder_has_one_spelling(repo_root, tmp_path, gcs,
                                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for url, message in [("GS://bucket/x", "not GS://"), ("gcs://bucket/x", "not gcs://"), ("file:///x", "not file://"),
                         ("gs:/x", "looks like a mistyped URL: write gs://"), ("./gs:/x", "mistyped URL"),
                         ("gs:x", "mistyped URL"), ("file:/x", "mistyped URL: give a local folder as an absolute"),
                         ("gs://", "names no bucket")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            runner.train(_config(repo_root, tmp_path, "train.steps=2"), url)
        assert cli.main(["runs", url]) == 2 and message in capsys.readouterr().err
    assert not any(remote.is_remote(path) for path in ("hf:x", "file:x", "GS:x", "https_runs", "/abs/gs:/x"))
    assert cli.main(["plot", "gs://bucket/none", "-o", "gs://"]) == 2
    assert not os.path.exists(tmp_path / "gs:") and not list(gcs.iterdir())

    config = _config(repo_root, tmp_path, "train.steps=2", "train.eval_every=0", "train.checkpoint_every=0")
    assert runner.train(config, "gs://bucket//runs/a/")["status"] == "finished"
    assert sorted(os.listdir(gcs / "bucket" / "runs" / "a"))[:2] == ["config.json", "data.json"]
    again = runner.train(config, "gs://bucket/runs/a")  # the same folder: finished, not "another run's checkpoints"
    assert again["status"] == "finished" and again["step"] == 2
    # a figure named without an extension, or an existing folder, gets the name the local path would
    assert cli.main(["plot", "gs://bucket/runs/a", "-o", "gs://bucket/figs/noext"]) == 0
    assert capsys.readouterr().out.strip() == "gs://bucket/figs/noext.png"
    assert cli.main(["plot", "gs://bucket/runs/a", "-o", "gs://bucket/runs/a"]) == 0
    assert capsys.readouterr().out.strip() == "gs://bucket/runs/a/curves.png"
    assert (gcs / "bucket" / "figs" / "noext.png").is_file() and (gcs / "bucket" / "runs" / "a" / "curves.png").is_file()
    # a damaged file is named by its URL, not by the temporary copy it was read in
    (gcs / "bucket" / "runs" / "a" / "metrics.jsonl").write_bytes(b"\x00\xff" * 8)
    assert cli.main(["plot", "gs://bucket/runs/a"]) == 2
    err = capsys.readouterr().err
    assert "gs://bucket/runs/a/metrics.jsonl" in err and "dlfx-mirror-" not in err


def test_a_remote_lock_is_read_by_readers_and_a_lost_race_for_it_steps_back(tmp_path, gcs, monkeypatch, capsys):
    folder = gcs / "bucket" / "live"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "running", "step": 3, "total_steps": 9}))
    for stamp, status in [(time.time() - 5, "running"), (time.time() - 3600, "failed"), ("abc", "failed")]:
        (folder / ".lock").write_text(json.dumps({"host": "tpu-vm-7", "pid": 12, "time": stamp}))
        with remote.readable("gs://bucket/live") as local:  # another host's run: its lock is refreshed
            assert workdir.read_status(local)["status"] == status
    # a lock whose time is not a number is stale: taken over with a warning, not a traceback
    remote.Mirror("gs://bucket/live", writer=True).close()
    assert "taking over the lock" in capsys.readouterr().err

    # two runs that found the lock free at once: the later write wins, the other reads it back and steps back
    other = {"host": "tpu-vm-9", "pid": 77, "time": time.time(), "token": "theirs"}
    monkeypatch.setattr(remote, "LOCK_SETTLE_SECONDS", 0.01)
    real_sleep = time.sleep

    def other_writes_meanwhile(seconds):
        (gcs / "bucket" / "race" / ".lock").write_text(json.dumps(other))
        real_sleep(seconds)

    monkeypatch.setattr(remote.time, "sleep", other_writes_meanwhile)
    with pytest.raises(ConfigError, match="gs://bucket/race is in use by process 77 on host tpu-vm-9"):
        remote.Mirror("gs://bucket/race", writer=True)
    assert json.loads((gcs / "bucket" / "race" / ".lock").read_text()) == other  # theirs, left alone


def test_the_logs_reach_the_bucket_before_each_checkpoint_and_files_deleted_there_come_back(
        repo_root, tmp_path, gcs, monkeypatch):
    """A resume starts at the newest checkpoint and never logs the steps before it again: a machine lost just
    after a save (the last one too) must not take metric lines that were only in its local copy."""
    run = gcs / "bucket" / "s"
    save, seen = checkpoint.Checkpointer.save, {}

    def save_and_look(self, step, *args, **kwargs):
        seen[step] = [r["step"] for r in log.read_metrics(str(run)) if r["split"] == "train"]
        (run / "config.json").unlink(missing_ok=True)  # deleted in the bucket while the run writes
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_and_look)
    monkeypatch.setattr(remote, "PUSH_SECONDS", 3600.0)  # no timed push: only the ones before saves
    runner.train(_config(repo_root, tmp_path), "gs://bucket/s")
    assert seen == {4: [2, 4], 8: [2, 4, 6, 8]}
    assert json.loads((run / "config.json").read_text())  # pushed again at the end


def test_a_run_whose_lock_another_run_took_over_stops_writing_there(repo_root, tmp_path, gcs, monkeypatch):
    """A stalled host's lock goes stale and another run takes it: at its next push (before a checkpoint) the first
    run stops with one error, writes nothing more remote, and keeps its unsent files locally."""
    save = checkpoint.Checkpointer.save

    def taken_over_after_the_first_save(self, step, *args, **kwargs):
        if step == 4:
            (gcs / "bucket" / "t" / ".lock").write_text(json.dumps(
                {"host": "tpu-vm-3", "pid": 44, "time": time.time(), "token": "theirs"}))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", taken_over_after_the_first_save)
    monkeypatch.setattr(remote, "PUSH_SECONDS", 3600.0)
    monkeypatch.setattr(remote.tempfile, "tempdir", str(tmp_path / "tmp"))  # the kept copy stays in this test
    os.makedirs(tmp_path / "tmp")
    with pytest.raises(WorkdirError, match=r"gs://bucket/t was taken over by process 44 on host tpu-vm-3, .*this run "
                                           r"stops writing there: its unsent files are kept in .*dlfx-mirror-"):
        runner.train(_config(repo_root, tmp_path), "gs://bucket/t")
    held = json.loads((gcs / "bucket" / "t" / ".lock").read_text())
    assert held["token"] == "theirs"  # left to the run that holds it
    assert [r["step"] for r in log.read_metrics(str(gcs / "bucket" / "t")) if r["split"] == "train"] == [2, 4]
    assert len(os.listdir(tmp_path / "tmp")) == 1  # the kept local copy
