"""The run directory: paths on any filesystem, atomic writes, writability, and the exclusive lock.

Every path the package reads or writes goes through `etils.epath`, so a workdir (or a dataset file)
can be local or a URL such as `gs://bucket/run`; only a local path without a scheme is made
absolute. Files that a concurrent reader could see half-written go to a temporary name first and
are then renamed (on GCS an object only appears once complete, so the rename is a copy of a whole
object).

The lock makes one run own a workdir (two runs would overwrite each other's checkpoints). It needs
nothing but create, list, read and delete, so it holds on GCS as on a local disk: each claimant
writes its own lock file, then lists the lock folder; a claimant that sees another live holder
removes its own file and fails. Holders refresh a heartbeat; a lock whose process is gone (same
host) or whose heartbeat is older than `stale_after_s` is taken over with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator

from etils import epath

from contrastood import errors

LOCK_DIR = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def as_path(path: str | os.PathLike) -> epath.Path:
    """A URL (gs://...) as given; a local path made absolute (relative to the current directory)."""
    text = os.fspath(path)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def atomic_write_bytes(path: epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary sibling, then renames it over `path`."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.write_bytes(data)
    tmp.replace(path)


def atomic_write_text(path: epath.Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Moves a directory (a rename where the filesystem has one; copy, then delete, on object stores)."""
    source, target = epath.Path(source), epath.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        source.rename(target)
        return
    except Exception:  # pylint: disable=broad-except  # object stores refuse to rename "directories"
        if target.exists():
            raise
    for directory, _, files in source.walk():
        relative = epath.Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            (epath.Path(directory) / name).copy(target / relative / name)
    source.rmtree()


def check_writable(path: epath.Path) -> None:
    """Creates (if needed) and probes the directory, so a read-only or full workdir fails before work."""
    path = epath.Path(path)
    probe = path / f".write-probe-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise errors.WorkdirError(f"the workdir {path} is not writable ({describe_os_error(error)}); "
                                  f"{os_error_fix(error)}") from error


def describe_os_error(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else (str(error).splitlines() or [type(error).__name__])[0]


def os_error_fix(error: OSError) -> str:
    """The advice for the OS errors a user meets with a workdir."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk (or point --workdir elsewhere); finished checkpoints are kept"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "point --workdir at a directory you can write"
    return "check the path and its permissions"


# ----------------------------------------------------------------------------------------- the lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class _Lock:
    """One held lock: its file, and the thread that refreshes the heartbeat."""

    def __init__(self, directory: epath.Path, holder: dict, stale_after_s: float):
        self.directory = directory
        self.holder = holder
        self.path = directory / LOCK_DIR / f"{holder['token']}.json"
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        check_writable(self.path.parent)  # a read-only or full workdir is the user's error, named as such
        self._write()
        for other in sorted(self.path.parent.glob("*.json")):
            if other.name == self.path.name:
                continue
            holder = _read_holder(other)
            if holder is None:  # vanished (released) between listing and reading
                continue
            stale = self._stale_reason(holder)
            if stale:
                logging.warning("taking over the stale lock %s of %s (%s)", other, _describe(holder), stale)
                with contextlib.suppress(OSError):
                    other.unlink()
                continue
            self.path.unlink()
            raise errors.WorkdirLockedError(
                f"the workdir {self.directory} is in use by {_describe(holder)} (lock file {other}); wait for "
                f"that run to finish, or give this run another --workdir. If that run is no longer running, "
                f"delete {other} (it is also taken over by itself {self.stale_after_s:.0f} s after its last "
                f"heartbeat)")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock-heartbeat")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _write(self) -> None:
        self.holder["heartbeat"] = time.time()
        # Atomic: a claimant listing the folder mid-write would take a truncated file for a crashed
        # holder's (stale) and delete a live lock.
        atomic_write_text(self.path, json.dumps(self.holder))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError as error:  # a transient storage error must not kill the run
                logging.warning("could not refresh the workdir lock %s: %s", self.path, error)

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == self.holder["host"] and not _process_alive(int(holder.get("pid", -1))):
            return f"process {holder.get('pid')} on this host is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None


def _read_holder(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written by a crashed claimant: treat as stale
        return {"host": "?", "pid": -1, "heartbeat": 0, "started": 0, "token": path.stem}


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return (f"{holder.get('command', 'a run')} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {started})")


class _Held:
    """This process's hold on a workdir: the lock itself on process 0, a placeholder on the others."""

    def __init__(self, lock: _Lock | None):
        self.lock = lock
        self.depth = 1


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(directory: str | os.PathLike, *, command: str = "a contrastood run",
           stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
    """Holds the workdir's lock for the block. Re-entrant within a process (train -> evaluate -> clp).

    Under several JAX processes, process 0 takes the lock for all of them and every process learns
    the outcome, so all fail together when the workdir is in use.
    """
    import jax  # local: keeps this module importable without initialising JAX

    path = as_path(directory)
    key = os.fspath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_GUARD:
                held.depth -= 1
        return

    lock = None
    failure = None
    if jax.process_index() == 0:
        holder = {"token": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                  "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": command}
        lock = _Lock(path, holder, stale_after_s)
        try:
            lock.acquire()
        except errors.WorkdirLockedError as error:
            failure = error
            lock = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(failure is None))
        if not ok and failure is None:
            failure = errors.WorkdirLockedError(f"the workdir {path} is in use by another run (see process 0's log)")
    if failure is not None:
        raise failure
    with _HELD_GUARD:
        _HELD[key] = _Held(lock)
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        if lock is not None:
            lock.release()
