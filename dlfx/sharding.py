"""FSDP placement: which dimension of each parameter (and its optimizer state) is split over the `fsdp` axis."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlfx.errors import ConfigError
from dlfx.inspection import path_str

FSDP_AXIS = "fsdp"


def parse_rules(rules: Sequence[str]) -> list[tuple[str, int | None]]:
    """`'regex=dim'` / `'regex=replicate'` strings -> (regex, dim or None); the first match wins."""
    parsed = []
    for rule in rules:
        pattern, sep, target = rule.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"config.parallel.fsdp_rules: {rule!r} is not 'regex=DIM' or 'regex=replicate'")
        try:
            re.compile(pattern)
            dim = None if target == "replicate" else int(target)
        except (re.error, ValueError):
            raise ConfigError(f"config.parallel.fsdp_rules: {rule!r} is not 'regex=DIM' or 'regex=replicate'") from None
        parsed.append((pattern, dim))
    return parsed


def param_spec(path: str, shape: tuple[int, ...], fsdp: int, rules: list[tuple[str, int | None]],
               min_size: int) -> P:
    """The PartitionSpec of one parameter: a rule's dim, else its largest dim divisible by `fsdp`."""
    for pattern, dim in rules:
        if re.fullmatch(pattern, path):
            if dim is None:
                return P()
            if not -len(shape) <= dim < len(shape) or shape[dim] % fsdp:
                raise ConfigError(f"config.parallel.fsdp_rules: {path} {shape} cannot be split over fsdp={fsdp} "
                                  f"on dim {dim}")
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return P(*spec)
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[dim] = FSDP_AXIS
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[str] = (), min_size: int = 2**14) -> Any:
    """NamedShardings for a TrainState: params and their optimizer moments split over `fsdp`, the rest replicated."""
    fsdp = mesh.shape[FSDP_AXIS]
    parsed = parse_rules(rules)
    param_specs = {path_str(p): param_spec(path_str(p), tuple(leaf.shape), fsdp, parsed, min_size)
                   for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
    shapes = {path_str(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}

    def opt_spec(path, leaf):
        name = path_str(path)
        for param_path, spec in param_specs.items():  # optimizer moments mirror their parameter
            if name.endswith(param_path) and tuple(leaf.shape) == shapes[param_path]:
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    replicated = NamedSharding(mesh, P())
    return abstract_state.replace(
        step=replicated, rng=replicated,
        params=jax.tree_util.tree_map_with_path(lambda p, _: NamedSharding(mesh, param_specs[path_str(p)]),
                                                abstract_state.params),
        batch_stats=jax.tree.map(lambda _: replicated, abstract_state.batch_stats),
        opt_state=jax.tree_util.tree_map_with_path(opt_spec, abstract_state.opt_state))


def bytes_per_device(tree: Any) -> int:
    """Bytes of `tree` held by one device (the first), from the arrays' shardings."""
    total = 0
    device = None
    for leaf in jax.tree.leaves(tree):
        shards = leaf.addressable_shards
        device = device or shards[0].device
        total += sum(s.data.nbytes for s in shards if s.device == device)
    return total
