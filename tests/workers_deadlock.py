"""Client processes that wait on each other's locks (tests/test_deadlock.py).

Each worker takes its first lock, meets the others at a barrier, then asks
for its second lock with a timeout and records what happened in the dict
``out`` under its first lock's name: ``acquired``, ``timeout`` or
``deadlock: <message>``.
"""

from __future__ import annotations

import threading
import time

import managerd_client
from managerd_client import DeadlockDetected, Manager

WAIT_S = 30.0


def _connect(address: str, authkey: bytes) -> Manager:
    return managerd_client.connect(address, authkey=authkey)


def _second(m: Manager, lock: managerd_client.proxies.Lock, timeout_s: float) -> str:
    try:
        got = lock.acquire(timeout=timeout_s)
    except DeadlockDetected as exc:
        return f"deadlock: {exc}"
    if not got:
        return "timeout"
    lock.release()
    return "acquired"


def cycle_member(
    address: str,
    authkey: bytes,
    first: str,
    second: str,
    barrier: str,
    parties: int,
    timeout_s: float,
    out: str,
) -> None:
    with _connect(address, authkey) as m:
        mine = m.Lock(first)
        mine.acquire()
        m.Barrier(barrier, parties).wait(WAIT_S)
        result = _second(m, m.Lock(second), timeout_s)
        mine.release()
        m.dict(out)[first] = result


def two_threads_rlock(address: str, authkey: bytes, timeout_s: float, out: str) -> None:
    """Thread 1 holds RLock ``r`` and wants Lock ``x``; thread 2 holds ``x`` and wants ``r``."""
    with _connect(address, authkey) as m:
        both = threading.Barrier(2)
        results: dict[str, str] = {}

        def run(mine: managerd_client.proxies.Lock, other: managerd_client.proxies.Lock,
                tag: str) -> None:  # fmt: skip
            mine.acquire()
            both.wait(WAIT_S)
            results[tag] = _second(m, other, timeout_s)
            mine.release()

        r, x = m.RLock("r"), m.Lock("x")
        threads = [
            threading.Thread(target=run, args=(r, x, "t1")),
            threading.Thread(target=run, args=(x, r, "t2")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 2)
        m.dict(out).update(results)


def hold_slowly(address: str, authkey: bytes, name: str, hold_s: float, held: str) -> None:
    with _connect(address, authkey) as m:
        lock = m.Lock(name)
        lock.acquire()
        m.Event(held).set()
        time.sleep(hold_s)  # a slow holder, not a stuck one
        lock.release()


def wait_behind(address: str, authkey: bytes, first: str, second: str, held: str,
                out: str) -> None:  # fmt: skip
    """Hold ``first``, then wait for ``second`` (held by a slow holder)."""
    with _connect(address, authkey) as m:
        mine = m.Lock(first)
        mine.acquire()
        m.Event(held).wait(WAIT_S)
        m.dict(out)[first] = _second(m, m.Lock(second), WAIT_S)
        mine.release()
