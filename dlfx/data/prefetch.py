"""Device prefetch: a background thread places the next batches on the devices while the current step runs."""

from __future__ import annotations

import collections
import json
import multiprocessing
import queue
import re
import threading
from typing import Any, Callable

import grain
import numpy as np

from dlfx.errors import DataError


class DevicePrefetcher:
    """Iterator of device-placed batches, `depth` ahead of the consumer.

    Checkpointing sees the *consumer's* position (the grain iterator state right after the last batch
    handed out), not the reader's, so a resumed run gets exactly the batches it had not trained on.
    Orbax saves it with grain's checkpoint handler (get_state/set_state in bytes).
    With `group`, each item stacks `group(position)` batches (position = grain's `next_index`, the
    global batch counter), placed by `place_stack`: the batches of one multi-step call.
    With `chunk` > 1 (and no `group`), `chunk` batches travel in one stacked transfer (`place_stack`) and
    `unstack` splits them on the device into per-step batches: one transfer per chunk instead of per step.
    With `call_chunk` > 1 (and a `group`), up to `call_chunk` multi-step calls of equal length travel in one
    transfer (call_chunk, steps, batch, ...), handed out per call by `split_calls` (row indices of a
    device-resident split).
    With `threaded=False` the consumer reads and places the batches itself, an item (or a chunk) at a time:
    for a feed that cannot stall (row indices of a device-resident split), where a thread's hand-offs cost
    more than the read (a 1.5 ms step on 2 CPU cores ran 5-10 % faster inline with chunks of 16).
    An iterator with `next_stacked(count)` (`dlfx.data.pipeline.RowIndexIterator`) reads a chunk or a
    call's batches in one go.
    """

    def __init__(self, iterator: grain.DatasetIterator, place: Callable[[Any], Any], depth: int = 2,
                 group: Callable[[int], int] | None = None, place_stack: Callable[[Any], Any] | None = None,
                 chunk: int = 1, unstack: Callable[[Any], list] | None = None, threaded: bool = True,
                 call_chunk: int = 1, split_calls: Callable[[Any], list] | None = None):
        # group(position) -> how many batches the item read at that batch position stacks (steps per call)
        self._iterator, self._place, self._depth = iterator, place, depth
        self._group, self._place_stack = group, place_stack
        self._chunk, self._unstack = (chunk, unstack) if group is None and chunk > 1 else (1, None)
        self._call_chunk, self._split_calls = (call_chunk, split_calls) if call_chunk > 1 else (1, None)
        self._state = iterator.get_state()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # polled while the consumer waits for a batch: True makes next() raise Interrupted (e.g. SIGTERM while
        # a stalled reader holds the next batch back)
        self.interrupted: Callable[[], bool] | None = None
        self._stuck = False
        self._threaded = threaded
        self._ready: collections.deque = collections.deque()  # inline: placed items not handed out yet
        # grain starts its worker processes inside a read: those that appear while this prefetcher reads are its
        # own (`release` stops them); `_reading` holds the ones alive when the read under way began
        self._ours: set[int] = set()
        self._reading: set[int] | None = None

    def _read(self, position: int) -> tuple[list[tuple[Any, Any]], int]:
        """The next items [(placed batch, grain state after it)] read at batch `position`, and the batches read."""
        self._reading = before = _grain_workers()
        try:
            return self._read_items(position)
        finally:
            self._ours |= _grain_workers() - before
            self._reading = None

    def _read_items(self, position: int) -> tuple[list[tuple[Any, Any]], int]:
        if self._group and self._call_chunk > 1:
            calls = self._read_calls(position)
            if calls is not None:
                return calls
        count = self._chunk if self._chunk > 1 else (self._group(position) if self._group else 1)
        if count == 1:
            placed = self._place(next(self._iterator))
            return [(placed, self._iterator.get_state())], 1
        batches, states = self._next_stacked(count)
        placed = self._place_stack(batches)
        if self._chunk > 1:  # one transfer for `chunk` steps, split into per-step batches on the device
            return list(zip(self._unstack(placed), states)), count
        return [(placed, states[-1])], count  # one stacked transfer for the steps of one call

    def _read_calls(self, position: int) -> tuple[list[tuple[Any, Any]], int] | None:
        """The next multi-step calls of equal length, up to `call_chunk`, in one transfer (call_chunk, steps,
        batch; zero-padded, so a call has one shape per length), each handed out by `split_calls` with the
        state after its last batch; None for a one-step call."""
        steps = self._group(position)
        if steps == 1:
            return None
        calls = 1
        while calls < self._call_chunk and self._group(position + calls * steps) == steps:
            calls += 1
        batches, states = self._next_stacked(calls * steps)
        padded = {}
        for key, value in batches.items():
            value = value.reshape(calls, steps, *value.shape[1:])
            padding = [(0, self._call_chunk - calls)] + [(0, 0)] * (value.ndim - 1)
            padded[key] = np.pad(value, padding) if calls < self._call_chunk else value
        placed = self._place_stack(padded)
        return list(zip(self._split_calls(placed)[:calls], states[steps - 1::steps])), calls * steps

    def _next_stacked(self, count: int) -> tuple[dict[str, np.ndarray], list[Any]]:
        """The next `count` batches stacked on a new leading axis, and the iterator state after each."""
        if hasattr(self._iterator, "next_stacked"):  # row indices: one slice of the epoch's order
            return self._iterator.next_stacked(count)
        batches, states = [], []
        for _ in range(count):
            batches.append(next(self._iterator))
            states.append(self._iterator.get_state())
        return _stack(batches), states

    def _position(self) -> int:
        return int(self._iterator.get_state()["next_index"]) if self._group else 0

    def _fill(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            position = self._position()
            while not stop.is_set():
                items, count = self._read(position)
                position += count
                for placed, state in items:
                    self._put(out, stop, (placed, state, None))
        except BaseException as e:  # handed to the consumer, raised at its next()
            out.put((None, None, _worker_lost(e) or e))

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item: tuple) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if not self._threaded:
            if not self._ready:
                self._ready.extend(self._read(self._position())[0])
            batch, self._state = self._ready.popleft()
            return batch
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self._depth)
            self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop), daemon=True,
                                            name="dlfx-prefetch")
            self._thread.start()
        while True:
            try:
                batch, state, error = self._queue.get(timeout=WAIT_POLL_SECONDS)
                break
            except queue.Empty:
                if self.interrupted is not None and self.interrupted():
                    raise Interrupted("interrupted while waiting for the next batch") from None
        if error is not None:
            self.close()
            raise error
        self._state = state
        return batch

    def close(self) -> None:
        """Stop the reader thread; batches read ahead are dropped (the state still points at them)."""
        if self._ready:  # inline: the reader is back at the consumer's position
            self._ready.clear()
            self._iterator.set_state(self._state)
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=JOIN_SECONDS)  # a reader stuck in a stalled source is left (a daemon)
            self._stuck = self._thread.is_alive()
            self._thread = None

    def regroup(self, group: Callable[[int], int] | None) -> None:
        """From the consumer's position on, stack `group(position)` batches per item (a new steps-per-call
        choice); batches read ahead are read again."""
        self.close()
        self._iterator.set_state(self._state)
        self._group, self._chunk, self._unstack = group, 1, None

    def release(self) -> None:
        """Stop for good: the reader thread and the host iterator's worker processes, if it has any."""
        self.close()
        if not self._stuck and hasattr(self._iterator, "close"):
            self._iterator.close()  # grain joins its workers, and kills one that does not stop
        # a stuck reader waits on a stalled worker and holds the iterator's locks: stop grain's worker processes.
        # Either way each one is reaped here, so none outlives the run (grain's kill does not wait for the exit).
        reading = self._reading
        ours = self._ours | (_grain_workers() - reading if reading is not None else set())
        for process in multiprocessing.active_children():
            if process.pid in ours:
                process.kill()
                process.join(timeout=JOIN_SECONDS)

    # grain's Orbax CheckpointHandler calls these on iterators that are not grain DatasetIterators.
    def get_state(self) -> bytes:
        """The consumer position as grain's JSON iterator state."""
        return json.dumps(self._state, indent=4).encode()

    def set_state(self, state: bytes | dict) -> None:
        """Move to a saved consumer position (JSON bytes or dict); reading ahead restarts from there."""
        self.close()
        self._state = json.loads(state) if isinstance(state, bytes) else state
        self._iterator.set_state(self._state)

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; reading starts at the next `next()`."""


def _grain_workers() -> set[int]:
    """Pids of this process's live grain worker processes."""
    return {p.pid for p in multiprocessing.active_children() if p.name.startswith("grain")}


WAIT_POLL_SECONDS = 0.5
JOIN_SECONDS = 10.0


class Interrupted(Exception):
    """The consumer was interrupted (`DevicePrefetcher.interrupted`) while it waited for a batch."""


class WorkerLost(DataError):
    """A data worker process died (killed for memory, a crash in a decoder): the host pipeline cannot go on."""


def _worker_lost(error: BaseException) -> WorkerLost | None:
    """grain's error for a worker process that exited without a Python exception, as one named error."""
    message = str(error)
    if not (isinstance(error, RuntimeError) and "Worker process was terminated" in message):
        return None
    code = re.search(r"exit code (-?\d+)", message)
    why = {"-9": "SIGKILL, e.g. out of memory", "-11": "a segmentation fault in a decoder"}.get(
        code.group(1) if code else "", "see the log above")
    return WorkerLost(f"a data worker process died (exit code {code.group(1) if code else '?'}: {why}); "
                      "lower data.workers or data.batch_size, then rerun the same command to resume")


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches stacked on a new leading axis (steps, batch, ...)."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
