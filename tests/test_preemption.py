"""SIGTERM mid-run: the runner saves at the next step boundary, exits 0, and the resumed run is bit-identical."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from dlfx import config as config_lib, experiment, runner
from dlfx.checkpoint import Checkpointer, abstract_like

OVERRIDES = ["model.features=(8, 16)", "model.hidden_dim=32", "data.batch_size=64", "train.epochs=0",
             "train.steps=300", "train.log_every=10", "train.eval_every=0", "train.checkpoint_every=1000"]


def test_sigterm_saves_and_resume_is_bit_identical(repo_root, tmp_path):
    config = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), OVERRIDES)
    reference = runner.train(config, str(tmp_path / "reference"))["state"]

    workdir = str(tmp_path / "preempted")
    command = [sys.executable, "-m", "dlfx", "train", "--config", "configs/digits_cnn.py", "--workdir", workdir,
               *[f"--config.{o}" for o in OVERRIDES]]
    process = subprocess.Popen(command, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "preempted" in stdout and "rerun the same command to resume" in stderr
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 300

    resumed = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {saved[0]}" in resumed.stderr and "finished: step 300/300" in resumed.stdout
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, step = checkpointer.restore_latest(experiment.build(config).abstract_state)
    checkpointer.close()
    assert step == 300
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
