"""Hugging Face GPT-2 and ViT (`config.json` + `model.safetensors`) -> dlfx GPT and ViT."""

from __future__ import annotations

import re

import numpy as np

from dlfx.errors import TransferError
from dlfx.models.transformer import GPT
from dlfx.models.vit import ViT

NORM_LEAF = {"weight": "scale", "bias": "bias"}  # torch LayerNorm -> flax LayerNorm
DENSE_LEAF = {"weight": "kernel", "bias": "bias"}  # torch Linear / Conv1D -> flax Dense

_GELU = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


def _gelu(config: dict, key: str) -> bool:
    act = config.get(key, "gelu")
    if act not in _GELU:
        raise TransferError(f"config.json {key}={act!r} is not supported (one of {', '.join(_GELU)})")
    return _GELU[act]


def _entries(state: dict[str, np.ndarray], prefix: str):
    """(source name, name without `prefix`, module path, leaf name, array) for every tensor."""
    for name, value in state.items():
        key = name.removeprefix(prefix)
        module, _, leaf = key.rpartition(".")
        yield name, key, module, leaf, value


def gpt2(state: dict[str, np.ndarray], config: dict) -> tuple[GPT, dict[str, np.ndarray], list[str]]:
    """GPT-2 (`GPT2Model` or `GPT2LMHeadModel`): Conv1D weights are already (in, out); the head is tied."""
    embed = config["n_embd"]
    model = GPT(vocab_size=config["vocab_size"], max_len=config["n_positions"], num_layers=config["n_layer"],
                num_heads=config["n_head"], embed_dim=embed, mlp_dim=config.get("n_inner") or 4 * embed,
                layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
                gelu_approximate=_gelu(config, "activation_function"))
    names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn/qkv", "attn.c_proj": "attn/proj",
             "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}
    flat, unused = {}, []
    for name, key, module, leaf, value in _entries(state, "transformer."):
        if key == "wte.weight":
            flat["params/wte/embedding"] = value
        elif key == "wpe.weight":
            flat["params/wpe"] = value
        elif module == "ln_f":
            flat[f"params/ln_f/{NORM_LEAF[leaf]}"] = value
        elif (m := re.fullmatch(r"h\.(\d+)\.(.+)", module)) and m.group(2) in names:
            target = f"params/h/h_{m.group(1)}/{names[m.group(2)]}"
            if m.group(2).startswith("ln"):
                flat[f"{target}/{NORM_LEAF[leaf]}"] = value
            else:
                flat[f"{target}/{DENSE_LEAF[leaf]}"] = value
        elif key == "lm_head.weight" or re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", key):
            continue  # tied to wte / causal-mask buffers
        else:
            unused.append(name)
    return model, flat, unused


def vit(state: dict[str, np.ndarray], config: dict) -> tuple[ViT, dict[str, np.ndarray], list[str]]:
    """ViT (`ViTModel` or `ViTForImageClassification`): q/k/v Linears fuse into one `qkv` kernel."""
    if config.get("qkv_bias", True) is False:
        raise TransferError("config.json qkv_bias=false is not supported (dlfx attention has q/k/v biases)")
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else len(
        config.get("id2label") or {}) or 1000
    model = ViT(num_classes=num_classes, patch_size=config["patch_size"], num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"], embed_dim=config["hidden_size"],
                mlp_dim=config["intermediate_size"], pool="cls", layer_norm_epsilon=config.get("layer_norm_eps", 1e-12),
                gelu_approximate=_gelu(config, "hidden_act"))
    layer_names = {"layernorm_before": "ln1", "layernorm_after": "ln2", "attention.output.dense": "attn/proj",
                   "intermediate.dense": "fc1", "output.dense": "fc2"}
    flat, unused, qkv = {}, [], {}
    for name, key, module, leaf, value in _entries(state, "vit."):
        if key == "embeddings.cls_token":
            flat["params/cls_token"] = value
        elif key == "embeddings.position_embeddings":
            flat["params/pos_embed"] = value
        elif module == "embeddings.patch_embeddings.projection":
            flat[f"params/patch_embed/{DENSE_LEAF[leaf]}"] = value.transpose(2, 3, 1, 0) if leaf == "weight" else value
        elif module in ("layernorm", "classifier"):
            target = "ln_f" if module == "layernorm" else "head"
            is_norm = module == "layernorm"
            flat[f"params/{target}/{(NORM_LEAF if is_norm else DENSE_LEAF)[leaf]}"] = (
                value.T if leaf == "weight" and not is_norm else value)
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module):
            layer, sub = m.groups()
            base = f"params/h/h_{layer}"
            if sub in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                qkv.setdefault(layer, {})[(sub.rsplit(".", 1)[1], leaf)] = value
            elif sub in layer_names and sub.startswith("layernorm"):
                flat[f"{base}/{layer_names[sub]}/{NORM_LEAF[leaf]}"] = value
            elif sub in layer_names:
                flat[f"{base}/{layer_names[sub]}/{DENSE_LEAF[leaf]}"] = value.T if leaf == "weight" else value
            else:
                unused.append(name)
        else:
            unused.append(name)
    for layer, parts in qkv.items():  # torch Linear (out, in) -> one (in, 3*out) kernel, q|k|v
        try:
            flat[f"params/h/h_{layer}/attn/qkv/kernel"] = np.concatenate(
                [parts[(p, "weight")].T for p in ("query", "key", "value")], axis=1)
            flat[f"params/h/h_{layer}/attn/qkv/bias"] = np.concatenate(
                [parts[(p, "bias")] for p in ("query", "key", "value")])
        except KeyError as e:
            raise TransferError(f"ViT layer {layer} lacks attention {e.args[0]}") from None
    return model, flat, unused
