"""The model zoo: standard sizes, causality, KV-cache decoding, recurrent generation, options."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfx import losses, models
from dlfx.models import rnn, transformer


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                            ("resnet50", 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(name, expected):
    model = models.build(name, num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    assert _count(shapes["params"]) == expected


def test_resnet_names_follow_torchvision():
    shapes = jax.eval_shape(lambda: models.build("resnet50", num_classes=10).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    assert set(shapes["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
    assert shapes["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)  # v1.5: stride sits on the 3x3 conv
    assert shapes["conv1"]["kernel"].shape == (7, 7, 3, 64) and shapes["head"]["kernel"].shape == (2048, 10)


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 40, 1), (2, 40)])
def test_small_resnet_on_tiny_images_and_sequences(shape):
    model = models.build("resnet18", num_classes=5, width=8, stem="cifar", drop_path_rate=0.2)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    chex.assert_shape(model.apply(variables, x), (2, 5))
    # stochastic depth drops different blocks for different keys (2 examples x 8 blocks at rate 0.2: two keys
    # alone give the same 16 draws ~0.5 % of the time, as keys 2 and 3 do here; four keys all alike, ~1e-7)
    outs = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)}, mutable=["batch_stats"])[0]
            for k in (2, 3, 4, 5)]
    assert not all(np.allclose(outs[0], other) for other in outs[1:])


def test_resnet_zero_init_last_bn():
    variables = models.build("resnet18", width=8, stem="cifar", zero_init_last_bn=True).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    assert float(jnp.abs(variables["params"]["layer1_0"]["bn2"]["scale"]).max()) == 0.0
    assert float(variables["params"]["layer1_0"]["bn1"]["scale"].min()) == 1.0


def _gpt(**kw):
    return models.build("gpt", vocab_size=37, max_len=24, num_layers=2, num_heads=2, embed_dim=16, **kw)


def test_gpt_is_causal():
    model = _gpt()
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 37)
    variables = model.init(jax.random.PRNGKey(1), tokens)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 5) % 37)
    a, b = model.apply(variables, tokens), model.apply(variables, changed)
    chex.assert_trees_all_close(a[:, :9], b[:, :9], atol=1e-6)
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_gpt_head_is_tied_to_the_embedding():
    params = _gpt().init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert "head" not in params and params["wte"]["embedding"].shape == (37, 16)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_generation_equals_uncached_greedy_decoding(scan_layers):
    model = _gpt(scan_layers=scan_layers)
    prompt = jax.random.randint(jax.random.PRNGKey(0), (3, 5), 0, 37)
    params = model.init(jax.random.PRNGKey(1), prompt)["params"]
    tokens, logits = transformer.generate(model, params, prompt, 6, jax.random.PRNGKey(2), temperature=0.0)
    sequence, reference = prompt, []
    for _ in range(6):
        last = model.apply({"params": params}, sequence)[:, -1]
        reference.append(last)
        sequence = jnp.concatenate([sequence, jnp.argmax(last, -1)[:, None].astype(jnp.int32)], axis=1)
    chex.assert_trees_all_equal(tokens, sequence[:, 5:])
    chex.assert_trees_all_close(logits, jnp.stack(reference, axis=1), rtol=1e-5, atol=1e-5)


def test_generate_refuses_to_run_past_max_len():
    model = _gpt()
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="exceeds max_len=24"):
        transformer.generate(model, params, jnp.zeros((1, 20), jnp.int32), 10, jax.random.PRNGKey(0))


def test_remat_changes_memory_not_math():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 37)
    plain, remat = _gpt(), _gpt(remat=True)
    params = plain.init(jax.random.PRNGKey(1), tokens)["params"]

    def loss(model, p):
        return losses.classification_loss(model.apply({"params": p}, tokens), tokens)[0]

    chex.assert_trees_all_close(jax.grad(lambda p: loss(plain, p))(params),
                                jax.grad(lambda p: loss(remat, p))(params), rtol=1e-5, atol=1e-6)


def test_scan_layers_stacks_parameters():
    params = _gpt(scan_layers=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert params["h"]["h"]["block"]["attn"]["qkv"]["kernel"].shape == (2, 16, 48)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_generation_equals_step_by_step_greedy(cell):
    model = models.build(cell, vocab_size=29, hidden_dim=16, num_layers=2)
    prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 4), 0, 29)
    params = model.init(jax.random.PRNGKey(1), prompt)["params"]
    tokens, _ = rnn.generate(model, params, prompt, 7, jax.random.PRNGKey(2), temperature=0.0)
    sequence = prompt
    for _ in range(7):
        last = model.apply({"params": params}, sequence)[:, -1]
        sequence = jnp.concatenate([sequence, jnp.argmax(last, -1)[:, None].astype(jnp.int32)], axis=1)
    chex.assert_trees_all_equal(tokens, sequence[:, 4:])
    sampled, _ = rnn.generate(model, params, prompt, 7, jax.random.PRNGKey(2), temperature=1.0)
    chex.assert_shape(sampled, (2, 7))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_classifier_bidirectional_and_stacked(cell):
    model = models.build(cell, num_classes=10, hidden_dim=8, num_layers=2, bidirectional=True)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 40, 1)))
    chex.assert_shape(model.apply(variables, jnp.ones((2, 40, 1))), (2, 10))
    assert {"cell0_forward", "cell0_backward", "cell1_forward", "cell1_backward"} <= set(variables["params"])
    with pytest.raises(ValueError, match="cannot be bidirectional"):
        models.build(cell, vocab_size=5, bidirectional=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))


@pytest.mark.parametrize("pool, tokens", [("cls", 17), ("mean", 16)])
def test_vit_shapes(pool, tokens):
    model = models.build("vit", num_classes=10, patch_size=2, num_layers=2, num_heads=2, embed_dim=16, pool=pool)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))
    chex.assert_shape(model.apply(variables, jnp.ones((2, 8, 8, 1))), (2, 10))
    assert variables["params"]["pos_embed"].shape == (1, tokens, 16)
    with pytest.raises(ValueError, match="not divisible into 3-pixel patches"):
        models.build("vit", patch_size=3, num_layers=1, num_heads=1, embed_dim=4).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


def test_transformer_encoder_on_sequences_and_tokens():
    model = models.build("transformer", num_classes=10, max_len=40, num_layers=2, num_heads=2, embed_dim=16)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 40, 1)))
    chex.assert_shape(model.apply(variables, jnp.ones((2, 40, 1))), (2, 10))
    tokens = models.build("transformer", num_classes=3, vocab_size=11, max_len=8, num_layers=1, num_heads=1, embed_dim=8)
    v = tokens.init(jax.random.PRNGKey(0), jnp.zeros((2, 8), jnp.int32))
    chex.assert_shape(tokens.apply(v, jnp.ones((2, 8), jnp.int32)), (2, 3))


def test_label_smoothing_matches_its_definition():
    logits = jnp.array([[4.0, 0.0, -2.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    eps = 0.3
    expected = -((1 - eps + eps / 3) * log_p[0] + (eps / 3) * (log_p[1] + log_p[2]))
    np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([0]), eps)[0], expected, rtol=1e-6)


def test_per_token_eval_sums_weigh_examples_equally():
    logits = jnp.zeros((2, 3, 4)).at[0, :, 1].set(10.0)
    labels = jnp.ones((2, 3), jnp.int32)
    sums = losses.masked_sums(logits, labels, jnp.array([1.0, 0.0]))
    assert float(sums["accuracy"]) == 1.0 and float(sums["count"]) == 1.0
