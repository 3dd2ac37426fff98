"""The runner's device feed: host batches placed on the devices ahead of the step that needs them."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np

from dlfx import data, parallel, steps


def call_sizes(exp, steps_per_call: int) -> Any:
    """Batch position -> steps the call starting there runs (`steps_per_call`, or 1 up to a log, eval or
    checkpoint point); None without multi-step calls."""
    t = exp.config.train
    if steps_per_call <= 1:
        return None
    every = (t.log_every, t.eval_every, t.checkpoint_every)
    return lambda position: steps.steps_in_call(position, steps_per_call, exp.total_steps, every)


AUTO_PLATFORMS = ("gpu", "tpu")  # XLA:CPU runs a scanned convolution step ~10x slower: auto keeps 1 there
# auto: calls of about this long hide the loop's host work per call: ~0.1-0.3 ms on a 2-core CPU, but on the
# H100's host char-GPT's one-step runner calls took 2.72 ms against its bare step's 1.58, and 10-step calls
# brought the runner from 0.58 to 0.93 of the bare step (H200, 10 ms calls of 4 steps: 0.59). At 50 ms a per-call
# cost of ~1 ms is ~2 %.
CALL_TARGET_S = 0.05
CALIBRATION_STEPS = 20  # one-step calls timed after the first (compiling) one
MAX_AUTO_STEPS = 50
MAX_AUTO_STACK_BYTES = 64 << 20  # auto: at most this much of stacked batches per call


def can_tune(exp) -> bool:
    """Whether `train.steps_per_call=0` (auto) times the step: on a GPU or TPU, one step per call on
    every device (not pmap), no worker processes; elsewhere auto is one step per call."""
    c = exp.config
    return (c.train.steps_per_call == 0 and exp.mode != "pmap" and not c.data.workers
            and exp.mesh.devices.flat[0].platform in AUTO_PLATFORMS)


def _batch_bytes(exp) -> int:
    spec = {"index": ((), np.int32)} if exp.resident else data.access.element_spec(exp.dataset.train)
    return exp.config.data.batch_size * sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                                            for shape, dtype in spec.values())


def choose_steps_per_call(step_seconds: float, batch_bytes: int, every: tuple[int, ...] = ()) -> int:
    """Steps per call for a measured one-step call time: calls of at least about `CALL_TARGET_S`, at most
    `MAX_AUTO_STEPS` steps and `MAX_AUTO_STACK_BYTES` of stacked batches; where one fits, a divisor of the
    log/eval/checkpoint intervals `every`, so no one-step calls fill up to their points (log_every=50 with
    4-step calls: 14 calls per 50 steps; with 5: 10), and never more than their greatest common divisor
    (longer calls would all cross a point and run as one-step calls)."""
    cap = max(1, min(MAX_AUTO_STEPS, MAX_AUTO_STACK_BYTES // max(batch_bytes, 1)))
    wanted = max(1, min(math.ceil(CALL_TARGET_S / max(step_seconds, 1e-6)), cap))
    period = math.gcd(*[n for n in every if n > 0])
    if not period:
        return wanted
    if period <= wanted:
        return period
    return next((k for k in range(wanted, cap + 1) if period % k == 0), wanted)


class CallTuner:
    """`train.steps_per_call=0` on an accelerator: times `CALIBRATION_STEPS` one-step calls of the real run
    (after the compiling one) and picks the steps per call; every process takes process 0's choice."""

    def __init__(self, exp):
        self._batch_bytes = _batch_bytes(exp)
        t = exp.config.train
        self._every = (t.log_every, t.eval_every, t.checkpoint_every)
        self._start: float | None = None
        self._count = 0
        self.step_seconds = float("nan")

    def observe(self, outputs: Any) -> int | None:
        """After each one-step call: None while timing, then the chosen steps per call (once)."""
        if self._start is None:
            jax.block_until_ready(outputs)
            self._start = time.perf_counter()
            return None
        self._count += 1
        if self._count < CALIBRATION_STEPS:
            return None
        jax.block_until_ready(outputs)
        self.step_seconds = (time.perf_counter() - self._start) / self._count
        chosen = choose_steps_per_call(self.step_seconds, self._batch_bytes, self._every)
        if jax.process_count() > 1:  # timings differ per process; the calls must not
            from jax.experimental import multihost_utils

            chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        return chosen


MAX_TRANSFER_CHUNK = 16  # batches per transfer (one device, one step per call)
CALL_CHUNK = 8  # multi-step calls per transfer of row indices read inline
MAX_TRANSFER_BYTES = 4 << 20  # ... and at most this many bytes per transfer


def transfer_chunk(exp) -> int:
    """Batches per host-to-device transfer when each call runs one step: several on one device, where a
    transfer's fixed cost (~30 us per array on CPU) is worth amortizing; else 1. Several devices keep one
    transfer per step: splitting a chunk is a device program, kept out of the way of collective steps."""
    if (exp.config.train.steps_per_call > 1 or exp.mesh.devices.size > 1 or jax.process_count() > 1
            or exp.mode == "pmap"):
        return 1
    return int(max(1, min(MAX_TRANSFER_CHUNK, MAX_TRANSFER_BYTES // max(_batch_bytes(exp), 1))))


def device_prefetcher(exp, host_iter, group: Any = None) -> data.DevicePrefetcher:
    """The runner's device feed: batches placed on the devices two calls ahead, off the training thread (the
    row indices of a device-resident split on one device are read inline); `group(position)` batches stacked
    per multi-step call, or several per transfer on one device (see `transfer_chunk`)."""
    def place_stack(b):
        return parallel.shard_batch(b, exp.mesh, exp.mode, stacked=True)

    chunk = transfer_chunk(exp)
    # row indices of a device-resident split are a slice of the epoch's order (a few us a chunk or a call) and
    # cannot stall: on one device the training thread reads them itself, without a thread's hand-offs (MLP
    # 10-step calls, 25 windows: inline 0.974, thread 0.955 of pre-placed batches); several devices keep the
    # thread, which places each step's batch on all of them
    one_device = exp.mesh.devices.size == 1 and jax.process_count() == 1 and exp.mode != "pmap"
    threaded = not (exp.resident and not exp.config.data.workers and one_device)
    # a chunk of row indices reaches each step whole, with the step's slot (one device: any batch layout works)
    unstack = data.resident.slotted(exp.mesh) if exp.resident else parallel.unstack_batches
    # read inline, multi-step calls of equal length take their row indices `CALL_CHUNK` calls per transfer:
    # the read and the transfer cost ~90 us a call on this CPU, ~1 % of a 10-step MLP call
    call_chunk = CALL_CHUNK if not threaded else 1
    return data.DevicePrefetcher(host_iter, lambda b: parallel.shard_batch(b, exp.mesh, exp.mode),
                                 group=group, place_stack=place_stack, chunk=chunk,
                                 unstack=unstack, threaded=threaded, call_chunk=call_chunk,
                                 split_calls=data.resident.slotted(exp.mesh, stacked=True))
