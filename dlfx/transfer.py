"""Pretrained parameters: read a source (dlfx run, torchvision ResNet, HF GPT-2/ViT) and merge it into a fresh init.

One path for every format: a source becomes a flat `collection/a/b/c -> array` dict, and `merge` takes
the parameters that `load` selects and `skip` does not from it, refusing any shape mismatch up front.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from dlfx import convert
from dlfx.errors import CheckpointError, TransferError, one_line
from dlfx.inspection import path_str

FORMATS = ("dlfx", "torchvision_resnet", "hf_gpt2", "hf_vit")
COLLECTIONS = ("params", "batch_stats")
log = logging.getLogger("dlfx")


def flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
    """`{'params': {...}, 'batch_stats': {...}}` -> `{'params/a/b': leaf, 'batch_stats/a/b': leaf}`."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`: nested plain dicts."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _matches(path: str, patterns: Iterable[str]) -> bool:
    """True if any regex matches the whole parameter path (written without its collection)."""
    return any(re.fullmatch(p, path) for p in patterns)


def _compile(patterns: Iterable[str], key: str) -> list[str]:
    patterns = list(patterns)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise TransferError(f"config.init_from.{key}: {p!r} is not a valid regex ({e})") from None
    return patterns


# --- Sources ---------------------------------------------------------------------------------------------


def _dlfx_step_dirs(path: str, step: int) -> list[str]:
    """Candidate `<step>/state` folders under a workdir, checkpoints folder or step folder, newest first."""
    path = os.path.abspath(path)  # Orbax reads no metadata through a relative path
    if not os.path.isdir(path):
        raise TransferError(f"init_from: {path} is a file, not a dlfx run or checkpoint folder (init_from.format "
                            f"says what it holds: one of {', '.join(FORMATS)})")
    if os.path.isdir(os.path.join(path, "state")):
        return [os.path.join(path, "state")]
    ckpt = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted((int(d) for d in os.listdir(ckpt) if d.isdigit()), reverse=True)
    if step >= 0:
        if step not in steps:
            raise TransferError(f"init_from: no checkpoint at step {step} in {ckpt} (saved: {sorted(steps)})")
        steps = [step]
    if not steps:
        raise TransferError(f"init_from: no checkpoint in {ckpt}")
    return [os.path.join(ckpt, str(s), "state") for s in steps]


def _read_dlfx(path: str, step: int) -> dict[str, np.ndarray]:
    """Params and batch stats of a dlfx checkpoint (newest valid step, or `step`) as host arrays."""
    import orbax.checkpoint as ocp

    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    errors = []
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that sub-items lack their own metadata file
    try:
        for state_dir in _dlfx_step_dirs(path, step):
            try:
                checkpointer = ocp.StandardCheckpointer()
                item = checkpointer.metadata(state_dir).item_metadata
                if item is None:
                    raise ValueError("its metadata does not read back (damaged or cut-off files)")
                meta = item.tree
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta)
                state = checkpointer.restore(state_dir, target)  # any saved device count restores here
            except Exception as e:  # an unreadable step: try the previous one, like resume does
                errors.append(f"{state_dir}: {one_line(e)}")
                log.warning("init_from: cannot read %s; trying an older step", state_dir)
                continue
            return {k: np.asarray(v) for k, v in flatten({c: state[c] for c in COLLECTIONS if c in state}).items()}
    finally:
        absl_logger.setLevel(level)
    raise TransferError(f"init_from: no readable checkpoint under {path} ({'; '.join(errors)})")


def _read_hf_folder(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """`config.json` and the weights (`model.safetensors`, else `pytorch_model.bin`) of a Hugging Face folder."""
    if not os.path.isdir(path):
        raise TransferError(f"init_from: {path} is not a Hugging Face model folder")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise TransferError(f"init_from: {config_path} not found (a Hugging Face folder holds config.json)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferError(f"init_from: {config_path} does not read as JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise TransferError(f"init_from: {config_path} must hold a JSON object, not a {type(config).__name__}")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return convert.read_state_dict(os.path.join(path, name)), config
    raise TransferError(f"init_from: {path} holds no model.safetensors or pytorch_model.bin")


def _read_foreign(path: str, format: str) -> tuple[Any, dict[str, np.ndarray], list[str]]:
    """(matching dlfx model, flat source, unused source names) for a non-dlfx format."""
    if format == "torchvision_resnet":
        return convert.resnet(convert.read_state_dict(path))
    state, config = _read_hf_folder(path)
    try:
        return convert.gpt2(state, config) if format == "hf_gpt2" else convert.vit(state, config)
    except KeyError as e:
        raise TransferError(f"init_from: {path} is not a {format} model: config.json lacks {e.args[0]!r}") from None


def read_source(path: str, format: str = "dlfx", step: int = -1) -> dict[str, np.ndarray]:
    """A pretrained source as a flat `collection/a/b -> array` dict (dlfx format: newest valid step, or `step`)."""
    if format not in FORMATS:
        raise TransferError(f"config.init_from.format={format!r} is not one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise TransferError(f"init_from: no such file or folder: {path}")
    if format == "dlfx":
        try:
            return _read_dlfx(path, step)
        except CheckpointError as e:
            raise TransferError(str(e)) from None
    _, flat, unused = _read_foreign(path, format)
    if unused:
        log.warning("init_from: %d source tensors have no dlfx counterpart: %s", len(unused), ", ".join(unused[:10]))
    return flat


# --- Merge -------------------------------------------------------------------------------------------------


def _resize_posemb(source: np.ndarray, target_shape: tuple[int, ...], has_cls: bool) -> np.ndarray | None:
    """ViT position embeddings (1, [cls +] gh*gw, E) resized on the 2-D grid; None if not a square grid."""
    if source.ndim != 3 or len(target_shape) != 3 or source.shape[2] != target_shape[2]:
        return None
    prefix = 1 if has_cls else 0
    old, new = source.shape[1] - prefix, target_shape[1] - prefix
    old_side, new_side = math.isqrt(old), math.isqrt(new)
    if old_side**2 != old or new_side**2 != new:
        return None
    grid = source[0, prefix:].reshape(old_side, old_side, -1)
    grid = jax.image.resize(grid, (new_side, new_side, grid.shape[-1]), method="bilinear")
    resized = np.concatenate([source[0, :prefix], np.asarray(grid).reshape(new, -1)], axis=0)
    return resized[None].astype(source.dtype)


def merge(variables: Mapping[str, Any], source: Mapping[str, np.ndarray], load: Iterable[str] = (".*",),
          skip: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """Fresh `variables` with every `load`-selected, un-`skip`ped entry taken from `source`.

    Returns (new variables, source paths the model has no place for). Raises TransferError listing every
    shape mismatch and every selected parameter the source lacks; `variables` is never changed.
    """
    load, skip = _compile(load or (".*",), "load"), _compile(skip, "skip")
    target = flatten(variables)
    for key, pattern_list in (("load", load), ("skip", skip)):
        for p in pattern_list:
            if not any(re.fullmatch(p, t.split("/", 1)[1]) for t in target):
                if key == "load":
                    raise TransferError(f"config.init_from.load: {p!r} matches no parameter of the model")
                log.warning("init_from: skip pattern %r matches no parameter of the model", p)
    taken, mismatched, missing = {}, [], []
    for key, fresh in target.items():
        path = key.split("/", 1)[1]
        if not _matches(path, load) or _matches(path, skip):
            continue
        if key not in source:
            missing.append(key)
            continue
        value = np.asarray(source[key])
        if value.shape != tuple(fresh.shape) and path.endswith("pos_embed"):
            resized = _resize_posemb(value, tuple(fresh.shape), "params/cls_token" in target)
            if resized is not None:
                log.info("init_from: resized %s from %s to %s", key, value.shape, tuple(fresh.shape))
                value = resized
        if value.shape != tuple(fresh.shape):
            mismatched.append(f"{key} (pretrained {value.shape}, model {tuple(fresh.shape)})")
            continue
        taken[key] = value.astype(fresh.dtype)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched))
    if missing:
        problems.append(f"{len(missing)} selected parameters missing from the source: " + ", ".join(missing))
    if problems:
        raise TransferError("init_from: " + " | ".join(problems) + " (use init_from.skip for parameters to "
                            "keep at their fresh init)")
    unused = sorted(k for k in source if k not in target)
    if unused:
        log.warning("init_from: %d source parameters match nothing in the model: %s", len(unused),
                    ", ".join(unused[:20]) + (" ..." if len(unused) > 20 else ""))
    merged = unflatten({k: taken.get(k, v) for k, v in target.items()})
    return merged, unused


def load_pretrained(variables: Mapping[str, Any], init_from: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the parameters (and batch stats) `init_from` selects taken from its source."""
    source = read_source(init_from["path"], init_from.get("format", "dlfx"), init_from.get("step", -1))
    merged, _ = merge(variables, source, init_from.get("load") or (".*",), init_from.get("skip") or ())
    return merged


def import_weights(path: str, format: str) -> tuple[Any, dict[str, Any]]:
    """The dlfx model matching a torchvision/HF source (sizes read from it) and its variables, ready to apply."""
    if format not in FORMATS[1:]:
        raise TransferError(f"import_weights format must be one of {', '.join(FORMATS[1:])}, got {format!r} "
                            f"(dlfx runs load with dlfx.load_run)")
    if not os.path.exists(path):
        raise TransferError(f"no such file or folder: {path}")
    model, flat, unused = _read_foreign(path, format)
    if unused:
        log.warning("import_weights: %d source tensors have no dlfx counterpart: %s", len(unused), ", ".join(unused[:10]))
    example = _example_input(model, flat)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))
    fresh = {c: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes[c]) for c in COLLECTIONS if c in shapes}
    skip = [] if "params/head/kernel" in flat or "head" not in fresh["params"] else ["head/.*"]
    if skip:  # a backbone without a classifier: the head keeps a fresh init
        real = model.init(jax.random.PRNGKey(0), example, train=False)
        fresh["params"]["head"] = jax.tree.map(np.asarray, real["params"]["head"])
    variables, _ = merge(fresh, flat, skip=skip)
    return model, variables


def _example_input(model: Any, flat: Mapping[str, np.ndarray]) -> np.ndarray:
    """A one-example input of the right kind for `model.init` (tokens, or an image of the source's size)."""
    if "params/wte/embedding" in flat:
        return np.zeros((1, 1), np.int32)
    if "params/pos_embed" in flat:  # ViT: the image size follows from the position grid
        side = math.isqrt(flat["params/pos_embed"].shape[1] - 1) * model.patch_size
        channels = flat["params/patch_embed/kernel"].shape[2]
        return np.zeros((1, side, side, channels), np.float32)
    if "params/conv1/kernel" not in flat:
        raise TransferError("import_weights: none of the source's tensors maps to a dlfx model "
                            "(no token embedding, ViT patch embedding or ResNet stem found)")
    channels = flat["params/conv1/kernel"].shape[2]
    return np.zeros((1, 64, 64, channels), np.float32)
