"""The run folder's lock (one training process per workdir, stale locks taken over) and its status file."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

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


def lock_holder_alive(workdir: str) -> bool:
    """True if `workdir/.lock` names a live process on this host (a run in progress)."""
    try:
        with open(os.path.join(workdir, ".lock")) as f:
            host, pid = f.read().split()
        return host == socket.gethostname() and _alive(int(pid))
    except (OSError, ValueError):
        return False


def write_status(workdir: str, status: str, **fields) -> None:
    """Atomically record the run's state in `workdir/status.json` (running/finished/preempted/failed)."""
    path = os.path.join(workdir, "status.json")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"status": status, "updated": time.time(), **fields}, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: never hide the error that ended the run
        log.warning("could not write %s: %s", path, e)


def read_status(workdir: str) -> dict:
    """The run's `status.json`, with 'running' turned into 'failed' when no live process holds the lock."""
    try:
        with open(os.path.join(workdir, "status.json")) as f:
            status = json.load(f)
    except (OSError, json.JSONDecodeError):
        status = {"status": "unknown"}
    if status["status"] == "running" and not lock_holder_alive(workdir):
        status = {**status, "status": "failed", "error": status.get("error") or "process died (killed?)"}
    return status
