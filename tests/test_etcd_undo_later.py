"""An undo of an acquire that etcd could not answer is made again: no lock held for nobody.

Two ways a lock could stay held for nobody while its session lives, each
through a relay between gateway A's etcd client and a real 3-node etcd:

- An acquire's write lost on its way back: it is applied by etcd and the
  connection is cut before the answer comes back; the relay then refuses
  A's connections (etcd out of reach from A) until A gives up
  (``EtcdUnavailable``, short deadlines here) and the undo it tries at once
  fails the same way. The acquire is answered as failed, yet its contender
  key is in etcd, on a lease that outlives the outage: it would hold the
  lock for nobody until the session ends, and a live client's session does
  not end. Once etcd is in reach again, the undo is asked again until
  answered, so gateway B's client gets the lock.
- An acquire granted, whose caller left before it read the answer (an
  interrupt): the gateway undoes it, a release by its token, while etcd is
  out of A's reach. The release is made again until etcd answers it.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
from test_etcd_resume import call, new_session

from managerd.store.api import Call
from managerd.store.etcd.kv import name_key
from managerd.store.etcd.store import EtcdStore
from managerd_client.errors import StoreUnavailable

from etcd_support import EtcdCluster, EtcdRelay, cluster, relayed_and_direct

__all__ = ["cluster"]  # the fixture, from etcd_support

TTL_S = 30  # the outage lasts seconds: the session's lease outlives it


def new_root() -> bytes:
    return b"/undo" + secrets.token_hex(4).encode() + b"/"


def test_an_acquire_failed_with_etcd_out_of_reach_is_undone_once_it_is_back(
    cluster: EtcdCluster,
) -> None:
    root = new_root()
    # The contender key's put: its protobuf field tag and length, then the key (the
    # lock's prefix and the session's lease, 16 hex digits).
    prefix = root + b"l/" + name_key("guard") + b"/"
    marker = bytes([0x0A, len(prefix) + 16]) + prefix

    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        cut_off, next_one = new_session("cut off"), new_session("next")
        lock_a = a.get_or_create("Lock", "guard", {})
        assert not await call(lock_a, cut_off, "locked")  # its lease, on A

        relay.cut_after(marker)  # applied, its answer lost...
        relay.refusing = True  # ...and etcd out of A's reach
        with pytest.raises(StoreUnavailable):
            await call(lock_a, cut_off, "acquire")
        lock_b = b.get_or_create("Lock", "guard", {})
        assert await call(lock_b, next_one, "locked"), "the acquire never landed"

        relay.refusing = False  # etcd in reach again: the undo goes through
        assert await call(lock_b, next_one, "acquire", True, 15), (
            "a ghost of the failed acquire holds the lock"
        )
        await call(lock_b, next_one, "release")

    relayed_and_direct(cluster, body, root=root, session_ttl_s=TTL_S)


def test_a_granted_acquire_whose_caller_left_is_released_once_etcd_is_back(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, next_one = new_session("left"), new_session("next")
        lock_a = a.get_or_create("Lock", "guard", {})
        token = await call(lock_a, left, "acquire")
        assert token

        relay.refusing = True  # etcd out of A's reach...
        relay.drop_connections()
        # ...when the caller that was granted it is found gone: undone.
        a.undo(lock_a, "acquire", Call(left, 0, asyncio.get_running_loop()), (), token)
        await asyncio.sleep(3)  # longer than A's retry budget: the first try failed
        lock_b = b.get_or_create("Lock", "guard", {})
        assert await call(lock_b, next_one, "locked")

        relay.refusing = False  # etcd in reach again
        assert await call(lock_b, next_one, "acquire", True, 15), (
            "the lock granted to a caller that left is still held"
        )
        await call(lock_b, next_one, "release")

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)
