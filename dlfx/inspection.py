"""Parameter tables for `dlfx inspect`: read shapes from a run, checkpoint, safetensors or npz file."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import numpy as np

from dlfx.errors import CheckpointError, one_line


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple) -> str:
    """A pytree key path written `a/b/c`."""
    return "/".join(_key_name(k) for k in path)


def flatten(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`a/b/c` -> (shape, dtype) for every array-like leaf of a pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves
            if hasattr(leaf, "shape")}


def _checkpoint_step_dirs(path: str) -> list[str]:
    """Step folders to read, newest first: `path` itself if it is one, else those of the run or folder."""
    if os.path.isdir(os.path.join(path, "state")):
        return [path]
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()
                    and os.path.isdir(os.path.join(ckpt_dir, d, "state"))), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint found under {path}")
    return [os.path.join(ckpt_dir, str(step)) for step in steps]


def checkpoint_shapes(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every array of a dlfx checkpoint step's train state, read from its metadata only."""
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that sub-items lack their own metadata file
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            local = "://" not in step_dir
            item = checkpointer.metadata(os.path.join(os.path.abspath(step_dir) if local else step_dir,
                                                      "state")).item_metadata
            if item is None:
                raise ValueError("its metadata does not read back (damaged or cut-off files)")
            tree = item.tree
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {step_dir}: {one_line(e)}") from None
    finally:
        absl_logger.setLevel(level)
    return flatten(tree)


def read_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parameter (and batch-stat) shapes of a workdir, checkpoint folder, HF folder, `.safetensors` or `.npz` file."""
    if "://" in path:
        raise CheckpointError(f"{path}: inspect reads a local path; for a gs:// run use `dlfx eval` or "
                              "`dlfx.load_run`, or copy the file or checkpoint step down first")
    if not os.path.exists(path):
        raise CheckpointError(f"no such file or folder: {path}")
    if not (os.path.isfile(path) or os.path.isdir(path)):  # a FIFO or device would block the reader
        raise CheckpointError(f"{path} is not a regular file or folder")
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors")):
        path = os.path.join(path, "model.safetensors")  # a Hugging Face model folder
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                return {k.replace(".", "/"): (tuple(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype()).lower())
                        for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return {k: (arrays[k].shape, str(arrays[k].dtype)) for k in arrays.files}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable npz file: {e}") from None
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: inspect reads a run folder, a checkpoint folder, a .safetensors or a .npz "
                              "file")
    errors = []
    for step_dir in _checkpoint_step_dirs(path):  # newest first; a broken newer step falls back, as eval does
        try:
            shapes = checkpoint_shapes(step_dir)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            logging.getLogger("dlfx").warning("%s; showing the older %s", errors[0], step_dir)
        return {k: shapes[k] for k in sorted(shapes, key=lambda k: (not k.startswith("params/"), k))
                if k.startswith(("params/", "batch_stats/"))}
    raise CheckpointError(errors[0] if len(errors) == 1 else f"no readable checkpoint under {path} ({errors[0]})")


def format_table(shapes: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """A text table of path, shape, dtype and element count, with totals per top-level collection."""
    rows = [(p, str(s), d, math.prod(s)) for p, (s, d) in shapes.items()]
    width = max([len(r[0]) for r in rows] + [4])
    shape_width = max([len(r[1]) for r in rows] + [5])
    lines = [f"{'path':<{width}}  {'shape':<{shape_width}}  {'dtype':<8}  {'count':>12}"]
    lines += [f"{p:<{width}}  {s:<{shape_width}}  {d:<8}  {c:>12,}" for p, s, d, c in rows]
    totals: dict[str, int] = {}
    for p, _, _, c in rows:
        group = p.split("/")[0] if p.startswith(("params/", "batch_stats/")) else "parameters"
        totals[group] = totals.get(group, 0) + c
    lines.append("total: " + ", ".join(f"{c:,} {g}" for g, c in totals.items()) if rows else "total: 0")
    return "\n".join(lines)
