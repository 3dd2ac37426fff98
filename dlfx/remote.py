"""Workdirs on gs:// (or any filesystem etils.epath reaches): dlfx works in a local mirror of the run folder.

A training process pulls the run's files into a temporary mirror, writes there with plain file I/O (appends,
atomic renames, TensorBoard event files), and a background thread pushes what changed back to the remote
folder: every `PUSH_SECONDS`, before every checkpoint save, and at the end. Readers (`eval`, `sample`,
`runs`, `plot`, `load_run`) pull the run's small files the same way. Checkpoints never pass through a
mirror: Orbax reads and writes `REMOTE/checkpoints` itself. The remote folder's `.lock` names the host and
process that trains there; one not refreshed for `STALE_SECONDS` belongs to a run that is gone.

A mirror whose process died (SIGKILL, out of memory) stays behind in the temporary folder with what it had not
pushed yet. The next run on this machine that takes over the dead writer's lock first pushes that mirror's
files, as the writer would have at its end, and deletes it. A dead reader's mirror, or one whose pull had not
finished (maybe half-written files), holds nothing of its own and is deleted by the next mirror made here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterator

from etils import epath

from dlfx.errors import ConfigError, DlfxError, WorkdirError, one_line
from dlfx.workdir import write_json

PUSH_SECONDS = 30.0
STALE_SECONDS = 600.0
LOCK_SETTLE_SECONDS = 1.0  # between writing the remote lock and reading it back
LOCK = ".lock"
REMOTE_LOCK = ".lock.remote"  # a reader's copy of a run's remote lock
MARKER = ".dlfx_mirror_of"  # beside a mirror (in its temporary parent): the URL of the folder it copies
OWNER = ".dlfx_mirror_owner"  # beside it too: the process that made the mirror, and whether it writes
PREFIX = "dlfx-mirror-"
NEVER_PULLED = ("checkpoints", "corrupt_checkpoints")  # Orbax reads them in place
NOT_READ = NEVER_PULLED + ("events", "plots")  # what readers do not need


SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes etils.epath reaches
# read as URLs downstream: a scheme and one slash (gs:/x; epath drops a leading ./), or gs:x / s3:x (tensorboardX)
_MISTYPED = re.compile(r"(?i:(gs|gcs|s3|az|hf|file|https?):/(?!/))|(gs|s3):")


def is_remote(path: str) -> bool:
    """True for a URL (gs://bucket/...), False for a local path. A URL dlfx cannot reach (an unknown scheme, no
    bucket) or a local path that is a mistyped URL (`gs:/x`) is refused with a ConfigError."""
    path = str(path)
    scheme, sep, rest = path.partition("://")
    if not sep:
        mistyped = _MISTYPED.match(os.path.normpath(path))
        if mistyped:
            scheme = (mistyped[1] or mistyped[2]).lower()
            url = f"write {'gs' if scheme == 'gcs' else scheme}://BUCKET/..., or " if scheme in SCHEMES + ("gcs",) \
                else ""
            raise ConfigError(f"{path!r} looks like a mistyped URL: {url}give a local folder as an absolute path")
        return False
    if scheme not in SCHEMES:
        hint = " (in lower case)" if scheme.lower() in SCHEMES else " (write gs://)" if scheme.lower() == "gcs" else ""
        raise ConfigError(f"{path}: dlfx reaches {', '.join(s + '://' for s in SCHEMES)} folders{hint} and local "
                          f"paths, not {scheme}://")
    if not rest.split("/")[0]:  # gs:// or gs:///x: the filesystem's root, no run folder
        raise ConfigError(f"{path!r} names no bucket: give a folder such as {scheme}://BUCKET/runs/NAME")
    return True


def normalized(url: str) -> str:
    """One spelling of a URL (no double or trailing slashes), so that a folder is known as itself."""
    return str(epath.Path(url)) if is_remote(url) else url


def origin(workdir: str) -> str:
    """The folder a workdir stands for: the URL of a mirror, a URL as given, else the absolute local path."""
    if is_remote(workdir):
        return normalized(workdir)
    marker = os.path.join(os.path.dirname(os.path.abspath(workdir)), MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            return f.read().strip()
    return os.path.abspath(workdir)


def shown(workdir: str) -> str:
    """How to name a workdir to the user: a mirror by its URL, anything else as given."""
    found = origin(workdir)
    return found if is_remote(found) else workdir


def join(folder: str, *names: str) -> str:
    """`folder/name...` for a local path or a URL."""
    return str(epath.Path(folder).joinpath(*names)) if is_remote(folder) else os.path.join(folder, *names)


def _fail(what: str, path: str, error: Exception) -> ConfigError:
    return ConfigError(f"cannot {what} {path}: {one_line(error)}")


def _local_fail(url: str, folder: str, error: OSError) -> WorkdirError:
    """The error for a local copy of `url` that cannot be written in `folder` (a full or read-only disk)."""
    return WorkdirError(f"cannot keep the local copy of {url} in {folder}: {error.strerror or error} (the "
                        "TMPDIR environment variable picks the folder)")


def _process() -> dict:
    """This process, as a mirror's owner file and a remote lock name it."""
    from dlfx.workdir import _boot_id, _start_ticks

    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "start": _start_ticks(os.getpid())}


def _gone(held: dict) -> bool:
    """Whether `held` names a process of this machine that no longer runs (in this boot: not alive, or its pid
    taken by a later process; or of an earlier boot)."""
    from dlfx.workdir import _alive, _boot_id, _start_ticks

    pid, boot = held.get("pid"), _boot_id()
    if held.get("host") != socket.gethostname() or not isinstance(pid, int) or boot == "-":
        return False
    if held.get("boot") != boot:
        return held.get("boot") not in (None, "-")
    start = held.get("start", "-")
    return not _alive(pid) or (start != "-" and _start_ticks(pid) not in ("-", start))


def _same_process(a: dict, b: dict) -> bool:
    """Whether two records (a mirror's owner, a lock) name one process: the same pid, host and boot, and the
    same start ticks where both record them."""
    if any(a.get(k) != b.get(k) for k in ("pid", "host", "boot")):
        return False
    return "-" in (a.get("start", "-"), b.get("start", "-")) or a.get("start") == b.get("start")


def _orphans() -> list[tuple[str, dict, str]]:
    """(temporary folder, owner, URL) of every mirror in the temporary folder whose process is gone."""
    found = []
    for root in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            with open(os.path.join(root, OWNER)) as f:
                owner = json.load(f)
            with open(os.path.join(root, MARKER)) as f:
                url = f.read().strip()
        except (OSError, ValueError):
            continue  # being made, or not ours
        if isinstance(owner, dict) and _gone(owner):
            found.append((root, owner, url))
    return found


def lock_age(held: dict) -> float | None:
    """Seconds since a remote lock was refreshed, or None if it is stale (older than `STALE_SECONDS`, no valid
    time, or a time further ahead than a clock can be off)."""
    stamp = held.get("time")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
        return None
    age = time.time() - stamp
    return max(age, 0.0) if -STALE_SECONDS < age < STALE_SECONDS else None


def _snapshot(local: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files a mirror at `local` pushes (checkpoints, temporary and lock
    files left out)."""
    found = {}
    for folder, subdirs, files in os.walk(local):
        if folder == local:
            subdirs[:] = [d for d in subdirs if d not in NEVER_PULLED]
        for name in files:
            if name in (LOCK, REMOTE_LOCK) or name.endswith(".tmp"):
                continue
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                stat = os.stat(path)
                found[os.path.relpath(path, local)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _pull(remote: epath.Path, local: str, skip: tuple[str, ...], locks: bool = False) -> None:
    """Copy the remote folder's files into `local`: remote errors as ConfigErrors, local ones (a full disk) as
    the OSErrors they are. `locks`: a run's `.lock` comes as `.lock.remote` (readers: is the run live?)."""
    try:
        entries = [(path, path.is_dir()) for path in remote.iterdir()
                   if path.name not in skip and (locks or path.name != LOCK)]
    except Exception as e:
        raise _fail("read the run folder", str(remote), e) from None
    for path, is_dir in entries:
        target = os.path.join(local, REMOTE_LOCK if path.name == LOCK else path.name)
        if is_dir:
            _pull(path, target, skip, locks)
            continue
        try:
            content = path.read_bytes()
        except Exception as e:
            raise _fail("read", str(path), e) from None
        os.makedirs(local, exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)


class Mirror:
    """A temporary local copy of the remote folder `url` (created by the first write if `url` is new).

    With `writer`, this process trains there: it holds the remote lock, and `push()` copies every file that
    changed since the last push (a background thread calls it, and the runner before each checkpoint save).
    `close()` pushes every file, releases the lock and deletes the copy; a start-up that failed (no
    `status.json` in the mirror) pushes nothing, so a new remote folder is left empty as it was.
    """

    def __init__(self, url: str, writer: bool = False, skip: tuple[str, ...] = NEVER_PULLED):
        is_remote(url)  # refuses a URL dlfx cannot reach
        self.url = normalized(url)
        self.remote, self.writer = epath.Path(self.url), writer
        for root, owner, _ in _orphans():
            if not owner.get("writer") or not owner.get("pulled"):
                shutil.rmtree(root, ignore_errors=True)  # a dead reader's or an unfinished pull: nothing of its own
        try:
            self.root = tempfile.mkdtemp(prefix=PREFIX)
        except OSError as e:
            raise _local_fail(url, tempfile.gettempdir(), e) from None
        self.local = os.path.join(self.root, self.remote.name or "run")
        self._sent: dict[str, tuple[int, int]] = {}
        self._lock_held, self._push_lock, self._token = False, threading.Lock(), uuid.uuid4().hex
        self.lost: WorkdirError | None = None  # another run took the lock over
        self._wake, self._stop, self._thread = threading.Event(), threading.Event(), None
        try:
            with open(os.path.join(self.root, MARKER), "w") as f:
                f.write(self.url)
            self._write_owner(pulled=False)
            try:
                exists = self.remote.exists()
                if exists and not self.remote.is_dir():
                    raise ConfigError(f"{url} is a file, not a run folder")
            except ConfigError:
                raise
            except Exception as e:
                raise _fail("reach", url, e) from None
            if writer:
                self._take_lock()
            if exists:
                _pull(self.remote, self.local, skip, locks=not writer)
                self._sent = _snapshot(self.local)
            self._write_owner(pulled=True)  # from here on the mirror may hold lines of its own
        except BaseException as e:
            self._release_lock()
            shutil.rmtree(self.root, ignore_errors=True)
            if isinstance(e, OSError):  # the local copy's own files (remote errors are ConfigErrors by now)
                raise _local_fail(url, tempfile.gettempdir(), e) from None
            raise
        if writer:
            self._thread = threading.Thread(target=self._pusher, daemon=True, name="dlfx-push")
            self._thread.start()

    def named(self, error: DlfxError) -> DlfxError:
        """`error` with this temporary copy's paths named by the URL they stand for (the copy is deleted next)."""
        text = str(error)
        return error if self.local not in text else type(error)(text.replace(self.local, self.url))

    def _write_owner(self, pulled: bool) -> None:
        """Record this process beside the mirror, and whether the pull is done (a mirror whose process died
        before that holds nothing of its own, maybe half-written files)."""
        write_json(os.path.join(self.root, OWNER), dict(_process(), writer=self.writer, pulled=pulled))

    # --- the remote lock -------------------------------------------------------------------------
    def _owner(self) -> dict:
        return dict(_process(), time=time.time(), token=self._token)

    def _take_lock(self) -> None:
        lock = self.remote / LOCK
        try:
            held = json.loads(lock.read_text()) if lock.exists() else None
        except (ValueError, UnicodeDecodeError):
            held = None  # half-written: stale
        except Exception as e:
            raise _fail("read the lock", str(lock), e) from None
        gone = isinstance(held, dict) and _gone(held)
        if held is not None and not isinstance(held, dict):
            print(f"dlfx: warning: taking over the lock {lock}, which names no process", file=sys.stderr)
        elif held is not None and (held.get("host"), held.get("pid")) != (socket.gethostname(), os.getpid()):
            age = lock_age(held)
            if age is not None and not gone:
                raise self._in_use(held, age)
            why = "which is no longer running" if gone else \
                f"not refreshed for {STALE_SECONDS:.0f} s" if age is None else f"not refreshed for {age:.0f} s"
            print(f"dlfx: warning: taking over the lock {lock} of process {held.get('pid')} on host "
                  f"{held.get('host')}, {why}", file=sys.stderr)
        self._write_lock()
        self._lock_held = True
        # no atomic create on every filesystem: two runs that read "free" at once both wrote; the later write wins
        # and the other run, reading back after a pause, sees it and steps back
        time.sleep(LOCK_SETTLE_SECONDS)
        try:
            now = json.loads(lock.read_text())
        except Exception:  # not readable back (a blip): ours, as written
            now = None
        if isinstance(now, dict) and now.get("token") != self._token:
            self._lock_held = False  # the other run's lock: left alone
            raise self._in_use(now, lock_age(now) or 0.0)
        if gone:
            self._finish_push_of(held)
        for root, owner, url in _orphans():
            if url == self.url and owner.get("writer"):  # a dead writer of this folder the lock no longer named
                print(f"dlfx: warning: {root} holds files of an earlier run in {self.url} whose process "
                      f"{owner.get('pid')} stopped without copying them; they were not copied, because the lock "
                      "no longer named that process (a later run may have replaced them): copy what you need "
                      "and delete it", file=sys.stderr)

    def _in_use(self, held: dict, age: float) -> ConfigError:
        return ConfigError(f"{self.url} is in use by process {held.get('pid')} on host {held.get('host')} (its lock "
                           f"{self.remote / LOCK} was refreshed {age:.0f} s ago); wait for it, or remove the lock if "
                           f"that run is gone (a lock not refreshed for {STALE_SECONDS:.0f} s is taken over)")

    def _finish_push_of(self, held: dict) -> None:
        """Push what the dead writer `held` left unpushed in its mirror here (every file of a started run, as
        its own last push would have), then delete that mirror. If the push fails, the dead writer's lock is
        put back, so the next run retries."""
        for root, owner, url in _orphans():
            if url != self.url or not owner.get("writer") or not owner.get("pulled") or not _same_process(owner, held):
                continue
            local = os.path.join(root, self.remote.name or "run")
            try:
                if os.path.isfile(os.path.join(local, "status.json")):
                    for rel in _snapshot(local):
                        with open(os.path.join(local, rel), "rb") as f:
                            content = f.read()
                        target = self.remote / rel
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(content)
                    print(f"dlfx: warning: copied to {self.url} what process {held.get('pid')} had not pushed "
                          f"before it stopped (its mirror {local})", file=sys.stderr)
            except FileNotFoundError:
                continue  # deleted while read: another run took it over at the same moment and pushed it
            except Exception as e:
                with contextlib.suppress(Exception):
                    (self.remote / LOCK).write_text(json.dumps(held))
                self._lock_held = False
                raise _fail(f"copy the files that process {held.get('pid')} left in {local} to", self.url,
                            e) from None
            shutil.rmtree(root, ignore_errors=True)

    def _write_lock(self) -> None:
        try:
            (self.remote / LOCK).write_text(json.dumps(self._owner()))
        except Exception as e:
            raise _fail("write the lock in", self.url, e) from None

    def _release_lock(self) -> None:
        """Remove the remote lock if it still names this process (another may have taken it over since)."""
        if self._lock_held:
            self._lock_held = False
            with contextlib.suppress(Exception):
                held = json.loads((self.remote / LOCK).read_text())
                if (held.get("host"), held.get("pid"), held.get("start")) == \
                        (socket.gethostname(), os.getpid(), _process()["start"]):
                    (self.remote / LOCK).unlink()

    # --- pushing -----------------------------------------------------------------------------------
    def push(self, everything: bool = False) -> None:
        """Copy every file that changed since the last push (`everything`: every file, also one deleted remotely
        meanwhile) to the remote folder; refresh the lock."""
        if not os.path.isfile(os.path.join(self.local, "status.json")):
            return  # the run has not started (or its start-up failed): nothing of it belongs remote
        with self._push_lock:
            self._check_lock_still_ours()
            now = _snapshot(self.local)
            for rel, stamp in now.items():
                if self._sent.get(rel) == stamp and not everything:
                    continue
                try:
                    with open(os.path.join(self.local, rel), "rb") as f:
                        content = f.read()
                except FileNotFoundError:  # replaced in between: the next push takes the new one
                    now.pop(rel)
                    continue
                target = self.remote / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            for rel in set(self._sent) - set(now):
                with contextlib.suppress(FileNotFoundError):
                    (self.remote / rel).unlink()
            self._sent = now
            if self._lock_held:
                self._write_lock()

    def _check_lock_still_ours(self) -> None:
        """Raise the `lost` error once another run took this run's lock over (it was not refreshed for
        `STALE_SECONDS`: a stalled or cut-off host): from then on this run writes nothing more there."""
        if self.lost is None and self._lock_held:
            with contextlib.suppress(Exception):  # unreadable: a blip, the lock is rewritten below
                held = json.loads((self.remote / LOCK).read_text())
                if isinstance(held, dict) and held.get("token") not in (None, self._token):
                    self._lock_held = False
                    self.lost = WorkdirError(
                        f"{self.url} was taken over by process {held.get('pid')} on host {held.get('host')}, which "
                        f"found this run's lock stale; this run stops writing there: its unsent files are kept in "
                        f"{self.root}")
        if self.lost is not None:
            raise self.lost

    def push_before_save(self) -> None:
        """Push now, in the caller's thread: called before each checkpoint save, so that the logs up to a
        checkpoint are remote before it exists (a resume from it never logs those steps again). A failure is a
        warning (the pusher retries); a lock another run took over stops the run (`lost`)."""
        try:
            self.push()
        except WorkdirError:
            raise
        except Exception as e:
            print(f"dlfx: warning: could not copy the run to {self.url} before a checkpoint ({one_line(e)}); "
                  "retrying", file=sys.stderr)
            self._wake.set()

    def _pusher(self) -> None:
        warned = False
        while not self._stop.is_set():
            self._wake.wait(PUSH_SECONDS)
            self._wake.clear()
            try:
                self.push()
            except Exception as e:  # e.g. a network blip: the next push retries
                if not warned:
                    print(f"dlfx: warning: could not copy the run to {self.url} ({one_line(e)}); "
                          "retrying", file=sys.stderr)
                    warned = True

    def close(self) -> None:
        """Stop the pusher, push what is left (writer), release the lock and delete the local copy. If the last
        push fails, the copy is kept and the error names where it is."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        try:
            if self.writer:
                try:
                    self.push(everything=True)  # also what was deleted remotely while the run wrote it
                except WorkdirError as e:
                    if e is self.lost:  # its files stay here, its lock is the other run's
                        raise
                    raise ConfigError(f"could not copy the run to {self.url} ({one_line(e)}); its files "
                                      f"are kept in {self.local}") from None
                except Exception as e:
                    self._lock_held = False
                    raise ConfigError(f"could not copy the run to {self.url} ({one_line(e)}); its files "
                                      f"are kept in {self.local}") from None
            shutil.rmtree(self.root, ignore_errors=True)
        finally:
            self._release_lock()


@contextlib.contextmanager
def mirrored(workdir: str, writer: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(local folder to train in, call before each checkpoint save): `workdir` itself if it is local, else a
    mirror of it that is pushed back (by `writer`, the process that writes the logs)."""
    if not is_remote(workdir):
        yield workdir, lambda: None
        return
    mirror = Mirror(workdir, writer=writer)
    try:
        yield mirror.local, mirror.push_before_save if writer else (lambda: None)
    except DlfxError as e:
        raise mirror.named(e) from e.__cause__
    finally:
        mirror.close()


@contextlib.contextmanager
def readable(path: str) -> Iterator[str]:
    """A local folder with a run's files (or, for a folder of runs, theirs): `path` itself if it is local, else
    a temporary pull of the files readers use (no checkpoints, events or plots: those stay remote)."""
    if not is_remote(path):
        yield path
        return
    try:
        exists = epath.Path(path).is_dir()
    except Exception as e:
        raise _fail("reach", path, e) from None
    if not exists:
        raise ConfigError(f"no such run folder: {path}")
    mirror = Mirror(path, skip=NOT_READ)
    try:
        yield mirror.local
    except DlfxError as e:
        raise mirror.named(e) from e.__cause__
    finally:
        mirror.close()


@contextlib.contextmanager
def writable_file(path: str) -> Iterator[str]:
    """A local file name to write `path` to: `path` itself, or for a URL a temporary file uploaded on success."""
    if not is_remote(path):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="dlfx-out-")
    try:
        local = os.path.join(folder, epath.Path(path).name)
        yield local
        try:
            target = epath.Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as f:
                target.write_bytes(f.read())
        except Exception as e:
            raise _fail("write", path, e) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
