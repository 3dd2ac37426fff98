"""The `dlfx` command end to end in subprocesses: the default experiment, eval, inspect, user errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from dlfx import log


def dlfx(repo_root, *args, timeout=300):
    """Run `python -m dlfx ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "dlfx", *args], cwd=repo_root, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="module")
def digits_run(repo_root, tmp_path_factory):
    """The README's default experiment, trained once through the CLI."""
    workdir = str(tmp_path_factory.mktemp("cli") / "digits_cnn")
    result = dlfx(repo_root, "train", "--config", "configs/digits_cnn.py", "--workdir", workdir)
    return workdir, result


@pytest.mark.slow
def test_default_digits_config_reaches_97_percent(digits_run):
    workdir, result = digits_run
    assert result.returncode == 0, result.stderr[-2000:]
    evals = [r for r in log.read_metrics(workdir) if r["split"] == "eval"]
    assert evals[-1]["step"] == 660
    assert evals[-1]["accuracy"] >= 0.97, evals[-1]
    assert "finished: step 660/660" in result.stdout


@pytest.mark.slow
def test_eval_and_inspect_read_the_run(repo_root, digits_run):
    workdir, _ = digits_run
    result = dlfx(repo_root, "eval", "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    final = [r for r in log.read_metrics(workdir) if r["split"] == "eval"][-1]
    assert evaluated["step"] == 660 and abs(evaluated["accuracy"] - final["accuracy"]) < 1e-6
    table = dlfx(repo_root, "inspect", workdir)
    assert table.returncode == 0, table.stderr
    assert re.search(r"^params/conv1/kernel\s+\(3, 3, 1, 32\)\s+float32\s+288$", table.stdout, re.M)
    assert table.stdout.strip().endswith("total: 53,098 params, 192 batch_stats")


@pytest.mark.parametrize("args, message", [
    (["--config.optimizer.lerning_rate=0.1"], "unknown config key config.optimizer.lerning_rate; did you mean config.optimizer.learning_rate?"),
    (["--config.optimizer.learning_rate=fast"], "config.optimizer.learning_rate: expected float, got 'fast'"),
    (["--config.model.name=resnet9000"], "config.model.name='resnet9000' is not one of"),
    (["--config.data.name=cifar"], "config.data.name='cifar' is not one of"),
    (["--config.data.batch_size=100"], "config.data.batch_size=100 is not divisible by the 8 devices"),
    (["--config.model.width=3"], "unknown config key config.model.width"),
    (["--config.model.hidden_dim=many"], "config.model.hidden_dim: expected int, got 'many'"),
    (["--bogus"], "unrecognized argument '--bogus'"),
    (["--config.data.name=synthetic", "--config.data.num_test=0"], "eval split is empty"),
    (["--config.train.nan_policy=ignore"], "config.train.nan_policy='ignore' is not one of error, skip"),
])
def test_user_errors_are_one_line_and_exit_2(repo_root, tmp_path, args, message):
    workdir = str(tmp_path / "never")
    result = dlfx(repo_root, "train", "--config", "configs/digits_cnn.py", "--workdir", workdir, *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dlfx: error: ") and message in lines[0], result.stderr
    assert not os.path.exists(workdir)


def test_missing_and_broken_config_files(repo_root, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    for spec, message in [("configs/nope.py", "config file not found: configs/nope.py"),
                          (str(broken), "syntax error at line 1")]:
        result = dlfx(repo_root, "train", "--config", spec, "--workdir", str(tmp_path / "w"))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = dlfx(repo_root, "eval", "--workdir", str(tmp_path / "none"))
    assert result.returncode == 2 and "config.json does not exist" in result.stderr
    result = dlfx(repo_root, "inspect", str(tmp_path / "none"))
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def test_readme_and_ci_run_the_same_test_command(repo_root):
    with open(os.path.join(repo_root, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(repo_root, ".ci", "run")) as f:
        ci = f.read()
    test_command = [line for line in ci.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    assert test_command, "no pytest line in .ci/run"
    core = test_command[0].split("pytest", 1)[1].strip()
    assert f"pytest {core}" in readme, f"README does not show the CI test command: pytest {core}"
