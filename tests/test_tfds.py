"""The `tfds` source: a TFDS data set prepared in a local data_dir (ArrayRecord), read by random access."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from dlfx import data
from dlfx.errors import DataError

tfds = pytest.importorskip("tensorflow_datasets")  # the [tfds] extra; installed by the README's test command


def _png(value: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class DlfxTinyImages(tfds.core.GeneratorBasedBuilder):
    """Constant-colour 10x12 PNGs: image i has value 20 * i and label i % 3 (TFDS shuffles them on write)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(10, 12, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["cat", "dog", "bird"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(9), "test": self._generate_examples(5)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": _png(20 * i), "label": i % 3}


class DlfxTinyVectors(tfds.core.GeneratorBasedBuilder):
    """Vectors [i, i, i, i] with label i % 2 and a text feature."""

    VERSION = tfds.core.Version("2.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "name": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "validation": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"features": np.full(4, i, np.float32), "name": f"vector {i}", "label": i % 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for builder in (DlfxTinyImages, DlfxTinyVectors):
        builder(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_prepared_images_decode_like_an_image_folder(data_dir):
    ds = data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_images", "image_size": 8})
    assert len(ds.train) == 9 and len(ds.test) == 5 and ds.num_classes == 3
    assert ds.metadata["classes"] == ["cat", "dog", "bird"] and ds.metadata["kind"] == "images"
    batch = data.access.read(ds.train, range(9))
    assert batch["x"].shape == (9, 8, 8, 3) and batch["x"].dtype == np.uint8 and batch["y"].dtype == np.int32
    values = batch["x"][:, 0, 0, 0].astype(int)
    assert sorted(values) == [20 * i for i in range(9)]  # every example once, in TFDS's stored order
    np.testing.assert_array_equal(batch["y"], (values // 20) % 3)
    assert (batch["x"] == values[:, None, None, None]).all()
    augmented = ds.train.gather_augmented(np.array([0, 3]), [[0, 1, 2], [0, 1, 3]])  # random resized crop + flip
    assert augmented["x"].shape == (2, 8, 8, 3)
    version_folder = os.path.join(data_dir, "dlfx_tiny_images", "1.0.0")  # the folder itself, no name needed
    same = data.load({"name": "tfds", "path": version_folder, "image_size": 8})
    np.testing.assert_array_equal(data.access.read(same.test, [4, 0])["x"], data.access.read(ds.test, [4, 0])["x"])


def test_tensor_features_and_named_splits(data_dir):
    ds = data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_vectors:2.0.0",
                    "keys": ("x=features",), "test_split": "validation"})
    assert len(ds.train) == 12 and len(ds.test) == 4 and ds.num_classes == 2
    batch = data.access.read(ds.train, [3, 1, 3])
    assert batch["x"].shape == (3, 4) and batch["x"].dtype == np.float32
    np.testing.assert_array_equal(batch["y"], batch["x"][:, 0].astype(np.int32) % 2)


def test_trains_from_the_command_line_in_a_process_that_never_saw_the_builder(repo_root, data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dlfx", "train", "--config", "configs/digits_cnn.py", "--workdir", str(tmp_path / "run"),
         "--config.data.name=tfds", f"--config.data.path={data_dir}", "--config.data.dataset=dlfx_tiny_images",
         "--config.data.image_size=8", "--config.data.batch_size=4", "--config.model.features=(4,)",
         "--config.model.hidden_dim=8", "--config.train.epochs=0", "--config.train.steps=3",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=0", "--config.optimizer.warmup_steps=1",
         "--config.parallel.num_devices=1", "--config.data.workers=1"],
        cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished: step 3/3" in result.stdout + result.stderr


def test_tfds_errors_name_the_problem(data_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="config.data.path must name a TFDS data_dir"):
        data.load({"name": "tfds", "path": str(tmp_path / "nowhere"), "dataset": "dlfx_tiny_images"})
    with pytest.raises(DataError, match="config.data.dataset must name the TFDS data set in"):
        data.load({"name": "tfds", "path": data_dir})
    with pytest.raises(DataError, match="config.data.dataset='no_such_set': no prepared TFDS data set in"):
        data.load({"name": "tfds", "path": data_dir, "dataset": "no_such_set"})
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'validation'"):
        data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_images", "test_split": "validation"})
    with pytest.raises(DataError, match="has no feature 'x' .features: features, name, label"):
        data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_vectors"})
    with pytest.raises(DataError, match="feature 'name' .dlfx key 'x'. is Text of .*not numbers; map a numeric"):
        data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_vectors", "keys": ("x=name",)})
    with pytest.raises(DataError, match=r"config.data.num_classes=2 is less than the 3 classes of feature 'label'"):
        data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_images", "num_classes": 2})
    folder = os.path.join(data_dir, "dlfx_tiny_images", "1.0.0")
    with pytest.raises(DataError, match=r"is the prepared folder of dlfx_tiny_images/1.0.0, not "
                                        r"config.data.dataset='dlfx_tiny_vectors'"):
        data.load({"name": "tfds", "path": folder, "dataset": "dlfx_tiny_vectors"})
    assert len(data.load({"name": "tfds", "path": folder, "dataset": "dlfx_tiny_images:1.0.0"}).train) == 9
    joined = data.load({"name": "tfds", "path": folder, "train_split": "train[:4]+test"})
    assert len(joined.train) == 4 + 5
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'val'"):
        data.load({"name": "tfds", "path": folder, "train_split": "train+val"})
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match=r"pip install 'dlfx\[tfds\]'"):
        data.load({"name": "tfds", "path": data_dir, "dataset": "dlfx_tiny_images"})
