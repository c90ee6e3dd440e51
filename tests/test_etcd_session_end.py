"""A gateway lists an ended session until its lease is revoked (issue 13).

A client holding a Lock through gateway A is killed (SIGKILL): A ends its
session, which revokes its etcd lease, and only then stops listing it in
``status``. A reaches etcd through a relay (``etcd_support.EtcdRelay``)
that holds A's bytes from the last write before the revoke (the delete of
the session's records) on: while the revoke waits, the session is still
listed. Once it is listed no more, gateway A is killed (SIGKILL) at once,
and the lock is free through gateway B at once: had A stopped listing the
session before revoking its lease, a kill in between would have left the
dead client's lock held until the lease's TTL.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from managerd_client import connect

from conftest import Daemon, wait_until
from etcd_support import EtcdCluster, RelayThread, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support

pytestmark = pytest.mark.timeout(180)

TTL_S = 30  # far longer than the test's wait for a free lock: a lease left to it fails
ROOT = "/se" + secrets.token_hex(4) + "/"
WORKER = str(Path(__file__).resolve().parent / "stateful_worker.py")


@pytest.fixture
def relay(cluster: EtcdCluster) -> Iterator[RelayThread]:
    r = RelayThread(cluster.endpoints[0])
    try:
        yield r
    finally:
        r.close()


def gateway(tmp: Path, endpoints: list[str], authkey: bytes) -> Daemon:
    store = ["--store", "etcd://" + ",".join(endpoints), "--store-prefix", ROOT]
    d = Daemon(tmp, args=[*store, "--session-ttl-s", str(TTL_S)])
    d.authkey = authkey
    return d


def records_delete_marker() -> bytes:
    """Bytes only the delete of one session's records (``/ug/<32 hex>/``) holds: in
    protobuf, the key's field tag and length, then the key's start."""
    records = ROOT.encode() + b"ug/"
    return bytes([0x0A, len(records) + 33]) + records


def test_a_session_is_listed_until_its_lease_is_revoked(
    cluster: EtcdCluster, relay: RelayThread, tmp_path: Path
) -> None:
    authkey = secrets.token_hex(16).encode()
    a = gateway(tmp_path / "a", [relay.address], authkey)
    b = gateway(tmp_path / "b", cluster.endpoints, authkey)
    holder: subprocess.Popen[str] | None = None
    try:
        a.start()
        b.start()
        with connect(a.address, authkey=authkey) as m:
            holder = subprocess.Popen(
                [sys.executable, WORKER, "acquire", "Lock", "db"],
                env=a.client_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdout is not None
            assert holder.stdout.readline().startswith("HELD")

            def listed() -> bool:
                return holder.pid in {s.get("pid") for s in m.status()["sessions"]}

            assert listed()
            relay.hold_from(records_delete_marker())
            holder.kill()
            holder.wait(10)
            # A ends the session: the revoke waits behind the held delete.
            assert wait_until(relay.holds, 30), "the session's end never reached etcd"
            assert listed(), "the session is no longer listed, its lease not yet revoked"

            relay.let_through()
            assert wait_until(lambda: not listed(), 30), "the ended session is still listed"
        a.kill()  # at once: its lease was revoked, or it would be listed still

        with connect(b.address, authkey=authkey) as other:
            assert other.Lock("db").acquire(False), "the killed client's lock is still held"
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(10)
        for stream in (holder.stdin, holder.stdout) if holder is not None else ():
            if stream is not None:
                stream.close()
        a.stop()
        b.stop()
