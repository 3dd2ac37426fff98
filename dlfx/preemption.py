"""The run's SIGTERM policy: remember the signal, never die of it; the runner saves and exits 0."""

from __future__ import annotations

import signal
import threading


class Preemption:
    """Remembers a SIGTERM from `__enter__` to `__exit__` so the runner can act on it at a safe point.

    Installed before the run writes anything and kept until its last file is written, so a SIGTERM during
    start-up, a step, the final eval, save or plots never kills the process half-way. With
    `jax.distributed` on, JAX's own preemption notifier handles SIGTERM (Orbax's sync point) instead.
    """

    def __init__(self, single_process: bool | None = None, requested: bool = False):
        """`single_process`: known before JAX is imported (the command line's start-up); None asks JAX.
        `requested`: a SIGTERM an earlier Preemption already caught."""
        self.requested, self.single_process = requested, single_process
        self._previous, self._installed = None, False

    def __enter__(self) -> "Preemption":
        single = self.single_process
        if single is None:
            import jax

            single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous, self._installed = signal.signal(signal.SIGTERM, self._handle), True
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: the handler before was installed from C; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._previous, self._installed = None, False
