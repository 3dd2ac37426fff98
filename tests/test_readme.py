"""The README cannot drift: its config reference covers every key, and its commands parse and run."""

import os
import re
import shlex

import pytest

from dlfx import cli, config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_config_reference_lists_every_key_and_no_stale_one():
    reference = _section(_readme(), "Config reference")
    keys = config_lib.flat_keys(config_lib.base_config())
    missing = [k for k in keys if f"`{k}`" not in reference and f"`{k.rsplit('.', 1)[1]}`" not in reference]
    assert not missing, f"README config reference lacks: {missing}"
    sections = set(config_lib.base_config().keys())
    documented = {m for m in re.findall(r"`([a-z_]+\.[a-z_]+)`", reference) if m.split(".")[0] in sections}
    stale = [k for k in documented if k not in keys and not k.startswith(("model.", "data.", "task."))]  # arguments
    assert not stale, f"README documents keys that do not exist: {stale}"


def _commands(text: str) -> list[str]:
    """Every `dlfx ...` line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("dlfx "):
                commands.append(line)
            elif ".venv/bin/dlfx " in line:
                commands.append("dlfx " + line.split(".venv/bin/dlfx ", 1)[1])
    return commands


def test_every_readme_command_parses_and_its_overrides_are_real_keys():
    commands = _commands(_readme())
    assert len(commands) >= 10
    seen = set()
    for command in commands:
        command = re.sub(r"\s\[[^\]]*\]", "", command)  # optional parts shown as [ ... ]
        command = command.replace("...", "")
        args = shlex.split(command)[1:]
        parsed, extra = cli.make_parser().parse_known_args(args)
        seen.add(args[0])
        if args[0] in ("train", "sweep") and os.path.isfile(os.path.join(REPO, parsed.config.split(":")[0])):
            config_lib.load(os.path.join(REPO, parsed.config), cli.split_overrides(extra))  # keys and types valid
    assert {"train", "eval", "inspect", "sample", "plot", "runs", "sweep", "interpret"} <= seen


@pytest.mark.slow
def test_readme_command_sequence_runs_at_small_size(tmp_path, capsys, monkeypatch):
    """train -> eval -> inspect -> plot -> runs -> interpret, as the README shows them, on a tiny run."""
    monkeypatch.chdir(REPO)
    run = str(tmp_path / "x")
    small = ["--config.train.epochs=0", "--config.train.steps=40", "--config.optimizer.warmup_steps=5"]
    assert cli.main(["train", "--config", "configs/digits_cnn.py", "--workdir", run, *small]) == 0
    assert cli.main(["train", "--config", "configs/digits_mlp.py", "--workdir", str(tmp_path / "m"),
                     "--config.train.steps=20", "--config.train.epochs=0", "--config.optimizer.warmup_steps=5"]) == 0
    assert cli.main(["eval", "--workdir", run]) == 0
    assert cli.main(["inspect", run]) == 0
    assert cli.main(["plot", run, str(tmp_path / "m"), "-o", str(tmp_path / "ab.png"), "--metrics", "loss"]) == 0
    assert cli.main(["runs", str(tmp_path), "--sort", "final_accuracy"]) == 0
    assert cli.main(["interpret", "--workdir", run, "--index", "0..3", "-o", str(tmp_path / "sal.png"),
                     "--method", "saliency,integrated_gradients"]) == 0
    out = capsys.readouterr().out
    assert "params/conv1/kernel" in out and os.path.isfile(tmp_path / "sal.png")
