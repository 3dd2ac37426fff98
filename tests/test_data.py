"""Offline sources, the grain pipeline (order, epochs, sharding, resume) and batch placement."""


import json

import chex
import jax
import numpy as np
import pytest

from dlfx import data, parallel
from dlfx.checkpoint import Checkpointer
from dlfx.errors import ConfigError, DataError


def _arrays(n=96):
    return {"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n, dtype=np.int32)}


def _take(it, n):
    return [next(it)["y"].copy() for _ in range(n)]


def test_digits_split_is_fixed_disjoint_and_normalized():
    a, b = data.load({"name": "digits"}), data.load({"name": "digits"})
    chex.assert_shape(a.train["x"], (1438, 8, 8, 1))
    chex.assert_shape(a.test["x"], (359, 8, 8, 1))
    np.testing.assert_array_equal(a.test["x"], b.test["x"])
    assert a.train["x"].dtype == np.float32 and a.train["y"].dtype == np.int32
    assert 0.0 <= a.train["x"].min() and a.train["x"].max() <= 1.0
    train_rows = {r.tobytes() for r in a.train["x"]}
    overlap = sum(r.tobytes() in train_rows for r in a.test["x"])
    assert overlap < 5  # only exact duplicate images present in the raw data can coincide
    other = data.load({"name": "digits", "split_seed": 1})
    assert not np.array_equal(other.test["y"], a.test["y"])


def test_mnist1d_is_generated_offline_and_keeps_global_numpy_rng():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    ds = data.load({"name": "mnist1d", "num_samples": 500})
    np.testing.assert_array_equal(np.random.rand(3), expected)
    chex.assert_shape(ds.train["x"], (400, 40, 1))
    chex.assert_shape(ds.test["x"], (100, 40, 1))
    assert set(np.unique(ds.train["y"])) == set(range(10))


def test_synthetic_labels_are_deterministic():
    a = data.load({"name": "synthetic", "shape": (4, 4, 2), "num_classes": 3, "num_train": 64, "num_test": 16})
    b = data.load({"name": "synthetic", "shape": (4, 4, 2), "num_classes": 3, "num_train": 64, "num_test": 16})
    chex.assert_shape(a.train["x"], (64, 4, 4, 2))
    np.testing.assert_array_equal(a.train["y"], b.train["y"])
    assert a.num_classes == 3 and len(np.unique(a.train["y"])) == 3


def test_bad_data_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="config.data.name='nope' is not one of"):
        data.load({"name": "nope"})
    with pytest.raises(ConfigError, match="config.data.num_sample: data set 'mnist1d' takes no argument"):
        data.load({"name": "mnist1d", "num_sample": 10})
    with pytest.raises(DataError, match="test_fraction"):
        data.load({"name": "digits", "test_fraction": 1.5})
    with pytest.raises(DataError, match="fewer than one batch"):
        data.train_iterator(_arrays(10), 16, seed=0)


def test_order_is_seeded_and_reshuffled_every_epoch():
    first = np.concatenate(_take(data.train_iterator(_arrays(), 8, seed=0), 24))
    again = np.concatenate(_take(data.train_iterator(_arrays(), 8, seed=0), 24))
    other = np.concatenate(_take(data.train_iterator(_arrays(), 8, seed=1), 24))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    epoch1, epoch2 = first[:96], first[96:]
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(96))  # each epoch sees every example once
    np.testing.assert_array_equal(np.sort(epoch2), np.arange(96))
    assert not np.array_equal(epoch1, epoch2)


def test_process_shards_are_disjoint_and_cover_the_data():
    shards = [np.concatenate(_take(data.train_iterator(_arrays(), 8, seed=0, process_index=i, process_count=2), 12))
              for i in range(2)]
    assert all(len(s) == 48 for s in shards)
    assert not set(shards[0]) & set(shards[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(96))


def test_iterator_state_resumes_the_exact_stream(tmp_path):
    reference = data.train_iterator(_arrays(), 8, seed=0)
    expected = _take(reference, 30)
    it = data.train_iterator(_arrays(), 8, seed=0)
    _take(it, 17)
    fresh = data.train_iterator(_arrays(), 8, seed=0)
    fresh.set_state(it.get_state())
    chex.assert_trees_all_equal(_take(fresh, 13), expected[17:])
    # and through an Orbax checkpoint
    it = data.train_iterator(_arrays(), 8, seed=0)
    _take(it, 5)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    ckpt.save(5, {"w": np.zeros(3, np.float32)}, it)
    ckpt.wait()
    restored_it = data.train_iterator(_arrays(), 8, seed=0)
    ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), np.float32)}, restored_it)
    ckpt.close()
    chex.assert_trees_all_equal(_take(restored_it, 25), expected[5:])


@pytest.mark.parametrize("processes", [1, 2])
def test_row_indices_of_a_resident_split_are_the_host_pipelines_rows_singly_and_stacked(processes):
    """The row-index iterator (a split held on the devices) yields the rows the host pipeline reads, one batch
    or several stacked (within an epoch and across its end), with grain's state after each batch."""
    for p in range(processes):
        kwargs = dict(seed=2, process_index=p, process_count=processes)
        host = data.train_iterator(_arrays(), 8, **kwargs)  # y is the row number; 12 batches an epoch
        want = [(next(host)["y"].copy(), host.get_state()) for _ in range(60)]
        rows = data.train_iterator(_arrays(), 8, indices_only=True, **kwargs)
        got = [(next(rows)["index"], rows.get_state()) for _ in range(3)]
        # batches 3-6 in epoch 0, 7-16 across its end, 17-29 across the next, 30-59 over three epochs
        for count in (4, 10, 13, 30):
            stacked, states = rows.next_stacked(count)
            assert stacked["index"].dtype == np.int32 and stacked["index"].shape == (count, 8 // processes)
            got += list(zip(stacked["index"], states))
        for (want_rows, want_state), (got_rows, got_state) in zip(want, got, strict=True):
            chex.assert_trees_all_equal(got_rows, want_rows)
            assert got_state == want_state
        rows.set_state(want[20][1])
        chex.assert_trees_all_equal(next(rows)["index"], want[21][0])


@pytest.mark.parametrize("num_examples, batch, processes", [(359, 128, 1), (359, 128, 2), (17, 8, 2), (8, 8, 1)])
def test_eval_batches_cover_every_example_once(num_examples, batch, processes):
    arrays = _arrays(num_examples)
    seen, counts = [], set()
    for p in range(processes):
        batches = list(data.eval_batches(arrays, batch, p, processes))
        counts.add(len(batches))
        for b in batches:
            assert b["x"].shape[0] == batch // processes
            seen.extend(b["y"][b["mask"] == 1].tolist())
    assert len(counts) == 1  # every process runs the same number of eval steps
    assert sorted(seen) == list(range(num_examples))


def test_empty_eval_split_is_an_error():
    with pytest.raises(DataError, match="eval split is empty"):
        list(data.eval_batches({"x": np.zeros((0, 2)), "y": np.zeros(0)}, 8))


@pytest.mark.parametrize("mode, shape", [("shard_map", (16, 3)), ("pmap", (8, 2, 3))])
def test_shard_batch_gives_global_arrays_over_the_data_axis(mode, shape):
    mesh = parallel.make_mesh()
    local = {"x": np.arange(48, dtype=np.float32).reshape(16, 3)}
    placed = parallel.shard_batch(local, mesh, mode)["x"]
    chex.assert_shape(placed, shape)
    assert placed.sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(placed.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(placed).reshape(16, 3), local["x"])


def test_processes_split_the_one_process_global_batch():
    """P processes read the rows of the very batches one process would read (augmentation included)."""
    images = {"x": np.random.default_rng(0).random((96, 6, 6, 1)).astype(np.float32), "y": np.arange(96)}
    def take(it, n):
        return [dict(next(it)) for _ in range(n)]

    one = take(data.train_iterator(images, 8, seed=3, crop_padding=1, random_flip=True), 15)
    parts = [take(data.train_iterator(images, 8, seed=3, process_index=i, process_count=2, crop_padding=1,
                                      random_flip=True), 15) for i in range(2)]
    for step, batch in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([parts[0][step]["y"], parts[1][step]["y"]]), batch["y"])
        np.testing.assert_array_equal(np.concatenate([parts[0][step]["x"], parts[1][step]["x"]]), batch["x"])


@pytest.mark.parametrize("chunk,threaded", [(1, True), (4, True), (4, False), (1, False)])
def test_device_prefetcher_hands_out_batches_in_order_with_the_consumer_position(chunk, threaded):
    """Several batches per transfer (split on the device) give the same batches as one per transfer, and
    the saved position after each batch is the host iterator's position right after that batch; the same
    read inline by the consumer (no thread)."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    host = data.train_iterator(_arrays(), 8, seed=3)
    expected, positions = [], []
    for _ in range(10):
        expected.append(next(host)["y"].copy())
        positions.append(host.get_state())
    prefetcher = data.DevicePrefetcher(
        data.train_iterator(_arrays(), 8, seed=3), lambda b: parallel.shard_batch(b, mesh, "single"),
        place_stack=lambda b: parallel.shard_batch(b, mesh, "single", stacked=True), chunk=chunk,
        unstack=parallel.unstack_batches, threaded=threaded)
    for want, position in zip(expected, positions):
        batch = next(prefetcher)
        assert isinstance(batch["y"], jax.Array) and batch["y"].shape == (8,)
        chex.assert_trees_all_equal(np.asarray(batch["y"]), want)
        assert json.loads(prefetcher.get_state()) == position
    prefetcher.set_state(json.dumps(positions[5]).encode())  # resume in the middle of a chunk
    chex.assert_trees_all_equal(np.asarray(next(prefetcher)["y"]), expected[6])
    prefetcher.regroup(None)  # back at the consumer's position: the batches read ahead are read again
    chex.assert_trees_all_equal(np.asarray(next(prefetcher)["y"]), expected[7])
    prefetcher.close()


def test_placed_host_batches_cannot_change_under_the_devices():
    """A CPU device may share a placed batch's host memory: the array is made read-only (a producer reusing
    it fails loudly), and a view of other memory is copied."""
    mesh = parallel.make_mesh(jax.devices())
    host = {"x": np.ones((16, 2), np.float32)}
    placed = parallel.shard_batch(host, mesh, "shard_map")
    with pytest.raises(ValueError, match="read-only"):
        host["x"][:] = 0
    view = np.zeros((32, 2), np.float32)[::2]
    from_view = parallel.shard_batch({"x": view}, mesh, "shard_map")
    view[:] = 5
    chex.assert_trees_all_equal(np.asarray(placed["x"]), np.ones((16, 2), np.float32))
    chex.assert_trees_all_equal(np.asarray(from_view["x"]), np.zeros((16, 2), np.float32))


def test_a_source_writing_to_its_indices_does_not_change_the_order(tmp_path):
    class Writing:
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return {"y": np.int32(i)}

        def gather(self, indices):
            batch = {"y": indices.astype(np.int32)}
            indices += 1000  # a source's own business: the pipeline's order must not move
            return batch

    chex.assert_trees_all_equal(_take(data.train_iterator(Writing(), 8, seed=0), 10),
                                _take(data.train_iterator({"y": np.arange(40, dtype=np.int32)}, 8, seed=0), 10))
    from PIL import Image

    from dlfx.data import images

    Image.new("RGB", (4, 3)).save(tmp_path / "a.png")  # decode takes a path object too
    assert images.decode(tmp_path / "a.png").size == (4, 3)
