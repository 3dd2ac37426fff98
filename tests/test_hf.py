"""The `hf` source: Hugging Face `save_to_disk` folders and parquet files, read by random access."""

import io
import os
import sys

import numpy as np
import pytest

from dlfx import config as config_lib, data, runner
from dlfx.errors import DataError

datasets = pytest.importorskip("datasets")  # the [hf] extra; installed by the README's test command


def _digits_dict(n_train=96, n_test=40):
    digits = data.load({"name": "digits"})
    features = datasets.Features({"pixels": datasets.Array3D((8, 8, 1), "float32"),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def part(split, n):
        return datasets.Dataset.from_dict({"pixels": split["x"][:n], "label": split["y"][:n].tolist()}, features=features)

    return datasets.DatasetDict({"train": part(digits.train, n_train), "test": part(digits.test, n_test)}), digits


def test_save_to_disk_folder_reads_like_the_arrays_and_trains(repo_root, tmp_path):
    saved, digits = _digits_dict()
    saved.save_to_disk(str(tmp_path / "hfdigits"))
    ds = data.load({"name": "hf", "path": str(tmp_path / "hfdigits"), "keys": ("x=pixels", "y=label")})
    assert ds.num_classes == 10 and len(ds.train) == 96 and len(ds.test) == 40
    batch = data.access.read(ds.train, [5, 0, 7])
    np.testing.assert_array_equal(batch["x"], digits.train["x"][[5, 0, 7]])
    np.testing.assert_array_equal(batch["y"], digits.train["y"][[5, 0, 7]])
    config = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), [
        "data.name=hf", f"data.path={tmp_path / 'hfdigits'}", "data.keys=('x=pixels', 'y=label')",
        "model.features=(4, 8)", "model.hidden_dim=16", "data.batch_size=32", "train.epochs=0", "train.steps=4",
        "train.log_every=2", "train.eval_every=0", "train.checkpoint_every=0", "optimizer.warmup_steps=1",
        "parallel.num_devices=1"])
    summary = runner.train(config, str(tmp_path / "run"))
    assert summary["status"] == "finished" and 0 <= summary["eval"]["accuracy"] <= 1


def test_parquet_files_and_image_columns(tmp_path):
    from PIL import Image

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for split, n in (("train", 6), ("test", 3)):
        table = datasets.Dataset.from_dict({"image": [{"bytes": png(20 * i), "path": None} for i in range(n)],
                                            "label": [i % 3 for i in range(n)]}, features=features)
        table.to_parquet(str(tmp_path / f"{split}-00000.parquet"))
    ds = data.load({"name": "hf", "path": str(tmp_path), "keys": ("x=image",), "image_size": 8})
    assert ds.num_classes == 3 and ds.metadata["kind"] == "images"
    batch = data.access.read(ds.test, [2, 1])
    assert batch["x"].shape == (2, 8, 8, 3) and batch["x"].dtype == np.uint8
    assert (batch["x"][0] == 40).all() and list(batch["y"]) == [2, 1]
    augmented = ds.train.gather_augmented(np.array([4]), [[0, 1, 2]])  # training view: random resized crop
    assert augmented["x"].shape == (1, 8, 8, 3)


def test_hf_errors_name_the_problem(tmp_path, monkeypatch):
    saved, _ = _digits_dict(40, 40)
    saved.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match="has no column 'x'.*config.data.keys"):
        data.load({"name": "hf", "path": str(tmp_path / "d")})
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], not 'validation'"):
        data.load({"name": "hf", "path": str(tmp_path / "d"), "test_split": "validation", "keys": ("x=pixels", "y=label")})
    with pytest.raises(DataError, match="neither a `save_to_disk` DatasetDict folder nor"):
        data.load({"name": "hf", "path": str(tmp_path)})
    labels = datasets.DatasetDict({split: datasets.Dataset.from_dict({"x": np.zeros((4, 3), np.float32),
                                                                      "label": ["a", "b", "a", "c"]})
                                   for split in ("train", "test")})
    labels.save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(DataError, match="label column 'label' holds strings; make it a ClassLabel"):
        data.load({"name": "hf", "path": str(tmp_path / "strings")})
    empty = datasets.DatasetDict({"train": saved["train"], "test": saved["test"].select([])})
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="'test' split of .*empty"):
        data.load({"name": "hf", "path": str(tmp_path / "empty"), "keys": ("x=pixels", "y=label")})
    monkeypatch.setitem(sys.modules, "datasets", None)  # the [hf] extra missing
    with pytest.raises(DataError, match=r"pip install 'dlfx\[hf\]'"):
        data.load({"name": "hf", "path": str(tmp_path / "d")})


def test_a_null_label_is_named(tmp_path):
    nulls = datasets.DatasetDict({split: datasets.Dataset.from_dict({"x": np.zeros((4, 3), np.float32),
                                                                     "label": [0, 1, None, 2]})
                                  for split in ("train", "test")})
    nulls.save_to_disk(str(tmp_path / "nulls"))
    with pytest.raises(DataError, match="example 2 of split 'train' has no label .column 'label' is null"):
        data.load({"name": "hf", "path": str(tmp_path / "nulls")})
