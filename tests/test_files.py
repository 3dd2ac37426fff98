"""File-backed data: token folders (`dlfx data tokens`), memory-mapped arrays, streamed eval, big shuffles."""

import os
import re
import subprocess
import sys

import chex
import numpy as np
import pytest

import dlfx
from dlfx import config as config_lib, data, runner, sampling
from dlfx.data import access, files, pipeline
from dlfx.errors import DataError
from dlfx.experiment import build

TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "caf\u00e9 na\u00efve \u2603\n"
GPT_TINY = ["data.name=tokens", "data.seq_len=16", "data.batch_size=8", "model.embed_dim=16", "model.num_layers=1",
            "model.num_heads=2", "model.max_len=64", "train.steps=4", "train.log_every=2", "train.eval_every=0",
            "train.checkpoint_every=4", "optimizer.warmup_steps=1", "parallel.num_devices=1"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_token_folder_from_chars_reads_windows_by_memory_map(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "READ_CHUNK", 97)  # several chunks, one split boundary inside a chunk
    out = tmp_path / "tok"
    meta = files.write_tokens(str(corpus), str(out), "chars", val_fraction=0.25)
    vocab = sorted(set(TEXT))
    assert meta["vocab"] == vocab and meta["vocab_size"] == len(vocab) and meta["dtype"] == "uint16"
    ids = np.array([vocab.index(c) for c in TEXT], np.uint16)
    num_val = int(len(TEXT) * 0.25)
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", np.uint16), ids[:-num_val])
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", np.uint16), ids[-num_val:])

    dataset = files.tokens(str(out), seq_len=16)
    assert isinstance(dataset.train.tokens, np.memmap) and dataset.num_classes == len(vocab)
    assert len(dataset.train) == len(TEXT) - num_val - 16 and len(dataset.test) == (num_val - 1) // 16
    window = dataset.train[5]
    np.testing.assert_array_equal(window["x"], ids[5:21])
    np.testing.assert_array_equal(window["y"], ids[6:22])
    gathered = access.read(dataset.test, [0, 2])  # consecutive validation windows
    np.testing.assert_array_equal(gathered["x"][1], ids[-num_val:][32:48])
    assert dataset.metadata["char_level"] and dataset.metadata["vocab"] == vocab


def test_byte_tokens_from_a_folder_and_refusals(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello \u2603 " * 50, encoding="utf-8")
    (folder / "b.bin").write_bytes(bytes(range(256)) * 2)  # not UTF-8: fine as bytes
    meta = files.write_tokens(str(folder), str(tmp_path / "tok"), "bytes")
    assert meta["vocab_size"] == 256 and meta["encoding"] == "bytes" and "vocab" not in meta
    everything = (folder / "a.txt").read_bytes() + (folder / "b.bin").read_bytes()
    stored = np.concatenate([np.fromfile(tmp_path / "tok" / n, np.uint16) for n in ("train.bin", "val.bin")])
    np.testing.assert_array_equal(stored, np.frombuffer(everything, np.uint8))
    with pytest.raises(DataError, match="exists and is not an empty folder"):
        files.write_tokens(str(folder), str(tmp_path / "tok"), "bytes")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        files.write_tokens(str(folder), str(tmp_path / "chars"), "chars")
    assert not (tmp_path / "chars").exists() and not (tmp_path / "chars.tmp").exists()
    with pytest.raises(DataError, match="uint32"):  # read with the wrong width
        files.tokens(str(tmp_path / "tok"), seq_len=8, dtype="uint32")


def test_gpt_trains_on_a_token_folder_and_samples_without_it(repo_root, corpus, tmp_path):
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "dlfx", "data", "tokens", "--input", str(corpus), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vocab_size" in result.stdout
    workdir = str(tmp_path / "run")
    config = config_lib.load(os.path.join(repo_root, "configs/char_gpt.py"), GPT_TINY + [f"data.path={out}"])
    summary = runner.train(config, workdir)
    assert summary["status"] == "finished" and summary["eval"]["bits_per_char"] > 0
    for name in os.listdir(out):
        os.remove(out / name)  # sampling needs the run, not the data
    texts = sampling.sample_workdir(workdir, "the ", length=20, temperature=0.5)
    assert texts[0].startswith("the ") and len(texts[0]) == 24 and set(texts[0]) <= set(TEXT)


def test_memory_mapped_arrays_from_npz_and_npy_folder(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(50, 4, 4, 1)).astype(np.float32), rng.integers(0, 3, 50).astype(np.int32)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    dataset = files.arrays(str(tmp_path / "d.npz"), test_fraction=0.2, keys=("x=images", "y=labels"))
    assert isinstance(dataset.train.arrays["x"], np.memmap) and dataset.num_classes == 3
    assert len(dataset.train) == 40 and len(dataset.test) == 10
    both = np.sort(np.concatenate([dataset.train.indices, dataset.test.indices]))
    np.testing.assert_array_equal(both, np.arange(50))
    picked = access.read(dataset.train, [7, 2])
    np.testing.assert_array_equal(picked["x"], images[dataset.train.indices[[7, 2]]])

    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)
    from_folder = files.arrays(str(folder), test_path=str(tmp_path / "d.npz"), keys=("x=images", "y=labels"))
    assert isinstance(from_folder.train.arrays["x"], np.memmap) and len(from_folder.test) == 50

    np.savez_compressed(tmp_path / "c.npz", x=images, y=labels)
    with pytest.raises(DataError, match="compressed"):
        files.arrays(str(tmp_path / "c.npz"), test_fraction=0.2)
    with pytest.raises(DataError, match="has no array 'x'"):
        files.arrays(str(tmp_path / "d.npz"), test_fraction=0.2)


def test_streamed_eval_batches_equal_the_in_memory_ones():
    arrays = {"x": np.arange(23 * 2, dtype=np.float32).reshape(23, 2), "y": np.arange(23, dtype=np.int32)}

    class Records:  # a source with __getitem__ only: no gather
        def __len__(self):
            return 23

        def __getitem__(self, i):
            return {"x": arrays["x"][i], "y": arrays["y"][i]}

    for process_index, process_count in ((0, 1), (1, 2)):
        expected = list(pipeline.eval_batches(arrays, 8, process_index, process_count))
        for got, want in zip(pipeline.eval_batches(Records(), 8, process_index, process_count), expected):
            for key in ("x", "y", "mask"):
                np.testing.assert_array_equal(got[key], want[key])
    seen = [y for b in pipeline.eval_batches(Records(), 8) for y, m in zip(b["y"], b["mask"]) if m]
    assert seen == list(range(23))


def test_large_sources_shuffle_without_a_permutation_array(monkeypatch):
    monkeypatch.setattr(pipeline, "PERMUTATION_LIMIT", 10)
    batches = pipeline._EpochBatches(100, 20, seed=3, process_index=0, process_count=1)
    epoch0 = np.concatenate([batches(b) for b in range(5)])
    epoch1 = np.concatenate([batches(b) for b in range(5, 10)])
    assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(100))
    again = pipeline._EpochBatches(100, 20, seed=3, process_index=0, process_count=1)
    np.testing.assert_array_equal(again(7), batches(7))  # resume-exact
    halves = [pipeline._EpochBatches(100, 20, 3, p, 2)(7) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), batches(7))  # processes split the global batch


def test_a_data_factory_may_return_sources(repo_root, tmp_path):
    source = data.access.ArraySource({"x": np.zeros((64, 8, 8, 1), np.float32), "y": np.zeros(64, np.int32)})
    dataset = data.Dataset(train=source, test=source, name="src", num_classes=10)
    data._check_dataset(dataset, "src")
    assert dataset.example_shape == (8, 8, 1)
    assert data.describe(dataset)["example"]["x"] == {"shape": [8, 8, 1], "dtype": "float32"}
    with pytest.raises(DataError, match="need a data set held in memory"):
        data.sources.subset(dataset, classes=(0, 1))


def test_mlp_trains_on_memory_mapped_arrays_and_eight_devices_equal_one(repo_root, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 8, 8, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    overrides = ["data.name=arrays", f"data.path={tmp_path / 'd.npz'}", "data.test_fraction=0.25", "data.batch_size=16",
                 "model.hidden_dims=(16,)", "model.dropout_rate=0.0", "train.epochs=0", "train.steps=6", "train.log_every=2",
                 "train.eval_every=0", "optimizer.warmup_steps=1"]
    spec = os.path.join(repo_root, "configs/digits_mlp.py")
    config = config_lib.load(spec, overrides + ["parallel.num_devices=1"])
    assert not build(config).resident  # memory-mapped: read per batch by the host pipeline
    workdir = str(tmp_path / "run")
    summary = runner.train(config, workdir)
    assert summary["status"] == "finished" and 0 <= summary["eval"]["accuracy"] <= 1
    assert os.path.getsize(os.path.join(workdir, "plots", "confusion.png")) > 0
    # 8 devices, 2 rows each (no dropout: each device draws its own masks)
    eight = runner.train(config_lib.load(spec, overrides), str(tmp_path / "eight"))
    assert eight["devices"] == 8
    chex.assert_trees_all_close(eight["state"].params, summary["state"].params, rtol=1e-5, atol=1e-6)


def _image_folder(root, sizes=((12, 9), (7, 15), (10, 10))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            os.makedirs(root / split / name)
            for i in range(count):
                w, h = sizes[i % len(sizes)]
                pixels = (rng.integers(0, 80, (h, w, 3)) + 120 * label).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_decodes_augments_exactly_and_trains(repo_root, tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    dataset = data.load({"name": "image_folder", "path": str(root), "image_size": 8, "batch_size": 4})
    assert dataset.num_classes == 2 and dataset.metadata["classes"] == ["cat", "dog"]
    assert len(dataset.train) == 12 and len(dataset.test) == 4 and dataset.example_shape == (8, 8, 3)
    assert dataset.test[0]["x"].dtype == np.uint8
    first = [next(pipeline.train_iterator(dataset.train, 4, seed=1)) for _ in range(2)]
    np.testing.assert_array_equal(first[0]["x"], first[1]["x"])  # seeded crops: the same pixels again
    two = [next(pipeline.train_iterator(dataset.train, 4, seed=1, process_index=p, process_count=2)) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in two]), first[0]["x"])  # any process count
    assert not np.array_equal(first[0]["x"], access.read(dataset.train, pipeline._EpochBatches(12, 4, 1, 0, 1)(0))["x"])

    config = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), [
        "data.name=image_folder", f"data.path={root}", "data.image_size=8", "data.batch_size=4",
        "model.features=(4,)", "model.hidden_dim=8", "train.epochs=0", "train.steps=4", "train.log_every=2",
        "train.eval_every=0", "optimizer.warmup_steps=1", "parallel.num_devices=1"])
    workdir = str(tmp_path / "run")
    summary = runner.train(config, workdir)
    assert summary["status"] == "finished" and summary["eval"]["accuracy"] >= 0.5 - 1e-6
    run = dlfx.load_run(workdir)
    logits = run.predict(access.read(dataset.test, [0, 1, 2, 3])["x"])  # uint8 in, normalised inside
    assert logits.shape == (4, 2) and np.all(np.isfinite(logits))


def test_image_folder_refusals(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load({"name": "image_folder", "path": str(tmp_path / "none")})
    root = tmp_path / "images"
    _image_folder(root)
    os.makedirs(root / "val" / "bird")
    with pytest.raises(DataError, match="class folder 'bird' that the train split does not have"):
        data.load({"name": "image_folder", "path": str(root)})
    (root / "val" / "bird").rmdir()
    (root / "train" / "cat" / "0.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image.*config.data.skip_bad_images=True"):
        data.load({"name": "image_folder", "path": str(root)})
    with pytest.raises(DataError, match="config.data.normalize='imagenet2'"):
        data.load({"name": "image_folder", "path": str(root), "normalize": "imagenet2"})


def test_array_record_shards_from_images_and_arrays(repo_root, tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    out = tmp_path / "records"
    result = subprocess.run([sys.executable, "-m", "dlfx", "data", "convert", "--from", "image_folder", str(root),
                             "--out", str(out), "--shards", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["meta.json", "train-00000-of-00003.array_record",
                                       "train-00001-of-00003.array_record", "train-00002-of-00003.array_record",
                                       "val-00000-of-00001.array_record"]
    streamed = data.load({"name": "array_record", "path": str(out), "image_size": 8})
    folder = data.load({"name": "image_folder", "path": str(root), "image_size": 8})
    assert streamed.metadata["classes"] == ["cat", "dog"] and len(streamed.train) == 12
    np.testing.assert_array_equal(access.read(streamed.test, range(4))["x"], access.read(folder.test, range(4))["x"])
    keys = [[5, 0, r] for r in range(3)]  # the same augmentation from the same keys
    np.testing.assert_array_equal(streamed.train.gather_augmented([0, 4, 9], keys)["x"],
                                  folder.train.gather_augmented([0, 4, 9], keys)["x"])

    x, y = np.arange(40 * 3, dtype=np.float32).reshape(40, 3), np.arange(40, dtype=np.int32) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    from dlfx.data import records

    records.convert("arrays", str(tmp_path / "a.npz"), str(tmp_path / "arr"), shards=2, test_fraction=0.25)
    arrays = data.load({"name": "array_record", "path": str(tmp_path / "arr")})
    direct = files.arrays(str(tmp_path / "a.npz"), test_fraction=0.25)
    assert len(arrays.train) == 30 and arrays.num_classes == 4
    np.testing.assert_array_equal(access.read(arrays.train, range(30))["x"], access.read(direct.train, range(30))["x"])
    with pytest.raises(DataError, match="exists and is not an empty folder"):
        records.convert("arrays", str(tmp_path / "a.npz"), str(tmp_path / "arr"))


def test_worker_processes_give_the_same_batches_and_resume_exactly(repo_root, tmp_path):
    overrides = ["train.epochs=0", "train.steps=6", "train.log_every=2", "train.eval_every=0",
                 "train.checkpoint_every=3", "optimizer.warmup_steps=1", "model.hidden_dims=(8,)",
                 "parallel.num_devices=1", "train.steps_per_call=1"]
    spec = os.path.join(repo_root, "configs/digits_mlp.py")
    with_workers = runner.train(config_lib.load(spec, overrides + ["data.workers=1"]), str(tmp_path / "w"))
    without = runner.train(config_lib.load(spec, overrides), str(tmp_path / "plain"))
    from checks import assert_bit_identical

    assert_bit_identical(without["state"], with_workers["state"])
    import shutil

    shutil.rmtree(tmp_path / "w" / "checkpoints" / "6")  # resume from step 3, the workers' saved position
    resumed_run = runner.train(config_lib.load(spec, overrides + ["data.workers=1"]), str(tmp_path / "w"))
    assert resumed_run["step"] == 6
    assert_bit_identical(without["state"], resumed_run["state"])


def test_resnet_folder_finetune_config_starts_from_torchvision_weights(repo_root, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import jax
    from safetensors.torch import save_file

    from dlfx import experiment

    torch.manual_seed(0)
    torchvision_state = torchvision.models.resnet18().state_dict()  # randomly initialised
    save_file(torchvision_state, str(tmp_path / "r18.safetensors"))
    root = tmp_path / "images"
    _image_folder(root)
    config = config_lib.load(os.path.join(repo_root, "configs/finetune_resnet_folder.py"), [
        f"data.path={root}", f"init_from.path={tmp_path / 'r18.safetensors'}", "data.image_size=32",
        "data.batch_size=4", "optimizer.warmup_steps=1", "parallel.num_devices=1"])
    exp = experiment.build(config)  # the config as written: ImageNet stem and width, 2 classes from the folder
    assert exp.preprocess is not None and exp.dataset.metadata["normalize"]["mean"][0] == 0.485
    state = experiment.init_from_pretrained(exp, exp.init())
    params = jax.device_get(state.params)
    assert params["head"]["kernel"].shape == (512, 2)  # a fresh head (init_from.skip)
    conv1 = torchvision_state["conv1.weight"].numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_allclose(params["conv1"]["kernel"], conv1, rtol=1e-6)


def test_writers_and_sources_refuse_or_survive_what_a_probe_tried(tmp_path):
    corpus = tmp_path / "in"
    (corpus / ".git").mkdir(parents=True)
    (corpus / ".git" / "pack").write_bytes(b"\xff\xfe binary")  # hidden folders are not read
    (corpus / "a.txt").write_text("line one\r\nline two\n" * 20, encoding="utf-8")
    os.mkfifo(corpus / "pipe")  # not a regular file: skipped, never read (it would block)
    (tmp_path / "out.tmp").mkdir()
    (tmp_path / "out.tmp" / "mine.txt").write_text("keep me")  # a user's folder beside --out survives
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    left = tmp_path / f".out.partial-{socket.gethostname()}-{dead.pid}-abc_12"  # a SIGKILLed writer's stage
    left.mkdir()
    meta = files.write_tokens(str(corpus), str(tmp_path / "out"), "chars")
    assert not left.exists()
    assert "\r" in meta["vocab"] and (tmp_path / "out.tmp" / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]
    with pytest.raises(DataError, match="its folder .* does not exist"):
        files.write_tokens(str(corpus), str(tmp_path / "no" / "such" / "out"), "chars")

    wide = tmp_path / "wide"  # uint32 ids: the dtype comes from meta.json
    files.write_tokens(str(corpus), str(wide), "chars")
    ids = np.fromfile(wide / "train.bin", np.uint16).astype(np.uint32)
    ids.tofile(wide / "train.bin")
    np.fromfile(wide / "val.bin", np.uint16).astype(np.uint32).tofile(wide / "val.bin")
    meta_path = wide / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"uint16"', '"uint32"'))
    np.testing.assert_array_equal(files.tokens(str(wide), seq_len=8).train[0]["x"], ids[:8])
    meta_path.write_text(meta_path.read_text().replace('"dtype": "uint32",', ''))
    assert '"dtype"' not in meta_path.read_text()
    with pytest.raises(DataError, match="every second one is 0: it looks like uint32 ids"):  # not read as uint16
        files.tokens(str(wide), seq_len=8)
    assert len(files.tokens(str(wide), seq_len=8, dtype="uint16").train)  # named: read as asked
    meta_path.write_text(meta_path.read_text().replace('{', '{"dtype": "uint32", ', 1))
    val = np.fromfile(wide / "val.bin", np.uint32)
    val[3] = 999
    val.tofile(wide / "val.bin")
    with pytest.raises(DataError, match="val.bin holds token id 999 >= vocab_size"):
        files.tokens(str(wide), seq_len=8)

    x = np.zeros((20, 3), np.float32)
    np.savez(tmp_path / "neg.npz", x=x, y=np.arange(20, dtype=np.int32) - 5)
    with pytest.raises(DataError, match="labels 'y' go down to -5"):
        files.arrays(str(tmp_path / "neg.npz"), test_fraction=0.2)
    np.savez(tmp_path / "ok.npz", x=x, y=np.arange(20, dtype=np.int32) % 10)
    with pytest.raises(DataError, match="label 9 in 'y' but config.data.num_classes=3"):
        files.arrays(str(tmp_path / "ok.npz"), test_fraction=0.2, num_classes=3)
    np.savez(tmp_path / "other.npz", x=np.zeros((5, 4), np.float32), y=np.zeros(5, np.int32))
    with pytest.raises(DataError, match=r"config.data.test_path: .* 'x' examples are \(4,\), but \(3,\)"):
        files.arrays(str(tmp_path / "ok.npz"), test_path=str(tmp_path / "other.npz"))


def test_multi_character_vocabularies_encode_by_longest_match():
    encode = sampling._longest_match(["the", "th", "e", " ", "cat"])
    assert encode("the cat") == [0, 3, 4]
    with pytest.raises(DataError, match="starts with no token"):
        encode("dog")


def test_skip_bad_images_uses_the_next_image_deterministically(tmp_path, capsys):
    root = tmp_path / "images"
    _image_folder(root)
    clean = data.load({"name": "image_folder", "path": str(root), "image_size": 8})
    paths = sorted((root / "train").rglob("*.*"))
    paths[1].write_bytes(b"truncated")  # example 1 (sorted class folders, then files)
    skipping = data.load({"name": "image_folder", "path": str(root), "image_size": 8, "skip_bad_images": True})
    first = access.read(skipping.train, [0, 1, 2])
    np.testing.assert_array_equal(first["x"][1], access.read(clean.train, [2])["x"][0])  # the next image
    np.testing.assert_array_equal(first["y"][1], access.read(clean.train, [2])["y"][0])
    again = skipping.train.gather_augmented(np.array([1, 1]), [[7], [7]])  # same seed, same replacement
    np.testing.assert_array_equal(again["x"][0], again["x"][1])
    assert capsys.readouterr().err.count("using the next image instead") == 1  # warned once per file
    with pytest.raises(DataError, match="cannot decode image"):
        access.read(data.load({"name": "image_folder", "path": str(root), "image_size": 8}).train, [1])
    from dlfx.data import images

    encoded = images.ImageSource(lambda i: (b"not an image", 0), 5, 8, "train", origin="/data/shards")
    with pytest.raises(DataError) as raised:
        encoded[3]
    assert str(raised.value).startswith("cannot decode image #3 of the train split in /data/shards: cannot identify")
    assert "BytesIO" not in str(raised.value)
    encoded.skip_bad = True
    with pytest.raises(DataError, match="none of the 5 images of the train split in /data/shards can be decoded"):
        encoded[3]


_DYING_SOURCE = '''
import multiprocessing, os, signal
import numpy as np
import dlfx


class Dying:
    """Digits-like records; a worker process kills itself at its 201st read."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        if multiprocessing.parent_process() is not None and self.reads > 200:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"x": np.full((4,), i % 3, np.float32), "y": np.int32(i % 3)}


def make(**_):
    return dlfx.data.Dataset(train=Dying(64), test=Dying(8), name="dying", num_classes=3)
'''


def test_a_dead_worker_process_saves_the_progress_and_stops_with_one_error(repo_root, tmp_path, monkeypatch):
    (tmp_path / "dying_data.py").write_text(_DYING_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    overrides = ["data.name=dying_data:make", "data.workers=1", "data.batch_size=8", "train.epochs=0",
                 "train.steps=50", "train.checkpoint_every=0", "train.eval_every=0", "model.hidden_dims=(8,)",
                 "parallel.num_devices=1", "train.steps_per_call=1"]
    config = config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"), overrides)
    with pytest.raises(data.WorkerLost, match="data worker process died .exit code -9"):
        runner.train(config, str(tmp_path / "w"))
    saved = sorted(int(p) for p in os.listdir(tmp_path / "w" / "checkpoints") if p.isdigit())
    assert saved and 0 < saved[-1] < 50  # the steps trained before the worker died were kept


def test_sigterm_while_a_stalled_worker_holds_the_next_batch_saves_and_stops(repo_root, tmp_path, monkeypatch):
    from dlfx.data import prefetch

    (tmp_path / "stall_data.py").write_text(_DYING_SOURCE.replace(
        "os.kill(os.getpid(), signal.SIGKILL)",
        "time.sleep(3); os.kill(os.getppid(), signal.SIGTERM); time.sleep(3600)").replace(
        "import multiprocessing, os, signal", "import multiprocessing, os, signal, time"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(prefetch, "JOIN_SECONDS", 1.0)
    overrides = ["data.name=stall_data:make", "data.workers=1", "data.batch_size=8", "train.epochs=0",
                 "train.steps=50", "train.checkpoint_every=0", "train.eval_every=0", "model.hidden_dims=(8,)",
                 "parallel.num_devices=1", "train.steps_per_call=1"]
    config = config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"), overrides)
    summary = runner.train(config, str(tmp_path / "w"))  # the worker stalls, then SIGTERMs this process
    assert summary["status"] == "preempted" and 0 < summary["step"] < 50
    assert str(summary["step"]) in os.listdir(tmp_path / "w" / "checkpoints")
    assert not [p for p in __import__("multiprocessing").active_children() if p.name.startswith("grain")]


def test_releasing_a_pipeline_stops_only_its_own_worker_processes(tmp_path):
    """A pipeline without workers, made before one with a worker, leaves that worker running when released."""
    from dlfx.data import prefetch

    arrays = {"x": np.arange(64, dtype=np.float32).reshape(32, 2), "y": np.arange(32)}
    plain = prefetch.DevicePrefetcher(data.train_iterator(arrays, 8, seed=0), lambda b: b)
    pooled = prefetch.DevicePrefetcher(data.train_iterator(arrays, 8, seed=0, workers=1), lambda b: b)
    next(plain), next(pooled)
    assert prefetch._grain_workers()
    plain.release()
    assert prefetch._grain_workers()  # the other pipeline's worker still runs
    next(pooled)
    pooled.release()
    assert not prefetch._grain_workers()


def test_image_and_record_sources_refuse_or_read_what_a_second_probe_tried(tmp_path, monkeypatch):
    import io
    import json

    from PIL import Image

    from dlfx.data import images, records

    root = tmp_path / "images"
    _image_folder(root)
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: not read
    assert len(data.load({"name": "image_folder", "path": str(root), "image_size": 8}).train) == 12
    wide = io.BytesIO()  # 16-bit grayscale: scaled to 8 bits, not clipped to white
    Image.fromarray(np.array([[0, 30000, 65535]], np.uint16)).save(wide, format="PNG")
    np.testing.assert_array_equal(np.asarray(images.decode(wide.getvalue()))[0, :, 0], [0, 117, 255])
    for values, decoded in (([0, 30, 255], [0, 30, 255]), ([0, 30000, 65535], [0, 117, 255])):
        wide = io.BytesIO()  # 32-bit integer TIFF (mode I): 8-bit values kept, 16-bit ones scaled
        Image.fromarray(np.array([values], np.int32)).save(wide, format="TIFF")
        np.testing.assert_array_equal(np.asarray(images.decode(wide.getvalue()))[0, :, 0], decoded)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8)  # a decompression bomb: one line, also for skip_bad_images
    with pytest.raises(DataError, match="cannot decode image big.png: .*decompression bomb"):
        images.decode(_png(6, 6), "big.png")
    monkeypatch.undo()

    out = tmp_path / "records"
    records.convert("image_folder", str(root), str(out))
    streamed = data.load({"name": "array_record", "path": str(out), "image_size": 8})

    def damaged(self, index):
        raise RuntimeError("Corrupted Riegeli/records file: chunk data hash mismatch")

    monkeypatch.setattr(records.RecordSource, "__getitem__", damaged)
    with pytest.raises(DataError, match=r"example 3 of .*records \(train\) does not read back: .*Corrupted"):
        access.read(streamed.train, [3])
    monkeypatch.undo()
    meta = json.loads((out / "meta.json").read_text())
    for shards in ([], "train-00000-of-00001.array_record", [None]):
        (out / "meta.json").write_text(json.dumps({**meta, "splits": {**meta["splits"], "val": {"shards": shards}}}))
        with pytest.raises(DataError, match=r"meta.json is not a dlfx ArrayRecord description: splits.val.shards "
                                            "must be a non-empty list"):
            data.load({"name": "array_record", "path": str(out)})
    train = meta["splits"]["train"]
    for splits, message in (({"val": {"shards": ["./" + train["shards"][0]]}}, "lists train-00000-of-00001.array_"
                                                                              "record more than once"),
                            ({"train": {**train, "num_examples": 11}}, "splits.train says 11 examples but its shards "
                                                                       "hold 12: is its shard list complete")):
        (out / "meta.json").write_text(json.dumps({**meta, "splits": {**meta["splits"], **splits}}))
        with pytest.raises(DataError, match=re.escape(message)):
            data.load({"name": "array_record", "path": str(out)})
    np.savez(tmp_path / "strings.npz", x=np.array(["a", "b"] * 10), y=np.zeros(20, np.int32))
    with pytest.raises(DataError, match="'x' has dtype <U1, not numbers"):
        records.convert("arrays", str(tmp_path / "strings.npz"), str(tmp_path / "s"), test_fraction=0.25)
    assert not (tmp_path / "s").exists()


def _png(width, height):
    import io

    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(encoded, format="PNG")
    return encoded.getvalue()


def test_a_resume_on_a_changed_data_set_is_refused(repo_root, tmp_path):
    """The checkpoint's data order is that of its data set: resuming on more (or fewer) examples is refused."""
    import shutil

    from dlfx.errors import ConfigError

    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 8, 8, 1)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x[:64], y=np.zeros(64, np.int32))
    config = config_lib.load(os.path.join(repo_root, "configs/digits_mlp.py"), [
        "data.name=arrays", f"data.path={tmp_path / 'd.npz'}", "data.test_fraction=0.25", "data.batch_size=16",
        "model.hidden_dims=(8,)", "train.epochs=0", "train.steps=4", "train.eval_every=0", "train.checkpoint_every=2",
        "optimizer.warmup_steps=1", "parallel.num_devices=1"])
    workdir = str(tmp_path / "run")
    runner.train(config, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if stopped after step 2
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(96, np.int32))
    with pytest.raises(ConfigError, match=r"config.data: the train split has 72 examples, but the run was trained "
                                          r"with 48 \(.*data.json\): the data set changed and the saved data order"):
        runner.train(config, workdir)
    forced = tmp_path / "forced"  # --force: the user means it; the run continues on the new data
    shutil.copytree(workdir, forced)
    assert runner.train(config, str(forced), force=True)["status"] == "finished"
    np.savez(tmp_path / "d.npz", x=x[:64], y=np.zeros(64, np.int32))  # the same data again: resumes
    assert runner.train(config, workdir)["status"] == "finished"
