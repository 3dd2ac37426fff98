"""A researcher's own data, files and commands: each failure is one error line naming the example, shard,
file or metric (cases an adversarial probe found)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dlfx import cli, config as config_lib, data, runs
from dlfx.data import access, files, pipeline, records
from dlfx.errors import ConfigError, DataError

from test_files import _image_folder


class FlakySource:
    """Examples 0..15; example 10 cannot be read and example 12 has another shape."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 10:
            raise OSError("network share went away")
        return {"x": np.zeros(4 if i != 12 else 5, np.float32), "y": np.int32(i % 2)}


def test_a_source_failing_mid_run_names_the_example():
    with pytest.raises(DataError, match=r"reading example 10 of data source FlakySource failed: OSError: network"):
        access.read(FlakySource(), [10])
    with pytest.raises(DataError, match=r"reading example 10 of data source FlakySource"):  # not the batch's range
        access.read(FlakySource(), [9, 10, 11])
    with pytest.raises(DataError, match=r"example 12 has 'x' of shape \(5,\), example 11 \(4,\)"):
        access.read(FlakySource(), [11, 12])
    batches = pipeline.train_iterator(FlakySource(), 16, seed=0)  # through grain, as the runner reads it
    with pytest.raises(DataError, match="example"):
        next(batches)


def test_a_damaged_array_record_shard_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones((40, 3), np.float32), y=np.arange(40, dtype=np.int32) % 4)
    records.convert("arrays", str(tmp_path / "a.npz"), str(tmp_path / "arr"), shards=2, test_fraction=0.25)
    shard = tmp_path / "arr" / "train-00001-of-00002.array_record"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(DataError, match=f"{shard} \\(listed in .*meta.json\\) is not a readable ArrayRecord shard"):
        data.load({"name": "array_record", "path": str(tmp_path / "arr")})


def test_convert_refuses_a_damaged_image_names_it_and_writes_readable_folders(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    old = os.umask(0o022)
    try:
        records.convert("image_folder", str(root), str(tmp_path / "good"))
        files.write_tokens(str(root / "train" / "cat" / "0.jpg"), str(tmp_path / "tok"), "bytes")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "good").st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert os.stat(tmp_path / "tok").st_mode & 0o777 == 0o755
    png = root / "train" / "dog" / "1.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(DataError, match=f"{png} is not a readable image"):
        records.convert("image_folder", str(root), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


def test_an_empty_train_class_folder_is_refused(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    os.makedirs(root / "train" / "zebra")
    with pytest.raises(DataError, match="class folder .*zebra holds no"):
        data.load({"name": "image_folder", "path": str(root)})


def test_convert_maps_array_keys(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", images=np.ones((20, 3), np.float32), labels=np.arange(20, dtype=np.int32) % 2)
    assert cli.main(["data", "convert", "--from", "arrays", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o1")]) == 2
    assert "has no array 'x' (it holds images, labels; map keys with config.data.keys, or `dlfx data convert " \
           "--keys`)" in capsys.readouterr().err
    assert cli.main(["data", "convert", "--from", "arrays", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o2"),
                     "--keys", "x=images", "--keys", "y=labels"]) == 0
    assert data.load({"name": "array_record", "path": str(tmp_path / "o2")}).num_classes == 2


def test_convert_to_a_full_disk_is_one_line(tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", x=np.ones((20, 3), np.float32), y=np.arange(20, dtype=np.int32) % 2)

    class FullWriter:
        def __init__(self, *args):
            pass

        def write(self, record):
            raise RuntimeError("write() failed: No space left on device")

    import array_record.python.array_record_module as module

    monkeypatch.setattr(module, "ArrayRecordWriter", FullWriter)
    with pytest.raises(DataError, match=r"cannot write --out .*out: RuntimeError: write\(\) failed: No space left"):
        records.convert("arrays", str(tmp_path / "a.npz"), str(tmp_path / "out"), test_fraction=0.25)
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]


def test_runs_lists_a_run_whose_module_folder_moved(repo_root, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"))
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(config)))
    (workdir / config_lib.IMPORTS_FILE).write_text(json.dumps({"search_dirs": [str(tmp_path / "moved_away")]}))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "split": "eval", "loss": 0.5, "gain_db": 3.0}) + "\n")
    row = runs.summarize(str(workdir))
    assert row["status"] != "damaged" and row["final_gain_db"] == 3.0
    assert "final_gain_db" in runs.table([row], "final_gain_db", extra=("final_gain_db",)).splitlines()[0]
    with pytest.raises(ConfigError, match="moved_away"):  # what imports the modules still says where they were
        config_lib.read_workdir_config(str(workdir))


def test_a_linked_config_finds_modules_beside_its_target(repo_root, tmp_path):
    link = tmp_path / "linked.py"
    link.symlink_to(os.path.join(repo_root, "experiments/custom_research/config.py"))
    code = ("import sys; from dlfx import config, experiment; sys.modules.pop('nets', None); "
            f"c = config.load({str(link)!r}, ['data.num_train=64', 'data.num_test=16']); "
            "print(experiment.build_model(c, __import__('dlfx').data.load(c.data)).__class__.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": repo_root})
    assert result.returncode == 0 and result.stdout.strip() == "Denoiser", result.stderr[-1500:]
