"""Devices and run modes: one per-device step run by `jax.pmap` or `jax.jit(jax.shard_map)` on a Mesh."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dlfx.errors import ConfigError
from dlfx.steps import DATA_AXIS


def resolve_mode(mode: str) -> str:
    """The concrete run mode for a `config.parallel.mode` ('auto' picks shard_map)."""
    if mode == "auto":
        return "shard_map"
    if mode not in ("pmap", "shard_map"):
        raise ConfigError(f"config.parallel.mode={mode!r} is not one of auto, pmap, shard_map")
    return mode


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D `data` mesh over the given (default: all) devices, with Auto axis types."""
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Refuse a global batch that does not split evenly over processes and devices."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ConfigError(f"config.data.batch_size={global_batch_size} is not divisible by the "
                          f"{num_devices} devices")


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole on every device."""
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of the mesh as global replicated arrays."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, mode: str) -> dict[str, jax.Array]:
    """Turn this process's part of a batch into global arrays split over the `data` axis.

    shard_map mode gets (global_batch, ...); pmap mode gets (num_devices, per_device_batch, ...).
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    num_local = len(mesh.local_devices)

    def place(x: np.ndarray) -> jax.Array:
        if mode == "pmap":
            x = x.reshape((num_local, x.shape[0] // num_local, *x.shape[1:]))
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: place(v) for k, v in local_batch.items()}


def compile_step(step_fn: Callable, mode: str, mesh: Mesh, donate_state: bool = False) -> Callable:
    """Run a per-device `step_fn(state, batch)` over the mesh; state and outputs are replicated.

    The returned function counts how often JAX traced it in `.traces[0]` (1 for a run without retracing).
    """
    donate = (0,) if donate_state else ()
    traces = [0]

    def traced(state, batch):
        traces[0] += 1  # Python runs here only while JAX traces
        return step_fn(state, batch)

    compiled = None
    if mode == "pmap":
        compiled = jax.pmap(traced, axis_name=DATA_AXIS, in_axes=(None, 0), out_axes=None,
                            devices=list(mesh.devices.flat), donate_argnums=donate)
    elif mode == "shard_map":
        # check_vma=False: with it on, autodiff already psums the grads of replicated params, and
        # the step's explicit pmean would then scale them by the device count.
        sharded = jax.shard_map(traced, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(),
                                check_vma=False)
        compiled = jax.jit(sharded, donate_argnums=donate)
    if compiled is not None:
        compiled.traces = traces
        return compiled
    raise ConfigError(f"config.parallel.mode={mode!r} is not one of auto, pmap, shard_map")
