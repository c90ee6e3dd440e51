"""One daemon per data directory: an exclusive lock held for the daemon's life.

Two daemons on one directory would both append to the journal, and the
second one's start-up compaction deletes the journal the first is still
writing: acknowledged data lost. So the daemon takes ``flock(LOCK_EX)`` on
``<data_dir>/managerd.lock`` before it touches anything else there (no
recovery, no compaction, no authkey), and writes its pid into the file for
the message a second daemon prints.

``flock`` rather than a pid file alone: the kernel drops the lock when its
holder dies, however it dies (kill -9 included), so a stale file never
blocks a restart; the pid in it is only information. The descriptor is
close-on-exec (Python's default), so nothing the daemon starts inherits it.
On NFS, ``flock`` is emulated with ``fcntl`` locks on modern Linux; a
directory shared between hosts over something without locks is not safe.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Final

LOCK_FILE: Final = "managerd.lock"


class DataDirInUse(Exception):
    """Another live daemon holds the data directory."""


class DataDirLock:
    """The exclusive lock of one data directory; :meth:`release` (or exit) frees it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / LOCK_FILE
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder}" if holder else "another process"
            raise DataDirInUse(
                f"data directory {directory} is in use by another managerd ({who}); "
                "one daemon per data directory"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the flock; the file stays (harmless, reused)
            self._fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
