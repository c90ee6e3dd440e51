"""A duplex or one-way pipe between two ends (``multiprocessing.Pipe``)."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Any, ClassVar

from managerd.store.api import BadArgument, Call, Conv, exposed
from managerd.store.memory.base import (
    SharedObject,
    Waiter,
    alive_count,
    checked_wait,
    fail_all,
    pop_alive,
    timeout_s,
    wait_or_now_s,
)
from managerd.store.stats import PipeStats


class _Read(enum.Enum):
    """A parked reader's ``waiter.data``: what it waits for."""

    RECV = enum.auto()  # a message
    POLL = enum.auto()  # to know there is one (or EOF)


def _recv_timeout(waiter: Waiter) -> None:
    waiter.fail(TimeoutError("recv() timed out"))


def _poll_timeout(waiter: Waiter) -> None:
    waiter.finish(False)


class Pipe(SharedObject):
    """A named two-ended pipe: what end 0 sends, end 1 receives, and back.

    With ``duplex=False`` end 0 only receives and end 1 only sends, as
    ``multiprocessing.Pipe(duplex=False)`` returns ``(reader, writer)``.
    """

    typeid = "Pipe"
    create_params = ("duplex",)
    undo_methods: ClassVar[dict[str, str]] = {"recv": "_undo_recv"}

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, duplex: bool = True) -> None:
        super().__init__(name, loop)
        if not isinstance(duplex, bool):
            raise BadArgument("duplex must be a bool")
        self.duplex = duplex
        self.inbox: tuple[deque[bytes], deque[bytes]] = (deque(), deque())
        self.readers: tuple[deque[Waiter], deque[Waiter]] = (deque(), deque())
        self.closed = [False, False]
        self.sent_total = 0

    def creation_args(self) -> dict[str, Any]:
        return {"duplex": self.duplex}

    @staticmethod
    def _end(end: int) -> int:
        if end not in (0, 1):
            raise ValueError("a pipe has ends 0 and 1")
        return end

    def _check_open(self, end: int) -> None:
        if self.closed[end]:
            raise OSError("handle is closed")

    @exposed(payload=Conv.PAYLOAD, mutates=True)
    def send(self, call: Call, end: int, payload: bytes) -> None:
        end = self._end(end)
        self._check_open(end)
        if not self.duplex and end == 0:
            raise OSError("connection is read-only")
        if not isinstance(payload, bytes):
            raise BadArgument("pipe messages travel as pickled bytes")
        other = 1 - end
        if self.closed[other]:
            raise BrokenPipeError("the other end of the pipe is closed")
        self.sent_total += 1
        readers = self.readers[other]
        delivered = False
        while readers:
            waiter = readers.popleft()
            if not waiter.alive:
                continue
            if waiter.data is _Read.POLL:
                waiter.finish(True)
                continue
            waiter.finish(payload)
            delivered = True
            break
        if not delivered:
            self.inbox[other].append(payload)

    def _read_check(self, end: int) -> None:
        self._check_open(end)
        if not self.duplex and end == 1:
            raise OSError("connection is write-only")

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def recv(self, call: Call, end: int, timeout: float | None = None) -> Any:
        end = self._end(end)
        self._read_check(end)
        wait_s = timeout_s(True, timeout)
        if self.inbox[end]:
            return self.inbox[end].popleft()
        if self.closed[1 - end]:
            raise EOFError("the other end of the pipe is closed")
        return self.park(self.readers[end], call, wait_s, _recv_timeout, _Read.RECV)

    def _undo_recv(self, call: Call, args: tuple[Any, ...], payload: bytes) -> None:
        """A recv answered but abandoned by its client: the message is first again."""
        end = self._end(args[0])
        inbox = self.inbox[end]
        inbox.appendleft(payload)
        readers = self.readers[end]
        while inbox and readers:
            waiter = readers.popleft()
            if not waiter.alive:
                continue
            if waiter.data is _Read.POLL:
                waiter.finish(True)
            else:
                waiter.finish(inbox.popleft())

    @exposed()
    def poll(self, call: Call, end: int, timeout: float | None = 0.0) -> Any:
        end = self._end(end)
        self._read_check(end)
        # Checked whole at once, as Connection.poll (NaN and a timeout too large
        # for it fail even when a message is waiting); a negative one is 0.
        wait_s = checked_wait(wait_or_now_s(timeout))
        if self.inbox[end] or self.closed[1 - end]:
            return True
        if wait_s == 0.0:
            return False
        return self.park(self.readers[end], call, wait_s, _poll_timeout, _Read.POLL)

    @exposed(mutates=True)
    def close(self, call: Call, end: int) -> None:
        end = self._end(end)
        if self.closed[end]:
            return
        self.closed[end] = True
        # Readers of the other end learn of the close: EOF, or poll() True.
        readers = self.readers[1 - end]
        while (waiter := pop_alive(readers)) is not None:
            if waiter.data is _Read.POLL:
                waiter.finish(True)
            else:
                waiter.fail(EOFError("the other end of the pipe is closed"))
        fail_all(self.readers[end], OSError("handle is closed"))

    def waiter_count(self) -> int:
        return alive_count(self.readers[0]) + alive_count(self.readers[1])

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.readers[0], exc)
        fail_all(self.readers[1], exc)

    def stats(self) -> PipeStats:
        return PipeStats(
            self.name,
            self.typeid,
            self.creation_args(),
            buffered=(len(self.inbox[0]), len(self.inbox[1])),
            closed=(self.closed[0], self.closed[1]),
            waiters=self.waiter_count(),
        )
