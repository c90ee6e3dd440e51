"""An acquire interrupted while its contender key's write is in flight leaves no key.

A real gateway (``managerd serve --store etcd://...``) reaches a real 3-node
etcd through a relay (``etcd_support.EtcdRelay``) that holds the gateway's
bytes from the write of a client's contender key on: the write is on its
way, not yet in etcd. The client process blocked in that ``acquire`` gets
SIGINT (KeyboardInterrupt there; it lives on, on the same session), the
gateway cancels the call, and only then does the relay let the write
through. The cancel must not leave that key in etcd: on the session's lease
it would stand in line as a contender nobody waits for, take the next
permit or the lock, and hold it until the session ends. So a release made
after the interrupt reaches the interrupted process's next acquire.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import workers_interrupts as wi

from managerd.store.etcd.kv import name_key
from managerd_client import connect

from conftest import Daemon, wait_until
from etcd_support import EtcdCluster, RelayThread, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support

pytestmark = pytest.mark.timeout(180)

TTL_S = 10  # the hold lasts a second or two: no session expires meanwhile
ROOT = "/ia" + secrets.token_hex(4) + "/"


@pytest.fixture
def gateway(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Daemon, RelayThread]]:
    """A gateway whose every etcd request goes through one ``RelayThread``."""
    relay = RelayThread(cluster.endpoints[0])
    d = Daemon(
        tmp_path,
        args=[
            "--store", "etcd://" + relay.address, "--store-prefix", ROOT,
            "--session-ttl-s", str(TTL_S),
        ],
    )  # fmt: skip
    try:
        yield d.start(), relay
    finally:
        d.stop()
        relay.close()


def contender_marker(kind: str, name: str) -> bytes:
    """Bytes only the request putting a contender key of ``name`` holds."""
    if kind == "Semaphore":
        return ROOT.encode() + b"sem/" + name_key(name) + b"/c/"
    # A Lock's contender key is its prefix and the session's lease (16 hex digits):
    # in protobuf, the key's field tag and length, then the key. A read of the lock's
    # prefix (a holder's look, a waiter's) has the prefix's own length.
    prefix = ROOT.encode() + b"l/" + name_key(name) + b"/"
    return bytes([0x0A, len(prefix) + 16]) + prefix


@pytest.mark.parametrize("kind", ["Semaphore", "Lock"])
def test_a_release_after_an_interrupted_acquire_reaches_its_next_acquire(
    gateway: tuple[Daemon, RelayThread], kind: str
) -> None:
    d, relay = gateway
    name = f"interrupted-{kind}"

    def waiters() -> int:
        return int(m.status()["objects"].get(name, {}).get("waiters", -1))

    with connect(d.address, authkey=d.authkey) as m:
        if kind == "Semaphore":
            obj: Any = m.Semaphore(name, 0)  # the child's acquire waits
        else:
            obj = m.Lock(name)
            assert obj.acquire()  # held here: the child's acquire waits
        relay.hold_from(contender_marker(kind, name))

        ctx = multiprocessing.get_context("spawn")
        conn, theirs = ctx.Pipe()
        args = (d.address, d.authkey, kind, name, theirs)
        child = ctx.Process(target=wi.blocked_child, args=args)
        child.start()
        theirs.close()
        try:
            assert conn.poll(30) and conn.recv() == "ready"
            # Its contender key's write is held on its way to etcd; the call is parked.
            assert wait_until(relay.holds, 30), "the child's contender key was never written"
            assert wait_until(lambda: waiters() == 1, 30), "the child's acquire did not arrive"
            assert child.pid is not None
            os.kill(child.pid, signal.SIGINT)
            assert conn.poll(30) and conn.recv() == ("interrupted", "KeyboardInterrupt")
            assert child.is_alive(), "the interrupted child died"
            # The gateway cancelled the call while its write was still held.
            assert wait_until(lambda: waiters() == 0, 30), "the abandoned acquire is parked"
            relay.let_through()  # the write reaches etcd now, after the cancel

            obj.release()  # for whoever asks next: the interrupted child
            conn.send("go")
            assert conn.poll(60), "the child's next acquire did not return"
            assert conn.recv() == ("again", True), "a ghost of the interrupted acquire holds it"
            conn.send("done")
            child.join(30)
            assert child.exitcode == 0

            # Nothing of the child's is left: free, for anyone, at once.
            if kind == "Semaphore":
                assert obj.get_value() == 1
            else:
                assert not obj.locked()
            assert obj.acquire(False)
            obj.release()
        finally:
            if child.is_alive():
                child.kill()
            child.join(5)
            conn.close()
