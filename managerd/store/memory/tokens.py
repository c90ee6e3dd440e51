"""Fencing tokens: one daemon-wide source, strictly increasing across restarts.

A fencing token is only worth something if a holder that comes later always
has a larger one, and "later" includes a later *daemon*: a client that
holds token 7 from before a restart must not see a new holder get 1. A
counter per lock object (what this replaced) starts over at every start.

Why one source for the daemon rather than a counter per lock: a per-lock
counter would have to be persisted per lock (a journal record per acquire,
an fsync in ``always`` mode), while one source needs one number on disk
for the whole daemon and at most one write every ~71 minutes. Tokens of a
lock are then increasing but not consecutive, which the contract never
promised ("greater than every earlier holding's").

The design is a hybrid of a clock and hi/lo allocation:

- ``token = max(last + 1, wall clock in microseconds)``. Tokens track the
  clock, so a new daemon's first token exceeds every token of the daemon it
  replaced, without any disk (acquisitions are far slower than one per
  microsecond, so the clock outruns ``last + 1``). This is all a daemon
  without a data directory has: it holds unless the clock is stepped back
  across a restart.
- With a data directory, a persisted *ceiling* guards against exactly that:
  at start the stored ceiling C is read and tokens start at
  ``max(now_us, C)``; a new ceiling ``start + 2**32`` is stored (tmp file,
  fsync, rename, directory fsync) before the daemon serves, and extended the
  same way, synchronously, when a token reaches it. Every token ever issued
  is below the stored ceiling, so no later daemon can repeat one, whatever
  its clock says.

Tokens stay below 2**53 (exact as JSON numbers, as floats) until the
year ~2255: microseconds since 1970 are about 1.8e15 today.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

log = logging.getLogger("managerd")

CEILING_FILE: Final = "fencing-ceiling"
#: How far past the start (or the token that reached it) a stored ceiling
#: lies: 2**32 us is ~71.6 minutes of clock between synchronous writes.
CEILING_STEP: Final = 2**32


class TokenStoreError(Exception):
    """The stored ceiling cannot be read or written; tokens could repeat."""


def _now_us() -> int:
    return time.time_ns() // 1000


class TokenSource:
    """Issues the daemon's fencing tokens; ``directory`` persists the ceiling."""

    def __init__(
        self, directory: Path | None = None, clock_us: Callable[[], int] = _now_us
    ) -> None:
        self._clock_us = clock_us
        self._path = None if directory is None else directory / CEILING_FILE
        self._ceiling: int | None = None
        start = clock_us()
        if self._path is not None:
            start = max(start, self._read_ceiling(self._path))
            self._store(start + CEILING_STEP)
        #: The last token issued (the first one is ``start`` or later).
        self.last = start - 1

    def next(self) -> int:
        """A token greater than every token this source (or an earlier daemon) issued."""
        token = max(self.last + 1, self._clock_us())
        if self._ceiling is not None and token >= self._ceiling:
            # Rare (every ~71 minutes): blocks the loop for one fsync.
            try:
                self._store(token + CEILING_STEP)
            except TokenStoreError as exc:
                # Tokens stay increasing in this process; only a crash *and*
                # a clock stepped back before the next successful store could
                # repeat one. Refusing every acquire would be worse: retry on
                # the next token, loudly.
                log.error("%s; retrying at the next acquire", exc)
        self.last = token
        return token

    @staticmethod
    def _read_ceiling(path: Path) -> int:
        try:
            text = path.read_text("ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenStoreError(f"cannot read the fencing-token ceiling {path}: {exc}") from exc
        if not text.isdigit():
            raise TokenStoreError(
                f"the fencing-token ceiling {path} holds {text[:40]!r}, not a number; "
                "a token could repeat: fix or remove it by hand (remove only if the clock "
                "is known to be right)"
            )
        return int(text)

    def _store(self, ceiling: int) -> None:
        assert self._path is not None
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{ceiling}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise TokenStoreError(
                f"cannot store the fencing-token ceiling {self._path}: {exc.strerror or exc}"
            ) from exc
        self._ceiling = ceiling
