"""Client processes for the session tests (module-level: spawn-safe)."""

from __future__ import annotations

import sys
import time
from typing import Any

from managerd_client import connect


def block_in_get(address: str, authkey: bytes, queue_name: str) -> None:
    """Wait forever in get(); the test kills this process."""
    m = connect(address, authkey=authkey)
    m.Queue(queue_name).get()


def hold_lock(address: str, authkey: bytes, typeid: str, name: str, ready: str) -> None:
    """Acquire a Lock/RLock/Semaphore, say so on an Event, then hang."""
    m = connect(address, authkey=authkey)
    lock = getattr(m, typeid)(name)
    lock.acquire()
    m.Event(ready).set()
    time.sleep(600)


def wait_for_lock(address: str, authkey: bytes, name: str) -> None:
    """Block in acquire() of a held lock; the test kills this process."""
    m = connect(address, authkey=authkey)
    m.Lock(name).acquire()
    time.sleep(600)


def reserve_and_hang(address: str, authkey: bytes, queue_name: str, ready: str) -> None:
    m = connect(address, authkey=authkey)
    msg = m.Queue(queue_name).reserve()
    m.dict(ready)["value"] = msg.value
    time.sleep(600)


def wait_at_barrier(address: str, authkey: bytes, name: str) -> None:
    m = connect(address, authkey=authkey)
    m.Barrier(name, 3).wait()


def forked_child_holds_nothing(held: list[Any], free: Any, parent_session: str) -> None:
    """In a forked child: the parent's holdings are not ours; every proxy works at once.

    Each of ``held`` (held by a parent thread) must wait out its timeout and
    say False, never raise ``LockLost``; ``free`` must be acquired.
    """
    for proxy in held:
        started = time.monotonic()
        got = proxy.acquire(timeout=0.5)
        waited = time.monotonic() - started
        assert got is False, f"{proxy!r}: acquired a lock the parent holds"
        assert waited >= 0.4, f"{proxy!r}: answered after {waited:.3f}s instead of waiting"
        assert proxy.fencing_token is None, f"{proxy!r}: the child thinks it holds it"
    assert free.acquire(timeout=5)
    assert free.fencing_token is not None
    free.release()
    session = free._manager.session_id
    assert session is not None and session != parent_session, "the child shares a session"


def main() -> None:  # pragma: no cover - for manual runs
    print("import me", file=sys.stderr)
