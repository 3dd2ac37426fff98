"""The run folder's lock (one training process per workdir, stale locks taken over), its status file, and
robust readers for the JSON files a killed run may leave damaged."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

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


def _boot_id() -> str:
    """This boot's id (Linux); '-' where unknown. A lock from another boot names no live process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or "-"
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (Linux); '-' where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


class WorkdirLock:
    """`workdir/.lock` holding `host pid boot_id start_ticks` of the process that trains there.

    A PID alone is not an identity: after a container restart the new process may get the PID (often 1)
    of the one that wrote the lock. A lock is live only if it names another process that is running now,
    on this boot, and started when the lock says.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self.owner = f"{socket.gethostname()} {os.getpid()} {_boot_id()} {_start_ticks(os.getpid())}"
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
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(self.owner + "\n")
            except OSError as e:  # a full disk: leave no empty lock behind
                _remove(self.path)
                raise ConfigError(f"cannot write the lock {self.path}: {e.strerror or e}") from None
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}")

    def _take_over_if_stale(self) -> None:
        if os.path.isdir(self.path):
            raise ConfigError(f"{self.path} is a folder, not a lock file; remove it")
        host, pid, live = read_lock(self.path)
        if live and host != socket.gethostname():
            raise ConfigError(f"workdir {os.path.dirname(self.path)} is locked by process {pid} on host {host} "
                              f"({self.path}); remove the lock if that run is gone")
        if live:
            raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by running process {pid} "
                              f"({self.path}); wait for it or pick another --workdir")
        log.warning("taking over stale lock %s of process %s, which is no longer running", self.path, pid)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise ConfigError(f"{self.path} is a folder, not a lock file; remove it") from None

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def read_lock(path: str) -> tuple[str, int, bool]:
    """(host, pid, live) of a lock file. Live: another process on another host, or on this host a running
    process other than this one with the boot id and start time the lock recorded (where it recorded them)."""
    try:
        with open(path) as f:
            fields = f.read().split()
        host, pid = fields[0], int(fields[1])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return socket.gethostname(), -1, False  # unreadable or half-written lock: stale
    if host != socket.gethostname():
        return host, pid, True  # cannot look into another machine: trust it
    if pid <= 0 or pid == os.getpid() or not _alive(pid):
        return host, pid, False  # our own PID in a lock we do not hold: left by an earlier life of this PID
    boot, ticks = (fields[2:4] + ["-", "-"])[:2]
    if boot != "-" and boot != _boot_id():
        return host, pid, False
    if ticks != "-" and _start_ticks(pid) not in ("-", ticks):
        return host, pid, False  # the PID now belongs to a newer process
    return host, pid, True


def lock_holder_alive(workdir: str) -> bool:
    """True if `workdir/.lock` names a live process on this host (a run in progress); for a reader's copy of a
    gs:// run, if its remote lock was refreshed lately by a process not known to be gone."""
    path = os.path.join(workdir, ".lock")
    if os.path.isfile(os.path.join(workdir, ".lock.remote")):  # a reader's copy of a gs:// run
        from dlfx import remote

        try:
            with open(os.path.join(workdir, ".lock.remote")) as f:
                held = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(held, dict) and remote.lock_age(held) is not None and not remote._gone(held)
    if not os.path.lexists(path):
        return False
    host, _, live = read_lock(path)
    return live and host == socket.gethostname()


def read_json(path: str, what: str = "object") -> Any:
    """A JSON file written by dlfx, or ConfigError naming the file and what is wrong with it.

    `what` is the expected top-level type: 'object' (a dict) or 'any'.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        value = json.loads(text)
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a JSON file") from None
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (binary content)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if what == "object" and not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """The records of a JSON-lines file written by dlfx (empty if there is none).

    A cut-off last line (what a kill mid-write leaves) is dropped with a warning; any other damage
    (binary content, a line that is not an object with the `required` keys) is a ConfigError naming the
    file and line.
    """
    if not os.path.lexists(path):
        return []
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder, not a JSON-lines file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (binary content)") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)  # no newline after it: the write was cut off
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn:
                log.warning("%s: dropping a cut-off last line (%d characters; a kill mid-write?)", path, len(line))
                continue
            raise ConfigError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(record, dict) or any(k not in record for k in required):
            raise ConfigError(f"{path} line {number} is not a record with keys {', '.join(required)}")
        records.append(record)
    return records


DATA_FILE = "data.json"  # what the model needs of the data set (dlfx.data.describe): lets sample run without it


def _remove(path: str) -> None:
    """Remove a file if it is there (best effort: used while another error is on its way out)."""
    try:
        os.remove(path)
    except OSError:
        pass


def write_json(path: str, value: Any) -> None:
    """Write `value` as JSON to `path` atomically (a kill leaves the old file or the new one; an error, the old
    one and no temporary file)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_status(workdir: str, status: str, strict: bool = False, **fields) -> None:
    """Atomically record the run's state in `workdir/status.json` (running/finished/preempted/failed); a write
    error is a warning (never hiding the error that ended a run), or with `strict` (a run starting) raised."""
    path = os.path.join(workdir, "status.json")
    text = json.dumps({"status": status, "updated": time.time(), **fields}, indent=2)
    try:
        write_text(path, text)
    except OSError as e:  # a full disk: written over the old status, in the block that already holds it
        if strict:
            raise
        try:
            with open(path, "r+") as f:
                f.write(text)
                f.truncate()
        except OSError:  # never hide the error that ended the run
            log.warning("could not write %s: %s", path, e)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically, leaving no temporary file on an error."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def read_status(workdir: str) -> dict:
    """The run's `status.json`, with 'running' turned into 'failed' when no live process holds the lock.

    A missing status file reads as 'unknown'; a damaged one as 'unknown' with the reason in 'error'.
    """
    path = os.path.join(workdir, "status.json")
    if not os.path.lexists(path):
        status = {"status": "unknown"}
    else:
        try:
            status = read_json(path)
            if not isinstance(status.get("status"), str):
                raise ConfigError(f"{path} has no 'status' string")
            for key in ("step", "total_steps", "pid", "wall_time", "steps_per_sec"):
                value = status.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ConfigError(f"{path}: '{key}' must be a number, got {value!r}")
        except ConfigError as e:
            status = {"status": "unknown", "error": str(e)}
    if status["status"] == "running" and not lock_holder_alive(workdir):
        status = {**status, "status": "failed", "error": status.get("error") or "process died (killed?)"}
    return status
