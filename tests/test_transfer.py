"""Transfer learning: dlfx -> dlfx with a new head, shape-mismatch reports, freezing, foreign imports."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from dlfx import config as config_lib, experiment, inspection, optim, runner, transfer
from dlfx.errors import ConfigError, TransferError
from dlfx.models import ViT


def cnn_config(repo_root, *overrides):
    base = ["model.features=(8, 16)", "model.hidden_dim=32", "data.batch_size=64", "train.epochs=0",
            "train.steps=10", "train.checkpoint_every=10", "train.log_every=5", "optimizer.warmup_steps=2"]
    return config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), base + list(overrides))


@pytest.fixture(scope="module")
def pretrained(repo_root, tmp_path_factory):
    """A digits CNN trained on classes 0-4 only (5 outputs)."""
    workdir = str(tmp_path_factory.mktemp("pre") / "run")
    summary = runner.train(cnn_config(repo_root, "data.classes=(0, 1, 2, 3, 4)"), workdir)
    variables = {"params": summary["state"].params, "batch_stats": summary["state"].batch_stats}
    return workdir, jax.device_get(variables)


def test_fine_tune_takes_backbone_and_keeps_fresh_head(repo_root, pretrained):
    workdir, source = pretrained
    config = cnn_config(repo_root, f"init_from.path={workdir}", "init_from.skip=('head/.*',)")
    exp = experiment.build(config)  # 10 classes: the head shape differs from the source's 5
    fresh_state = exp.init()
    fresh = jax.device_get(fresh_state.params)
    state = experiment.init_from_pretrained(exp, fresh_state)
    params, stats = jax.device_get(state.params), jax.device_get(state.batch_stats)
    assert params["head"]["kernel"].shape == (32, 10)
    chex.assert_trees_all_equal(params["head"], fresh["head"])
    for name in ("conv1", "conv2", "dense"):
        chex.assert_trees_all_equal(params[name], source["params"][name])
    chex.assert_trees_all_equal(stats, source["batch_stats"])


def test_mismatch_lists_every_path_and_changes_nothing(repo_root, pretrained):
    workdir, _ = pretrained
    exp = experiment.build(cnn_config(repo_root, "model.hidden_dim=48", f"init_from.path={workdir}"))
    fresh_state = exp.init()
    before = jax.device_get(fresh_state.params)
    with pytest.raises(TransferError) as e:
        experiment.init_from_pretrained(exp, fresh_state)
    message = str(e.value)
    for path in ("params/dense/kernel", "params/dense/bias", "params/head/kernel", "params/head/bias"):
        assert path in message
    assert "4 shape mismatches" in message and "\n" not in message
    chex.assert_trees_all_equal(jax.device_get(fresh_state.params), before)


def test_merge_reports_missing_and_unused():
    variables = {"params": {"a": {"kernel": np.zeros((2, 3))}, "b": {"bias": np.zeros(4)}}}
    source = {"params/a/kernel": np.ones((2, 3)), "params/extra/kernel": np.ones(2)}
    with pytest.raises(TransferError, match=r"missing from the source: params/b/bias"):
        transfer.merge(variables, source)
    merged, unused = transfer.merge(variables, source, load=["a/.*"])
    assert unused == ["params/extra/kernel"]
    np.testing.assert_array_equal(merged["params"]["a"]["kernel"], 1.0)
    np.testing.assert_array_equal(variables["params"]["a"]["kernel"], 0.0)  # input untouched
    with pytest.raises(TransferError, match="matches no parameter"):
        transfer.merge(variables, source, load=["nothing/.*"])


def test_linear_probe_freezes_backbone_bit_exactly(repo_root, pretrained, tmp_path, capsys):
    workdir, source = pretrained
    frozen = "('conv.*', 'bn.*', 'dense/.*')"
    config = cnn_config(repo_root, f"init_from.path={workdir}", "init_from.skip=('head/.*',)",
                        f"optimizer.freeze={frozen}", "model.freeze_bn=True", "optimizer.weight_decay=0.1")
    summary = runner.train(config, str(tmp_path / "probe"))
    params, stats = jax.device_get(summary["state"].params), jax.device_get(summary["state"].batch_stats)
    for name in ("conv1", "conv2", "dense"):
        chex.assert_trees_all_equal(params[name], source["params"][name])
    chex.assert_trees_all_equal(stats, source["batch_stats"])
    fresh = jax.device_get(experiment.build(config).init().params)
    assert not np.allclose(params["head"]["kernel"], fresh["head"]["kernel"])  # the head trained
    trainable, frozen_count = optim.count_frozen(params, config.optimizer.freeze)
    assert trainable == 32 * 10 + 10 and frozen_count > trainable
    assert f"{trainable:,} trainable, {frozen_count:,} frozen" in capsys.readouterr().err


def test_freeze_pattern_that_matches_nothing_is_an_error(repo_root):
    with pytest.raises(ConfigError, match=r"optimizer.freeze: 'backbone/\.\*' matches no parameter"):
        experiment.build(cnn_config(repo_root, "optimizer.freeze=('backbone/.*',)"))


def test_vit_position_embeddings_resize_keeps_cls():
    small = ViT(num_classes=3, patch_size=2, num_layers=1, num_heads=2, embed_dim=8)
    large = small.clone(num_classes=5)
    src = small.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)))  # 4x4 grid
    dst = large.init(jax.random.PRNGKey(1), np.zeros((1, 16, 16, 1)))  # 8x8 grid
    merged, _ = transfer.merge(jax.device_get(dst), transfer.flatten(jax.device_get(src)), skip=["head/.*"])
    pos = merged["params"]["pos_embed"]
    assert pos.shape == (1, 65, 8)
    np.testing.assert_array_equal(pos[0, 0], np.asarray(src["params"]["pos_embed"])[0, 0])
    grid = pos[0, 1:].reshape(8, 8, 8)  # a constant source grid stays constant after interpolation
    assert np.isfinite(grid).all() and not np.allclose(grid, 0)
    large.apply(merged, np.zeros((2, 16, 16, 1)))


# --- Foreign formats: sources built locally with random weights (no network) ---------------------------------


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("arch,suffix", [("resnet18", ".safetensors"), ("resnet50", ".pt")])
def test_torchvision_resnet_import_gives_same_outputs(tmp_path, arch, suffix):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=7).eval()
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    path = str(tmp_path / f"{arch}{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(net.state_dict(), path)
    else:
        torch.save(net.state_dict(), path)
    model, variables = transfer.import_weights(path, "torchvision_resnet")
    assert model.depth == int(arch[6:]) and model.num_classes == 7
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert _max_diff(model.apply(variables, x.transpose(0, 2, 3, 1)), expected) < 1e-4


def test_hf_gpt2_import_gives_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    net.save_pretrained(str(tmp_path / "gpt2"))
    model, variables = transfer.import_weights(str(tmp_path / "gpt2"), "hf_gpt2")
    assert (model.vocab_size, model.num_layers, model.embed_dim, model.max_len) == (97, 2, 48, 32)
    tokens = np.random.RandomState(0).randint(0, 97, (2, 16))
    with torch.no_grad():
        expected = net(torch.from_numpy(tokens)).logits.numpy()
    assert _max_diff(model.apply(variables, tokens), expected) < 1e-4
    shapes = inspection.read_shapes(str(tmp_path / "gpt2"))  # `dlfx inspect` on an HF folder
    assert shapes["transformer/wte/weight"][0] == (97, 48)


def test_hf_vit_import_gives_same_logits_and_fine_tunes_at_another_size(repo_root, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    net = transformers.ViTForImageClassification(config).eval()
    folder = str(tmp_path / "vit")
    net.save_pretrained(folder)
    model, variables = transfer.import_weights(folder, "hf_vit")
    x = np.random.RandomState(0).randn(2, 1, 16, 16).astype(np.float32)
    with torch.no_grad():
        expected = net(pixel_values=torch.from_numpy(x)).logits.numpy()
    assert _max_diff(model.apply(variables, x.transpose(0, 2, 3, 1)), expected) < 1e-4
    # fine-tune on 8x8 digits (4x4 grid instead of 8x8) with a fresh 10-class head
    overrides = ["model.num_layers=2", "model.embed_dim=32", "model.mlp_dim=64", "model.layer_norm_epsilon=1e-12",
                 "train.epochs=0", "train.steps=3", "optimizer.warmup_steps=1", "data.batch_size=64",
                 f"init_from.path={folder}", "init_from.format=hf_vit", "init_from.skip=('head/.*',)"]
    cfg = config_lib.load(os.path.join(repo_root, "configs/digits_vit.py"), overrides)
    built = experiment.build(cfg)
    state = experiment.init_from_pretrained(built, built.init())
    pos = np.asarray(jax.device_get(state.params["pos_embed"]))
    assert pos.shape == (1, 17, 32)
    np.testing.assert_allclose(pos[0, 0], variables["params"]["pos_embed"][0, 0])
    summary = runner.train(cfg, str(tmp_path / "ft"))
    assert summary["status"] == "finished" and np.isfinite(summary["train"]["loss"])


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(TransferError, match="no such file"):
        transfer.load_pretrained({"params": {}}, {"path": str(tmp_path / "none"), "format": "dlfx"})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"n_embd": 8}))
    with pytest.raises(TransferError, match="holds no model.safetensors"):
        transfer.import_weights(str(tmp_path / "hf"), "hf_gpt2")
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TransferError, match="not a readable safetensors"):
        transfer.import_weights(str(tmp_path / "w.safetensors"), "torchvision_resnet")
    (tmp_path / "w.npz").write_bytes(b"weights")  # a file where a dlfx run folder is expected
    with pytest.raises(TransferError, match=r"w.npz is a file, not a dlfx run or checkpoint folder .init_from.format"):
        transfer.load_pretrained({"params": {}}, {"path": str(tmp_path / "w.npz"), "format": "dlfx"})
    for text, why in [("{not json", "does not read as JSON"), ("[]", "must hold a JSON object, not a list")]:
        (tmp_path / "hf" / "config.json").write_text(text)
        with pytest.raises(TransferError, match=why):
            transfer.import_weights(str(tmp_path / "hf"), "hf_gpt2")
    from safetensors.numpy import save_file

    (tmp_path / "hf" / "config.json").write_text(json.dumps({"n_embd": 8, "n_head": 2, "n_layer": 1,
                                                             "n_positions": 16, "vocab_size": 11}))
    save_file({"foo.bar": np.zeros(3, np.float32)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(TransferError, match="none of the source.s tensors maps to a dlfx model"):
        transfer.import_weights(str(tmp_path / "hf"), "hf_gpt2")


def test_sampling_at_a_tiny_temperature_is_greedy_and_cli_ranges_are_checked_before_use():
    from dlfx import interpret, plot
    from dlfx.models.transformer import sample_logits

    logits = jax.numpy.array([[1.0, 2.0, 3.0, -1.0]])
    for temperature in (0.0, 1e-30, 1e-40, 1e-300):  # float32 turns the last two into 0: greedy, not token 0
        assert int(sample_logits(logits, jax.random.PRNGKey(0), temperature)[0]) == 2
    with pytest.raises(ConfigError, match=r"--index '0..1000000000000': indices must be in \[0, 10\)$"):
        interpret.parse_indices("0..1000000000000", 10)  # refused before a list of 10^12 is built
    with pytest.raises(ConfigError, match=r"bad: 10, 11, 12, 13, 14, ... \(90 in all\)"):
        interpret.parse_indices(",".join(map(str, range(100))), 10)
    with pytest.raises(ConfigError, match="-o is empty"):
        plot.output_path("")
