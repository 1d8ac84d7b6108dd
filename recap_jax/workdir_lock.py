"""One writer per workdir: a file lock that a second run on a live workdir cannot take.

    with WorkdirLock(workdir):          # WorkdirBusy if another live process holds it
        train(...)

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``WORKDIR/.lock``; the holder writes its
identity into the file (host, pid, start time, command line) so the refusal can name it.
The kernel drops a flock when its process dies (SIGKILL included), so a lock left by a dead
run is free: it is taken over, with a warning naming the previous holder. A lock still held
although the recorded holder's pid is gone from this host (a forked child inherited the
descriptor and outlived it) is stale too: the file is replaced. A live holder, or one on
another host (which cannot be checked from here), makes `acquire` raise WorkdirBusy with its
identity and how to remove the lock by hand.

Only process 0 of a multi-process run should take the lock (the others write nothing).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

__all__ = ["LOCK_NAME", "Holder", "WorkdirBusy", "WorkdirLock", "read_holder"]

LOCK_NAME = ".lock"

_log = logging.getLogger(__name__)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: written as JSON into the lock file."""

    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    command: str = ""

    @classmethod
    def current(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), " ".join(sys.argv)[:500])

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        command = f", command {self.command!r}" if self.command else ""
        return f"pid {self.pid} on host {self.host} (since {started}{command})"


def read_holder(path: str) -> Holder | None:
    """The identity written in lock file ``path``; None if absent, empty or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        return Holder(str(raw["host"]), int(raw["pid"]), float(raw["started"]),
                      str(raw.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM  # exists, owned by someone else
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def holder_is_stale(holder: Holder | None, host: str | None = None) -> bool:
    """True when the recorded holder certainly no longer runs: it ran on this host and its
    pid is gone. A holder on another host cannot be checked from here (False)."""
    if holder is None:
        return True
    return holder.host == (host or socket.gethostname()) and not pid_alive(holder.pid)


class WorkdirLock:
    """Context manager holding ``WORKDIR/.lock`` exclusively for the life of a run.

    ``acquire`` raises WorkdirBusy naming the holder when a live process has it; a lock left
    by a dead process is taken over with a warning. ``release`` (or leaving the ``with``)
    unlocks and removes the identity; it is idempotent.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None
        self.previous: Holder | None = None  # the stale holder taken over, if any

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        """Takes the lock (see the class docstring); WorkdirBusy names a live holder."""
        if self.held:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):  # a stale lock file broken by us or a racing run: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._lock_or_break(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:
            raise WorkdirBusy(self._busy_message(read_holder(self.path)))
        recorded = read_holder(self.path)
        if recorded is not None:  # a run that ended without releasing (killed): flock is free
            _log.warning("workdir %s: taking over the lock of a run that is no longer alive (%s)",
                         self.workdir, recorded.describe())
            self.previous = recorded
        self._write_identity(fd)
        self._fd = fd
        return self

    def _lock_or_break(self, fd: int) -> bool:
        """True when ``fd`` (still the file at self.path) is locked by us; False when the file
        was a stale lock that is now unlinked (the caller opens a new one); WorkdirBusy when a
        live process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(self.path)
            if holder is None or not holder_is_stale(holder):
                raise WorkdirBusy(self._busy_message(holder)) from None
            # The holder's pid is dead on this host, yet the flock is held: a child that
            # inherited the descriptor (a forked worker) outlived it. Break the lock.
            _log.warning("workdir %s: the lock's holder is dead (%s) but a leftover process keeps "
                         "the file locked; replacing the lock file", self.workdir, holder.describe())
            if _same_file(fd, self.path):
                os.unlink(self.path)
            self.previous = holder
            return False
        if not _same_file(fd, self.path):  # replaced by a run that broke a stale lock meanwhile
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True

    def _write_identity(self, fd: int) -> None:
        data = json.dumps(dataclasses.asdict(Holder.current())).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _busy_message(self, holder: Holder | None) -> str:
        who = holder.describe() if holder is not None else "a process that has not written its identity yet"
        return (f"workdir {self.workdir} is in use by {who}: two runs writing one workdir corrupt each "
                f"other's checkpoints and metrics. Stop that run first, or use another --workdir. (If you "
                f"are sure it is gone, e.g. it ran on another host, delete {self.path}.)")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no identity left behind: the next run takes it silently
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
