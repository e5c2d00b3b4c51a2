"""One daemon per data folder: an advisory lock on ``<data>/daemon.lock``.

The daemon holds the lock (``fcntl.flock``, released by the kernel when the process ends, however
it ends) for as long as it runs, with its pid written in the file. A second daemon on the same
folder is refused with one line naming the first one's pid; commands that must not run beside a
daemon (``restore``) ask :func:`daemon_pid` first. Other commands (``train``, ``import-labels``,
...) do not take this lock: they work beside a running daemon.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "daemon.lock"
PROBE_RETRIES = 40          # x 50 ms: how long a start waits out another command's look at the lock


class DaemonRunning(Exception):
    """Another daemon holds the data folder's lock."""

    def __init__(self, data_path: Path, pid: int | None):
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"a tastefeed daemon ({who}) is already running on {Path(data_path).resolve()}")


class DaemonLock:
    """Hold ``<data>/daemon.lock`` while the daemon runs (``acquire``/``release``, or ``with``)."""

    def __init__(self, data_path: str | Path):
        self.path = Path(data_path) / LOCK_NAME
        self._file = None

    def acquire(self) -> "DaemonLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        for attempt in range(PROBE_RETRIES + 1):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                pid = _parse_pid(f.read())
                # No pid written: a `status` (daemon_pid) looking for a moment, not a daemon; wait.
                if pid is None and attempt < PROBE_RETRIES:
                    time.sleep(0.05)
                    continue
                f.close()
                raise DaemonRunning(self.path.parent, pid) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            try:
                self._file.seek(0)
                self._file.truncate()
            except OSError:
                pass
            self._file.close()   # closing releases the lock
            self._file = None

    def __enter__(self) -> "DaemonLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def daemon_pid(data_path: str | Path) -> int | None:
    """The pid of the daemon running on ``data_path``, or None when none runs (the lock is free
    or there is no lock file). Reading never creates the folder or the file."""
    path = Path(data_path) / LOCK_NAME
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return _parse_pid(f.read()) or -1
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _parse_pid(text: str) -> int | None:
    try:
        pid = int(text.strip().split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 else None
