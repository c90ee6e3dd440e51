"""An RLock re-entry whose gateway died under it is made once (issue 13).

A client thread holds RLock ``r`` through gateway A and acquires it again.
That re-entry is lost on its way to A (a relay drops the request), or A makes
it and its answer is lost (the relay drops the reply); then A is killed with
SIGKILL. The client asks the acquire again through gateway B, where its
session resumes. The RLock's key keeps the id of the request that last raised
its count, so B raises it only if the lost re-entry never did: either way
the thread holds it twice, and its second release, not its first, lets
another client have it (a count one short let the other in while the thread
still held it; one too many kept it for nobody).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_etcd_resume import Gateways, a_id, gateways
from test_etcd_unconfirmed import Relay

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import prefix_end
from managerd.store.etcd.locks import lock_depth

from conftest import wait_until
from etcd_support import cluster

__all__ = ["cluster", "gateways"]  # the fixtures


def rlock_depth(gateways: Gateways, name: str) -> int:
    """The count on the RLock ``name``'s one key in etcd (0: no key)."""
    endpoints = gateways.args[1].removeprefix("etcd://").split(",")
    prefix = gateways.args[3].encode() + b"l/" + name.encode() + b"/"

    async def read() -> int:
        async with EtcdClient(endpoints) as client:
            kvs = (await client.range(prefix, prefix_end(prefix))).kvs
            return lock_depth(kvs[0].value) if kvs else 0

    return asyncio.run(read())


class Thread:
    """One client thread that makes the calls it is given, in order (an RLock is
    owned by a thread: its re-entry and releases must come from the same one)."""

    def __init__(self) -> None:
        self._steps: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._results: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for step in iter(self._steps.get, None):
            try:
                self._results.put(step())
            except Exception as exc:
                self._results.put(exc)

    def start(self, step: Callable[[], Any]) -> None:
        self._steps.put(step)

    def result(self, timeout_s: float = 60.0) -> Any:
        return self._results.get(timeout=timeout_s)

    def do(self, step: Callable[[], Any]) -> Any:
        self.start(step)
        return self.result()

    def stop(self) -> None:
        self._steps.put(None)
        self._thread.join(10)


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_an_rlock_reentry_lost_with_its_gateway_is_made_once(gateways: Gateways, lost: str) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    relay = Relay(a.address)
    holder = Thread()
    try:
        with gateways.client(relay.address, b) as m, gateways.client(b) as other:
            lock = m.RLock("r")
            assert m.server_id == a_id(a)
            session = m.session_id
            assert holder.do(lock.acquire) is True
            assert rlock_depth(gateways, "r") == 1
            if lost == "request":
                relay.lose_requests()
            else:
                relay.lose_replies()
            holder.start(lambda: lock.acquire(timeout=60))  # the re-entry
            if lost == "request":
                # Sent into the relay, which drops it: A never sees it.
                assert wait_until(lambda: m._channel is not None and bool(m._channel._calling))
                time.sleep(0.3)
                assert rlock_depth(gateways, "r") == 1
            else:
                assert wait_until(lambda: rlock_depth(gateways, "r") == 2, timeout_s=30)
            a.kill()
            relay.kill()
            assert holder.result() is True
            assert m.session_id == session  # resumed through B: the same holding
            assert rlock_depth(gateways, "r") == 2
            other_lock = other.RLock("r")
            assert holder.do(lock.release) is None
            assert not other_lock.acquire(blocking=False)  # still the thread's, once
            assert holder.do(lock.release) is None
            assert other_lock.acquire(timeout=30)
            other_lock.release()
    finally:
        holder.stop()
        relay.kill()
