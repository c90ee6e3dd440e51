"""A write held up in a cut network lands only while its session lives (issue 13).

Gateway A reaches etcd through a relay that holds A's bytes from one write on,
as a cut network does (the connection stays open; nothing arrives). The
session that made the write held a lock; its lease expires meanwhile (A's
keep-alives are held too), gateway B's client takes the lock and writes. When
the relay lets A's bytes through, A's write reaches etcd after B's: it must
not land (``client.SESSION_GUARD``), or the lock protected nothing.
"""

from __future__ import annotations

import asyncio
import marshal
import pickle
import secrets

import pytest
from test_etcd_resume import call, new_session

from managerd.store.etcd.store import EtcdStore
from managerd_client.errors import SessionExpired, StoreUnavailable

from etcd_support import EtcdCluster, EtcdRelay, cluster, relayed_and_direct

__all__ = ["cluster"]  # the fixture, from etcd_support

TTL_S = 2


@pytest.mark.parametrize("kind", ["dict", "Value"])
def test_a_write_held_up_past_its_sessions_end_does_not_land(
    cluster: EtcdCluster, kind: str
) -> None:
    root = b"/late" + secrets.token_hex(4).encode() + b"/"
    marker = secrets.token_hex(16)

    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        cut_off, holder = new_session("cut off"), new_session("next holder")
        if kind == "dict":
            obj_a = a.get_or_create("dict", "shared", {})
            late: tuple[str, ...] = ("__setitem__", "k")
            late_value: object = pickle.dumps(marker)
            on_time_value: object = pickle.dumps("the next holder's")
            read: tuple[str, ...] = ("__getitem__", "k")
            held_bytes = marker.encode()
        else:
            obj_a = a.get_or_create("Value", "shared", {"typecode": "q", "value": 0})
            late, late_value, on_time_value = ("set",), 0x5EC0_5EC0_5EC0, 7
            read = ("get",)
            held_bytes = marshal.dumps(late_value)  # as the store writes it
        await call(obj_a, cut_off, late[0], *late[1:], on_time_value)  # exists, on A
        assert await call(a.get_or_create("Lock", "guard", {}), cut_off, "acquire")

        relay.hold_from(held_bytes)
        writing = asyncio.ensure_future(call(obj_a, cut_off, late[0], *late[1:], late_value))
        await asyncio.wait_for(relay.held.wait(), 30)

        # The cut-off session's lease expires: its lock goes to the next holder.
        lock_b = b.get_or_create("Lock", "guard", {})
        assert await asyncio.wait_for(call(lock_b, holder, "acquire"), 30)
        obj_b = b.get_or_create(kind, "shared", {})
        await call(obj_b, holder, late[0], *late[1:], on_time_value)

        relay.let_through()  # the network heals: A's write reaches etcd now
        await asyncio.wait([writing], timeout=30)
        assert await call(obj_b, holder, *read) == on_time_value, "the late write landed"
        assert writing.done()
        assert isinstance(writing.exception(), (SessionExpired, StoreUnavailable))
        await call(lock_b, holder, "release")

    # A's calls wait for etcd's answer (no deadline to give up and reset the
    # stream): the held write is delivered whole, as a healed network would.
    relayed_and_direct(
        cluster, body, root=root, session_ttl_s=TTL_S, rpc_timeout_s=60.0, retry_budget_s=60.0
    )
