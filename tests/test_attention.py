"""Attention kernels: dlfx's XLA kernel against jax.nn.dot_product_attention, the path that records the weights,
cached decoding, dropout, and which kernel each backend and config picks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlfx import config as dlfx_config
from dlfx import models
from dlfx.errors import ConfigError
from dlfx.models import transformer


def _both_paths(model, variables, x):
    """Logits with the weights only computed, and with them recorded (in `intermediates`)."""
    plain = model.apply(variables, x)
    recording, recorded = model.apply(variables, x, mutable=["intermediates"])
    assert recorded["intermediates"], "the weights are recorded"
    return plain, recording


def _kernel_calls(monkeypatch):
    """Calls of the XLA kernel, each as (records the weights, applies dropout)."""
    calls, real = [], transformer.softmax_attention

    def spy(q, k, v, mask=None, drop=None, record=None):
        calls.append((record is not None, drop is not None))
        return real(q, k, v, mask, drop, record)

    monkeypatch.setattr(transformer, "softmax_attention", spy)
    return calls


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("mask", ["causal", "none", "cache"])
def test_xla_kernel_equals_jax_attention(mask, dtype, tolerance):
    """Outputs and gradients of `softmax_attention` against JAX's own XLA attention: causal, bidirectional, and
    a cache's mask (3 new positions from position 5 against 12 keys)."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 12, 3, 8)).astype(dtype) for i in range(3))
    keep = None
    if mask == "causal":
        keep = jnp.tril(jnp.ones((12, 12), bool))[None, None]
    elif mask == "cache":
        q, keep = q[:, :3], (jnp.arange(12)[None, :] <= 5 + jnp.arange(3)[:, None])[None, None]

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v).astype(jnp.float32)))

    ours = jax.jit(lambda q, k, v: transformer.softmax_attention(q, k, v, keep))
    theirs = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=keep, implementation="xla"))
    assert ours(q, k, v).dtype == dtype
    chex.assert_trees_all_close(ours(q, k, v).astype(jnp.float32), theirs(q, k, v).astype(jnp.float32),
                                rtol=tolerance, atol=tolerance)
    chex.assert_trees_all_close(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                                jax.grad(loss(theirs), argnums=(0, 1, 2))(q, k, v), rtol=4 * tolerance,
                                atol=4 * tolerance)


def test_xla_kernel_in_bfloat16_is_as_close_to_float32_as_jax_attention():
    """Scores and the unnormalised product accumulate in float32: in bfloat16 the kernel's error against a
    float32 result is no larger than JAX's own (bfloat16 scores were ~3x worse)."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 128, 4, 64)) for i in range(3))
    q = q * 0.5
    keep = jnp.tril(jnp.ones((128, 128), bool))[None, None]
    exact = transformer.softmax_attention(q, k, v, keep)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    ours = transformer.softmax_attention(*half, keep).astype(jnp.float32)
    theirs = jax.nn.dot_product_attention(*half, mask=keep, implementation="xla").astype(jnp.float32)
    assert float(jnp.abs(ours - exact).mean()) <= 1.1 * float(jnp.abs(theirs - exact).mean())


def test_dropout_on_the_unnormalised_weights_is_dropout_on_the_weights():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 2, 4)) for i in range(3))
    kept = jax.random.bernoulli(jax.random.PRNGKey(3), 0.8, (2, 2, 6, 6))
    out = transformer.softmax_attention(q, k, v, drop=lambda w: jnp.where(kept, w / 0.8, 0))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(kept, weights / 0.8, 0), v)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, x, kwargs", [
    ("gpt", jnp.arange(24).reshape(2, 12) % 11, dict(vocab_size=11, max_len=16)),  # causal
    ("transformer", jnp.linspace(-1, 1, 2 * 12 * 3).reshape(2, 12, 3), dict(num_classes=5, max_len=16)),
    ("vit", jnp.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8, 1), dict(num_classes=5, patch_size=4)),
])
def test_recording_the_weights_leaves_the_logits_as_they_are(name, x, kwargs, monkeypatch):
    model = models.build(name, num_layers=2, num_heads=2, embed_dim=16, **kwargs)
    variables = {"params": model.init(jax.random.PRNGKey(0), x)["params"]}
    calls = _kernel_calls(monkeypatch)
    plain, recording = _both_paths(model, variables, x)
    assert calls == [(False, False)] * 2 + [(True, False)] * 2, "one XLA kernel call per layer on a CPU"
    chex.assert_trees_all_close(plain, recording, rtol=1e-5, atol=1e-5)


def test_recorded_weights_are_the_softmax_of_the_scores():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 2, 4)) for i in range(3))
    keep = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    recorded = []
    transformer.softmax_attention(q, k, v, keep, record=recorded.append)
    scores = jnp.where(keep, jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, -jnp.inf)
    chex.assert_trees_all_close(recorded[0], jax.nn.softmax(scores, axis=-1), rtol=1e-5, atol=1e-6)


def test_recording_the_weights_in_bfloat16():
    model = models.build("gpt", vocab_size=11, max_len=16, num_layers=2, num_heads=2, embed_dim=16,
                         dtype=jnp.bfloat16)
    tokens = jnp.arange(24).reshape(2, 12) % 11
    plain, recording = _both_paths(model, {"params": model.init(jax.random.PRNGKey(0), tokens)["params"]}, tokens)
    chex.assert_trees_all_close(plain, recording, rtol=0.05, atol=0.05)


def test_cached_decoding_equals_full_forward():
    model = models.build("gpt", vocab_size=13, max_len=16, num_layers=2, num_heads=2, embed_dim=16)
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    params = model.init(jax.random.PRNGKey(1), prompt)["params"]
    tokens, step_logits = transformer.generate(model, params, prompt, 6, jax.random.PRNGKey(0), temperature=0.0)
    full = model.apply({"params": params}, jnp.concatenate([prompt, tokens], axis=1))  # one pass
    chex.assert_trees_all_close(step_logits, full[:, 2:-1], rtol=1e-5, atol=1e-5)


def test_attention_dropout_applies_in_training_only(monkeypatch):
    model = models.build("gpt", vocab_size=11, max_len=16, num_layers=1, num_heads=2, embed_dim=16, dropout_rate=0.1)
    tokens = jnp.arange(12).reshape(1, 12) % 11
    variables = {"params": model.init(jax.random.PRNGKey(0), tokens)["params"]}
    calls = _kernel_calls(monkeypatch)
    trained = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    evaluated = model.apply(variables, tokens, train=False)
    assert calls == [(False, True), (False, False)]
    assert not np.allclose(trained, evaluated)  # the weights were dropped


def test_auto_picks_cudnn_only_on_a_gpu_for_half_precision(monkeypatch):
    assert transformer.fused_implementation("auto", jnp.bfloat16, 64, 128) == "xla"  # this is a CPU
    assert transformer.fused_implementation("xla", jnp.bfloat16, 64, 128) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert transformer.fused_implementation("auto", jnp.bfloat16, 64, 128) == "cudnn"
    assert transformer.fused_implementation("cudnn", jnp.bfloat16, 64, 128) == "cudnn"
    assert transformer.fused_implementation("auto", jnp.float32, 64, 128) == "xla"
    assert transformer.fused_implementation("auto", jnp.bfloat16, 160, 128) == "xla"  # head too wide for the kernel
    # JAX's cuDNN attention trains only on even lengths (a ViT's patches + cls token): auto takes XLA's
    assert transformer.fused_implementation("auto", jnp.bfloat16, 64, 197) == "xla"
    with pytest.raises(ValueError, match="trains only on an even sequence length; got 197"):
        transformer.fused_implementation("cudnn", jnp.bfloat16, 64, 197)
    assert transformer.fused_implementation("cudnn", jnp.bfloat16, 64, 1, train=False) == "xla"  # a prompt's first
    with pytest.raises(ValueError, match="flash"):
        transformer.fused_implementation("flash", jnp.bfloat16, 64, 128)


@pytest.mark.parametrize("override, message", [
    ("model.attention=flash", "config.model.attention='flash' is not one of auto, xla, cudnn, splash"),
    ("precision.compute_dtype=float16", "use 'bfloat16'"),
    ("model.attention=cudnn", "needs config.precision.compute_dtype='bfloat16'"),
])
def test_attention_and_precision_refused_up_front(repo_root, override, message):
    with pytest.raises(ConfigError, match=message):
        dlfx_config.load(f"{repo_root}/configs/char_gpt.py", [override])


def test_cudnn_runs_train_only_on_a_gpu_but_evaluate_anywhere(repo_root, tmp_path):
    from dlfx import runner

    config = dlfx_config.load(f"{repo_root}/configs/char_gpt.py", ["model.attention=cudnn",
                                                                   "precision.compute_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        runner.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert transformer.fused_implementation("cudnn", jnp.bfloat16, 64, 128) == "xla"  # restoring such a run on a CPU


def test_attention_choice_is_a_model_key(repo_root):
    config = dlfx_config.load(f"{repo_root}/configs/char_gpt.py", ["model.attention=xla"])
    assert config.model.attention == "xla"


def test_gpt2_124m_config_has_gpt2_small_shape(repo_root):
    config = dlfx_config.load(f"{repo_root}/configs/gpt2_124m.py")
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    model = models.build("gpt", vocab_size=50257, dtype=jnp.bfloat16, **kwargs)  # GPT-2's own vocabulary
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 124_439_808  # GPT-2 small, tied head


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_equals_xla_attention(causal):
    """The Pallas splash kernel, run by the Pallas interpreter on this CPU: outputs and gradients."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 128, 2, 32)) for i in range(3))

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))

    def splash(q, k, v):
        return transformer.splash_attention(q, k, v, causal, interpret=True)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)

    chex.assert_trees_all_close(jax.jit(splash)(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v),
                                jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v), rtol=1e-4, atol=1e-4)
    if causal:  # inside the shard_map step (check_vma off, as dlfx runs it): each device attends its rows
        from jax.sharding import Mesh, PartitionSpec as P

        mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
        per_device = jax.jit(jax.shard_map(splash, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                           check_vma=False))
        chex.assert_trees_all_close(per_device(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"multiple of 128; got inputs of shape \(2, 96, 2, 32\)"):
        transformer.splash_attention(q[:, :96], k[:, :96], v[:, :96], causal, interpret=True)


def test_splash_is_chosen_on_a_tpu_and_runs_inside_the_model(repo_root, tmp_path, monkeypatch):
    assert transformer.fused_implementation("splash", jnp.bfloat16, 64, 128) == "xla"  # off a TPU: the same math
    model = models.build("gpt", vocab_size=11, max_len=128, num_layers=1, num_heads=2, embed_dim=16,
                         attention="splash")
    tokens = jnp.arange(256).reshape(2, 128) % 11
    variables = {"params": model.init(jax.random.PRNGKey(0), tokens)["params"]}
    on_cpu = model.apply(variables, tokens)
    monkeypatch.setattr(transformer, "fused_implementation", lambda *args: "splash")  # as on a TPU
    calls, real = [], transformer.splash_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer, "splash_attention", spy)
    chex.assert_trees_all_close(model.apply(variables, tokens), on_cpu, rtol=1e-5, atol=1e-5)
    assert calls == [{"interpret": True}]  # the kernel ran (interpreted, as this is no TPU)
    prompt = tokens[:, :5]  # sampling on a TPU: decoding goes through XLA, prompts of any length
    sampled, _ = transformer.generate(model, variables["params"], prompt, 4, jax.random.PRNGKey(0), temperature=0.0)
    assert sampled.shape == (2, 4) and len(calls) == 1

    from dlfx import runner

    for overrides, message in [(["data.seq_len=100"], "config.data.seq_len to be a multiple of 128, got 100"),
                               (["parallel.mode=fsdp"], "not 'fsdp'")]:
        with pytest.raises(ConfigError, match=message):
            dlfx_config.load(f"{repo_root}/configs/char_gpt.py", ["model.attention=splash", *overrides])
    config = dlfx_config.load(f"{repo_root}/configs/char_gpt.py", ["model.attention=splash"])
    with pytest.raises(ConfigError, match="needs a TPU, but this run's backend is cpu"):
        runner.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_position_rows_on_a_gpu_are_gathered_and_differentiate_like_a_slice(monkeypatch):
    """add_positions on a GPU: the rows are gathered (their wpe gradient a scatter-add, which keeps XLA:GPU's
    activation layout batch-major), with the values, gradients and forward-mode tangents of x + wpe[:T], in
    float32 and cast to bfloat16; decoding and the CPU path slice."""
    kx, kp, kt, ku = jax.random.split(jax.random.key(0), 4)
    x, wpe = jax.random.normal(kx, (3, 5, 4)), jax.random.normal(kp, (7, 4))
    start = jnp.zeros((), jnp.int32)

    def loss(add, x, wpe):
        return jnp.sum(jnp.tanh(add(x, wpe)) ** 2)

    def plain(x, wpe):
        return x + wpe[:5]

    def ours(x, wpe):
        return transformer.add_positions(x, wpe, start, False)

    def ours16(x, wpe):
        return transformer.add_positions(x, wpe, start, False, jnp.bfloat16).astype(jnp.float32)

    def plain16(x, wpe):
        return plain(x, wpe).astype(jnp.bfloat16).astype(jnp.float32)

    assert "gather" not in str(jax.make_jaxpr(lambda x, w: ours(x, w))(x, wpe))  # XLA:CPU: the slice
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "gather" in str(jax.make_jaxpr(ours)(x, wpe))
    assert "scatter-add" in str(jax.make_jaxpr(jax.grad(lambda w: loss(ours, x, w)))(wpe))
    tangents = (jax.random.normal(kt, x.shape), jax.random.normal(ku, wpe.shape))
    for add, reference in ((ours, plain), (ours16, plain16)):
        chex.assert_trees_all_close(add(x, wpe), reference(x, wpe))
        chex.assert_trees_all_close(jax.grad(loss, argnums=(1, 2))(add, x, wpe),
                                    jax.grad(loss, argnums=(1, 2))(reference, x, wpe), rtol=1e-6)
        chex.assert_trees_all_close(jax.jvp(add, (x, wpe), tangents), jax.jvp(reference, (x, wpe), tangents),
                                    rtol=1e-6)
    decoded = transformer.add_positions(x, wpe, jnp.asarray(2, jnp.int32), True)
    chex.assert_trees_all_close(decoded, x + wpe[2:7])
    assert "gather" not in str(jax.make_jaxpr(lambda x, w: transformer.add_positions(x, w, 2, True))(x, wpe))
    with pytest.raises(ValueError, match=r"positions 0..7 asked of a position table of 7 rows"):
        transformer.add_positions(jnp.zeros((1, 8, 4)), wpe)
    for length, first in ((-1, 0), (4, 6), (2, -1)):
        with pytest.raises(ValueError, match="asked of a position table of 7 rows"):
            transformer.position_rows(wpe, length, first, decode=True)


@pytest.mark.parametrize("remat,scan_layers", [(False, False), (True, True)])
def test_gpt_gpu_code_paths_train_like_the_cpu_ones(monkeypatch, remat, scan_layers):
    """The GPT's GPU-only pieces together (gathered position rows, recomputed GELU gradient), under
    remat and scanned layers, bfloat16 compute: the same loss, gradients and forward-mode tangent as the plain
    code paths."""
    model = transformer.GPT(vocab_size=11, max_len=8, num_layers=2, num_heads=2, embed_dim=16, remat=remat,
                            scan_layers=scan_layers, attention="xla", dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 8), 0, 11)
    params = model.init(jax.random.PRNGKey(1), tokens)

    results, forward = {}, {}
    for backend in ("cpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)

        def loss(params):  # a new function per backend: make_jaxpr caches its trace per function
            return jnp.mean(model.apply(params, tokens).astype(jnp.float32) ** 2)

        tangent = jax.tree.map(jnp.ones_like, params)
        results[backend] = jax.value_and_grad(loss)(params), jax.jvp(loss, (params,), (tangent,))
        forward[backend] = str(jax.make_jaxpr(loss)(params))
    chex.assert_trees_all_close(results["gpu"], results["cpu"], rtol=2e-2, atol=2e-3)
    # the GPU paths were taken: the gathered position rows, and a checkpoint (remat2) per GELU
    assert forward["gpu"].count("gather[") == forward["cpu"].count("gather[") + 1  # both: the token lookup
    assert forward["gpu"].count("remat2") > forward["cpu"].count("remat2")
