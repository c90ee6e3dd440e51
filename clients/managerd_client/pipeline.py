"""Pipelined calls: several requests in flight from one thread, answers read later.

``Queue.put_many_async`` and ``Queue.get_many_async`` send their request and
return a :class:`~managerd_client.channel.Pending` at once, so a producer need
not wait a round trip for one batch before it sends the next. A
:class:`Pipeline` (``Manager.pipeline()``) gathers the calls made inside its
``with`` block by this thread:

- leaving it normally reads every answer still unread, in order, and raises
  the first error among them (after reading them all);
- leaving it by an exception (Ctrl-C, an error in the block) gives up every
  answer still unread: the daemon drops a call still waiting and undoes an
  answer that handed something over (items back to the front of their
  queue), so an interrupted pipeline loses no item and delivers none twice.

Each pipelined call travels on a lane of its own (see
``Channel.submit``): the daemon's undo records assume one call in flight
per client thread, and a lane is such a thread for the daemon.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from managerd_client.channel import Pending

_local = threading.local()


def current_pipeline() -> Pipeline | None:
    """The innermost pipeline this thread is inside, if any."""
    stack: list[Pipeline] | None = getattr(_local, "stack", None)
    return stack[-1] if stack else None


class Pipeline:
    """The calls pipelined by one thread inside a ``with`` block (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: deque[Pending] = deque()
        self.results: list[Any] = []

    def track(self, pending: Pending) -> None:
        """Read (or give up) ``pending`` when the block ends, if nobody did before."""
        self._pending.append(pending)
        while self._pending and self._pending[0].settled:
            self._pending.popleft()  # read already: do not keep them all

    def wait(self) -> list[Any]:
        """Read every answer still unread, in order; the first error raised after all are read."""
        first: BaseException | None = None
        while self._pending:
            pending = self._pending[0]
            if pending.settled:
                self._pending.popleft()
                continue
            try:
                self.results.append(pending.result())
            except Exception as exc:
                if first is None:
                    first = exc
            self._pending.popleft()
        if first is not None:
            raise first
        return self.results

    def cancel(self) -> None:
        """Give up every answer still unread (what they took goes back)."""
        channels = {id(p.channel): p.channel for p in self._pending}
        while self._pending:
            self._pending[0].cancel()
            self._pending.popleft()
        for channel in channels.values():
            # Cancels an earlier interrupt kept from going out: now, not at
            # the lane's next use (what they took would wait until then).
            channel.resend_cancels()

    def __enter__(self) -> Pipeline:
        stack: list[Pipeline] | None = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack: list[Pipeline] = _local.stack
        try:
            if exc_type is None:
                self.wait()
            else:
                self.cancel()
        except BaseException:
            # An interrupt while reading: what is left is given up.
            self.cancel()
            raise
        finally:
            if stack and stack[-1] is self:
                stack.pop()
