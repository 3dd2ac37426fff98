"""Devices and run modes: one per-device step run by `jax.pmap` or `jax.jit(jax.shard_map)` on a Mesh."""

from __future__ import annotations

import collections
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dlfx.errors import ConfigError
from dlfx.sharding import FSDP_AXIS
from dlfx.steps import DATA_AXIS


MODES = ("auto", "pmap", "shard_map", "fsdp")


def resolve_mode(mode: str, num_devices: int = 2) -> str:
    """The concrete run mode for a `config.parallel.mode`.

    'auto' picks 'single' on one device (a plain `jax.jit` step with no collectives: shard_map over a
    1-device mesh computes the same but costs ~4 % on a small MLP on CPU) and shard_map otherwise.
    """
    if mode not in MODES:
        raise ConfigError(f"config.parallel.mode={mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "single" if num_devices == 1 else "shard_map"
    return mode


def step_axis(mode: str) -> str | None:
    """The collective axis of the per-device step; None for 'single' and fsdp (one global jit program)."""
    return None if mode in ("fsdp", "single") else DATA_AXIS


def make_mesh(devices: list | None = None, mode: str = "shard_map", data: int = 1, fsdp: int = -1) -> Mesh:
    """A 1-D `data` mesh, or for fsdp a 2-D (`data`, `fsdp`) mesh (-1 = the devices left), Auto axis types."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if mode != "fsdp":
        return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(AxisType.Auto,))
    count = devices.size
    if data == -1 and fsdp == -1:
        raise ConfigError("config.parallel.data and config.parallel.fsdp cannot both be -1")
    data = count // fsdp if data == -1 else data
    fsdp = count // data if fsdp == -1 else fsdp
    if data < 1 or fsdp < 1 or data * fsdp != count:
        raise ConfigError(f"config.parallel.data x config.parallel.fsdp = {data} x {fsdp} does not match the "
                          f"{count} devices")
    return Mesh(devices.reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto,) * 2)


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


def _batch_spec(mesh: Mesh, stacked: bool) -> P:
    """The batch splits over every mesh axis; a stack of batches (steps, batch, ...) over its second axis."""
    axes = tuple(mesh.axis_names)
    return P(None, axes) if stacked else P(axes)


def _handed_over(x: Any) -> np.ndarray:
    """`x` as an array a CPU device may share without copying: one that owns its memory is made read-only (a
    producer that reuses it as a buffer then fails loudly instead of changing a placed batch); a view of
    other memory is copied."""
    x = np.asarray(x)
    if not x.flags.owndata:
        return np.array(x)
    x.flags.writeable = False
    return x


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, mode: str,
                stacked: bool = False) -> dict[str, jax.Array]:
    """Turn this process's part of a batch into global arrays split over the `data` axis.

    shard_map mode gets (global_batch, ...); pmap mode gets (num_devices, per_device_batch, ...);
    `stacked` batches of several steps (steps, batch, ...) are split on their batch axis.
    """
    sharding = NamedSharding(mesh, _batch_spec(mesh, stacked))
    num_local = len(mesh.local_devices)
    for key, x in local_batch.items():
        if np.ndim(x) < 1 + stacked:
            raise ValueError(f"batch key {key!r} has shape {np.shape(x)}: batch arrays need a leading "
                             f"{'(steps, batch)' if stacked else 'batch'} axis")
    if mode == "pmap":
        local_batch = {k: x.reshape((num_local, x.shape[0] // num_local, *x.shape[1:])) for k, x in local_batch.items()}
    if jax.process_count() == 1:  # the local batch is the global one
        # per array from a callback: about half the host time of jax.device_put (jax 0.10 on CPU: 45 vs 125 us
        # for a small array on one device, 139 vs 286 us for an x/y batch on 8), host time a step waits for;
        # on CPU the devices may use the host memory without a copy (`_handed_over`)
        return {k: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
                for k, x in ((k, _handed_over(x)) for k, x in local_batch.items())}
    return {k: jax.make_array_from_process_local_data(sharding, x) for k, x in local_batch.items()}


@jax.jit
def unstack_batches(stacked: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
    """Per-step batches from a stack of them (steps, batch, ...), split on the device in one program."""
    num_steps = len(next(iter(stacked.values())))
    return [{k: v[i] for k, v in stacked.items()} for i in range(num_steps)]


def compile_step(step_fn: Callable, mode: str, mesh: Mesh, donate_state: bool = False,
                 state_sharding: Any = None, stacked: bool = False, tables: bool = False) -> Callable:
    """Run a per-device `step_fn(state, batch)` over the mesh; state and outputs are replicated.

    In fsdp and single mode `step_fn` is a global step (built with `axis_name=None`): one `jax.jit`
    program over arrays laid out by `state_sharding`, the batch split over both mesh axes, XLA inserting the
    all-gathers and reduce-scatters.

    `stacked`: the batch is a stack of batches (steps, batch, ...), split on its second axis.
    `tables`: `step_fn(state, batch, tables)` takes a third argument held whole on every device (the
    device-resident train split, `dlfx.data.resident`).
    The returned function counts how often JAX traced it in `.traces[0]` (1 for a run without retracing).
    """
    donate = (0,) if donate_state else ()
    traces = [0]
    extra = 1 if tables else 0

    def traced(state, batch, *rest):
        traces[0] += 1  # Python runs here only while JAX traces
        return step_fn(state, batch, *rest)

    compiled = None
    if mode == "pmap":
        compiled = jax.pmap(traced, axis_name=DATA_AXIS, in_axes=(None, 0) + (None,) * extra, out_axes=None,
                            devices=list(mesh.devices.flat), donate_argnums=donate)
    elif mode == "shard_map":
        # check_vma=False: with it on, autodiff already psums the grads of replicated params, and
        # the step's explicit pmean would then scale them by the device count.
        sharded = jax.shard_map(traced, mesh=mesh, in_specs=(P(), _batch_spec(mesh, stacked)) + (P(),) * extra,
                                out_specs=P(), check_vma=False)
        compiled = jax.jit(sharded, donate_argnums=donate)
    elif mode in ("fsdp", "single"):
        batch = NamedSharding(mesh, _batch_spec(mesh, stacked))
        # the train step (state donated) returns (state, metrics); the eval step returns metrics only
        outputs = (state_sharding, replicated(mesh)) if donate_state else replicated(mesh)
        compiled = jax.jit(traced, in_shardings=(state_sharding, batch) + (replicated(mesh),) * extra,
                           out_shardings=outputs, donate_argnums=donate)
    if compiled is not None:
        compiled.traces = traces
        return compiled
    raise ConfigError(f"config.parallel.mode={mode!r} is not one of {', '.join(MODES)}")


class DispatchLimit:
    """Keeps at most `depth` dispatched calls unfinished: the host waits for the call `depth` back.

    XLA:CPU with several devices deadlocked in a collective when dispatch ran far ahead (8 fake devices
    on 2 busy cores: one device's launch blocked on its in-flight limit while the others waited for it
    in an all-reduce). Two calls in flight still keep the device busy while the host dispatches the next.
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._unfinished: collections.deque = collections.deque()

    def add(self, outputs: Any) -> None:
        """Record a call's outputs; block until the oldest recorded call is done if over `depth`."""
        self._unfinished.append(outputs)
        if len(self._unfinished) > self.depth:
            jax.block_until_ready(self._unfinished.popleft())


def default_compilation_cache() -> str:
    """`$DLFX_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/dlfx/jax` (`~/.cache/dlfx/jax`); 'off' disables."""
    if "DLFX_COMPILATION_CACHE" in os.environ:
        return os.environ["DLFX_COMPILATION_CACHE"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dlfx", "jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Keep compiled XLA programs in `directory` so a second launch of a config skips compilation."""
    directory = default_compilation_cache() if directory is None else directory
    if not directory or directory == "off":
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot use compilation cache {directory}: {e.strerror or e} "
                          f"(set DLFX_COMPILATION_CACHE=off to disable it)") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small steps are worth caching too
    return directory


def _cluster_detected() -> bool:
    """A multi-host launch JAX can configure itself from: a Cloud TPU pod slice or a SLURM job step."""
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")) or 1)
    return len(tpu_hosts) > 1 or ("SLURM_PROCID" in os.environ and slurm_tasks > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`) when asked; a no-op for one process.

    Asked means: explicit arguments, `DLFX_COORDINATOR_ADDRESS` / `DLFX_NUM_PROCESSES` / `DLFX_PROCESS_ID`,
    `DLFX_DISTRIBUTED=1` (JAX detects the cluster: Cloud TPU pod, SLURM, ...), or a detected TPU pod /
    SLURM job step. Call before anything touches devices.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("DLFX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("DLFX_NUM_PROCESSES"):
        num_processes = int(env["DLFX_NUM_PROCESSES"])
    if process_id is None and env.get("DLFX_PROCESS_ID"):
        process_id = int(env["DLFX_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator-address needs --num-processes and --process-id "
                              "(or DLFX_NUM_PROCESSES / DLFX_PROCESS_ID)")
        if num_processes == 1:
            return False
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
        return True
    if env.get("DLFX_DISTRIBUTED", "").lower() in ("1", "true", "auto") or _cluster_detected():
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    return False
