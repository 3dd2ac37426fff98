"""The run folder's lock: one training process per workdir, stale locks of dead processes taken over."""

from __future__ import annotations

import logging
import os
import socket

from dlfx.errors import ConfigError

log = logging.getLogger("dlfx")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """`workdir/.lock` holding `host pid` of the process that trains there."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self.owner = f"{socket.gethostname()} {os.getpid()}"
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the live process that holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise ConfigError(f"workdir {os.path.dirname(self.path)} is not writable: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                f.write(self.owner + "\n")
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                host, pid_text = f.read().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            host, pid = socket.gethostname(), -1  # unreadable or half-written lock: treat as stale
        if host != socket.gethostname():
            raise ConfigError(f"workdir {os.path.dirname(self.path)} is locked by process {pid} on host {host} "
                              f"({self.path}); remove the lock if that run is gone")
        if pid > 0 and _alive(pid):
            raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by running process {pid} "
                              f"({self.path}); wait for it or pick another --workdir")
        log.warning("taking over stale lock %s of process %s, which is no longer running", self.path, pid)
        os.remove(self.path)

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False
