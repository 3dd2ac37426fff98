"""Bad input across every subcommand and every file dlfx reads back: exit 2, one line naming the culprit,
nothing changed on disk."""

import os
import shutil

import pytest

from dlfx import cli, runner
from dlfx import config as config_lib

TINY = ["model.features=(4, 8)", "model.hidden_dim=16", "data.batch_size=32", "train.epochs=0", "train.steps=4",
        "train.log_every=2", "train.eval_every=0", "optimizer.warmup_steps=1", "parallel.num_devices=1"]
CNN = "configs/digits_cnn.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder with one finished tiny run (`runs/run`) and a few junk files."""
    base = tmp_path_factory.mktemp("bad_inputs")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runner.train(config_lib.load(os.path.join(repo, CNN), TINY), str(base / "runs" / "run"))
    (base / "notes.txt").write_text("not a config\n")
    (base / "none.py").write_text("from dlfx.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                                  "    c.model.name, c.data.name, c.train.steps = 'cnn', 'digits', 5\n"
                                  "    c.train.log_every = None\n    return c\n")
    (base / "bad.safetensors").write_bytes(b"\x00garbage")
    (base / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    return base


def _snapshot(folder) -> dict:
    """Every folder under `folder`, and every file with its size and modification time."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(parent, name), folder)] = "folder"
        for name in files:
            stat = os.lstat(os.path.join(parent, name))
            found[os.path.relpath(os.path.join(parent, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _damage(name: str, content):
    """A change to the run copy: replace `name` with bytes, text or a folder."""
    def apply(run):
        path = os.path.join(run, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        if content is None:
            os.makedirs(path)
        elif isinstance(content, bytes):
            with open(path, "wb") as f:
                f.write(content)
        else:
            with open(path, "w") as f:
                f.write(content)
    return apply


def _edit_config(run):
    """config.json edited to another model width (the checkpoints no longer fit it)."""
    path = os.path.join(run, "config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"hidden_dim": 16', '"hidden_dim": 24'))


def _remove_state(run):
    """The newest checkpoint loses its train state."""
    shutil.rmtree(os.path.join(run, "checkpoints", "4", "state"))


def _fifo(run):
    """A named pipe where a weights file is expected (reading it would block for ever)."""
    os.mkfifo(os.path.join(run, "weights.npz"))


BINARY = b"\x89\xff\x00\x13binary"
SAME = [f"--config.{o}" for o in TINY]
TRAIN = ["train", "--config", CNN, "--workdir", "{new}"]
# (argv with {run} {new} {root}, text the one error line must hold, change made to a copy of the run first)
CASES = [
    # config file and overrides
    (TRAIN + ["--config.seed=99999999999999999999"], "config.seed", None),
    (TRAIN + ["--config.model.features=(0,)"], "config.model.features", None),
    (TRAIN + ["--config.optimizer.freeze=('[',)"], "config.optimizer.freeze", None),
    (TRAIN + ["--config.data.crop_padding=-1"], "config.data.crop_padding", None),
    (TRAIN + ["--config.optimizer.learning_rate=nan"], "config.optimizer.learning_rate", None),
    (TRAIN + ["--config.optimizer.learning_rate=inf"], "config.optimizer.learning_rate", None),
    (TRAIN + ["--config.model.dropout_rate=2"], "config.model.dropout_rate", None),
    (TRAIN + ["--config.optimizer.b2=1.5"], "config.optimizer.b2", None),
    (TRAIN + ["--config.optimizer.boundaries=(0.8,0.2)"], "config.optimizer.boundaries", None),
    (TRAIN + ["--config.data.train_fraction=0"], "config.data.train_fraction", None),
    (TRAIN + ["--config.parallel.fsdp=0"], "config.parallel.fsdp", None),
    (TRAIN + ["--config.train.steps=abc"], "config.train.steps", None),
    (TRAIN + ["--config.modle.name=cnn"], "config.modle", None),
    (TRAIN + ["oops"], "'oops'", None),
    (TRAIN + ["--num-processes", "0"], "--num-processes", None),
    (["train", "--config", "{root}/notes.txt", "--workdir", "{new}"], "notes.txt", None),
    (["train", "--config", "{root}/missing.py", "--workdir", "{new}"], "missing.py", None),
    # an existing run
    (["train", "--config", CNN, "--workdir", "{run}"] + [f"--config.{o}" for o in TINY] +
     ["--config.model.hidden_dim=24"], "model.hidden_dim: 16 -> 24", None),
    (["train", "--config", CNN, "--workdir", "{run}", "--force"] + [f"--config.{o}" for o in TINY] +
     ["--config.model.hidden_dim=24"], "in the checkpoint but", None),
    (["eval", "--workdir", "{run}"], "model.hidden_dim: 16 -> 24", _edit_config),
    (["eval", "--workdir", "{root}/nowhere"], "nowhere", None),
    (["eval", "--workdir", "{run}", "--step", "-1"], "--step", None),
    (["eval", "--workdir", "{run}", "--step", "3"], "step 3", None),
    # damaged files the run is read back from
    (["eval", "--workdir", "{run}"], "config.json", _damage("config.json", BINARY)),
    (["eval", "--workdir", "{run}"], "config.json", _damage("config.json", "[1, 2]")),
    (["eval", "--workdir", "{run}"], "config.json", _damage("config.json", "{}")),
    (["eval", "--workdir", "{run}"], "config.json", _damage("config.json", None)),
    (["train", "--config", CNN, "--workdir", "{run}"], "config.json", _damage("config.json", "{\"seed\": ")),
    (["plot", "{run}", "-o", "{new}.png"], "metrics.jsonl", _damage("metrics.jsonl", BINARY)),
    (["plot", "{run}", "-o", "{new}.png"], "metrics.jsonl", _damage("metrics.jsonl", "[1, 2]\n")),
    (["plot", "{run}", "-o", "{new}.png"], "metrics.jsonl", _damage("metrics.jsonl", "{}\n")),
    (["plot", "{run}", "-o", "{new}.png"], "metrics.jsonl", _damage("metrics.jsonl", None)),
    (["sample", "--workdir", "{run}"], "data.json", _damage("data.json", BINARY)),
    (["sample", "--workdir", "{run}"], "data.json", _damage("data.json", "{}")),
    (["sample", "--workdir", "{run}"], "data.json", _damage("data.json", "[1, 2]")),
    (["sample", "--workdir", "{run}"], "data.json", _damage("data.json", None)),
    # subcommand arguments
    (["sample", "--workdir", "{run}"], "cannot be sampled as text", None),
    (["sample", "--workdir", "{run}", "--num-samples", "-1"], "--num-samples", None),
    (["sample", "--workdir", "{run}", "--temperature", "nan"], "--temperature", None),
    (["sample", "--workdir", "{run}", "--temperature", "-1"], "--temperature", None),
    (["sample", "--workdir", "{run}", "--length", "0"], "--length", None),
    (["plot", "{run}", "-o", "{new}.txt"], "-o", None),
    (["plot", "{run}", "-o", "{new}.png", "--metrics", ""], "--metrics", None),
    (["plot", "{run}", "-o", "{new}.png", "--metrics", "nosuch"], "nosuch", None),
    (["plot", "{run}", "-o", "{new}.png", "--smooth", "1.5"], "--smooth", None),
    (["plot", "{root}/nowhere", "-o", "{new}.png"], "nowhere", None),
    (["inspect", "{root}/notes.txt"], "notes.txt", None),
    (["inspect", "{root}/nowhere"], "nowhere", None),
    (["inspect", "{root}/bad.safetensors"], "bad.safetensors", None),
    (["inspect", "{root}/bad.npz"], "bad.npz", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--method", "attention"], "--method attention", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--method", "nosuch"], "--method", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--method", ""], "--method", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--ig-steps", "0"], "--ig-steps", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--index", "99999"], "--index", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--index", "a..b"], "--index", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--split", "valid"], "--split", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.txt"], "-o", None),
    (["runs", "{root}/nowhere"], "nowhere", None),
    (["runs", "{root}", "--sort", "nosuch"], "nosuch", None),
    (["sweep", "--config", CNN, "--workdir-root", "{new}", "--grid", "seed"], "--grid", None),
    (["sweep", "--config", CNN, "--workdir-root", "{new}", "--grid", "seed="], "--grid", None),
    (["sweep", "--config", CNN, "--workdir-root", "{new}", "--grid", "seed=1", "--parallel", "0"], "--parallel",
     None),
    (["nosuch"], "nosuch", None),
    # found by an adversarial probe
    (["train", "--config", "{root}/none.py", "--workdir", "{new}"], "config.train.log_every", None),
    (["eval", "--workdir", "{run}", "--step", "4"], "unreadable", _remove_state),
    (["eval", "--workdir", "{run}"], "dlfx_run.json", _damage("checkpoints/dlfx_run.json",
                                                              '{"workdir": 5, "config": "x"}')),
    (["train", "--config", CNN, "--workdir", "{run}"] + SAME, ".lock is a folder", _damage(".lock", None)),
    (["plot", "{run}", "-o", "{root}/notes.txt/x.png"], "notes.txt", None),
    (["sweep", "--config", CNN, "--workdir-root", "{root}/notes.txt", "--grid", "seed=1,2"], "--workdir-root",
     None),
    (["sweep", "--config", CNN, "--workdir-root", "{new}", "--grid", "train.checkpoint_dir=a/b,a_b"],
     "share the run folder", None),
    (["train", "--config", CNN, "--workdir", ""], "--workdir is empty", None),
    (["interpret", "--workdir", "{run}", "-o", "{new}.png", "--index", "5..2"], "selects no example", None),
    (["inspect", "{run}/weights.npz"], "not a regular file", _fifo),
    (["train", "--config", "configs/char_gpt.py", "--workdir", "{new}", "--config.data.random_flip=true"],
     "config.data.random_flip augments images (height, width, channels), but 'text'", None),
]


@pytest.mark.parametrize("argv, expected, damage", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(root, tmp_path, monkeypatch, capsys, argv, expected,
                                                          damage):
    run = str(tmp_path / "runs" / "run")
    shutil.copytree(root / "runs" / "run", run, symlinks=True)
    if damage:
        damage(run)
    monkeypatch.setattr(cli, "_exit_now_if_stuck", lambda code: code)  # never os._exit a test worker
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [a.format(run=run, new=str(tmp_path / "new"), root=str(tmp_path)) for a in argv]
    for name in ("notes.txt", "none.py", "bad.safetensors", "bad.npz"):
        shutil.copy(root / name, tmp_path / name)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dlfx: error: "), err
    assert expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, moved or deleted


def test_table_covers_every_subcommand():
    commands = {c[0][0] for c in CASES}
    assert {"train", "eval", "inspect", "sample", "plot", "runs", "sweep", "interpret"} <= commands
    assert len(CASES) >= 40
