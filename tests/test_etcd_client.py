"""The etcd client against a real 3-node etcd cluster (tests/etcd_support.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import pytest

from managerd.store.etcd.client import EtcdClient, channel_target
from managerd.store.etcd.kv import (
    Compacted,
    Compare,
    Delete,
    EventType,
    Get,
    LeaseNotFound,
    Put,
    RangeResult,
    RequestTooLarge,
    Target,
    prefix_end,
)

from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def prefix() -> bytes:
    return b"/test/" + secrets.token_hex(4).encode() + b"/"


def test_channel_target_names_every_endpoint() -> None:
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:3"]) == "ipv6:[::1]:3"
    with pytest.raises(ValueError, match="HOST:PORT"):
        channel_target(["127.0.0.1"])
    with pytest.raises(ValueError, match="mix"):
        channel_target(["127.0.0.1:1", "[::1]:2"])


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


def test_kv_and_txn(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            a, b = prefix + b"a", prefix + b"b"
            first = await etcd.put(a, b"1")
            kv = await etcd.get(a)
            assert kv is not None and kv.value == b"1"
            assert kv.create_revision == kv.mod_revision == first.revision
            await etcd.put(b, b"2")
            both = await etcd.range(prefix, prefix_end(prefix))
            assert [k.key for k in both.kvs] == [a, b] and both.revision > first.revision
            head = await etcd.range(prefix, prefix_end(prefix), limit=1)
            assert [k.key for k in head.kvs] == [a] and head.more
            # create_revision == 0 fails on an existing key: the failure ops run.
            done = await etcd.txn([Compare(a, Target.CREATE, "==", 0)], [Put(a, b"x")], [Get(a)])
            assert not done.succeeded
            [got] = done.responses
            assert isinstance(got, RangeResult) and got.kvs[0].value == b"1"
            # Compare on mod_revision: a compare-and-set.
            done = await etcd.txn(
                [Compare(a, Target.MOD, "==", kv.mod_revision)], [Put(a, b"3"), Delete(b)]
            )
            assert done.succeeded
            assert (await etcd.get(a)).value == b"3"  # type: ignore[union-attr]
            assert await etcd.get(b) is None
            done = await etcd.txn([Compare(a, Target.VALUE, "!=", b"3")], [Delete(a)])
            assert not done.succeeded
            deleted = await etcd.delete(prefix, prefix_end(prefix))
            assert deleted.deleted == 1

    asyncio.run(body())


def test_too_large_a_request_is_refused(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            with pytest.raises(RequestTooLarge):
                await etcd.put(prefix + b"big", b"x" * (2 * 1024 * 1024))

    asyncio.run(body())


def test_lease_expiry_removes_its_keys(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            kept, dropped = await etcd.lease_grant(5), await etcd.lease_grant(1)
            await etcd.put(prefix + b"kept", b"", lease=kept)
            await etcd.put(prefix + b"dropped", b"", lease=dropped)
            async with contextlib.aclosing(
                etcd.watch(prefix + b"dropped", start_revision=1)
            ) as events:
                async for batch in events:  # PUT, then the DELETE of the expiry
                    assert await etcd.lease_keepalive(kept) == 5
                    if any(e.type is EventType.DELETE for e in batch):
                        break
            assert await etcd.get(prefix + b"dropped") is None
            assert await etcd.get(prefix + b"kept") is not None
            assert await etcd.lease_time_to_live(dropped) == -1
            with pytest.raises(LeaseNotFound):
                await etcd.lease_keepalive(dropped)
            await etcd.lease_revoke(kept)
            assert await etcd.get(prefix + b"kept") is None
            await etcd.lease_revoke(kept)  # already gone: not an error

    asyncio.run(body())


def test_watch_from_a_revision_sees_history_then_live(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd, EtcdClient(cluster.endpoints) as other:
            first = await etcd.put(prefix + b"1", b"a")
            await etcd.delete(prefix + b"1")
            seen = []
            async with contextlib.aclosing(
                etcd.watch(prefix, prefix_end(prefix), start_revision=first.revision)
            ) as events:
                async for batch in events:
                    seen += [(e.type, e.kv.key, e.kv.mod_revision) for e in batch]
                    if len(seen) == 2:
                        live = await other.put(prefix + b"2", b"b")  # another client
                    if len(seen) == 3:
                        break
            assert seen == [
                (EventType.PUT, prefix + b"1", first.revision),
                (EventType.DELETE, prefix + b"1", first.revision + 1),
                (EventType.PUT, prefix + b"2", live.revision),
            ]

    asyncio.run(body())


def test_watch_from_a_compacted_revision_raises(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            old = await etcd.put(prefix + b"k", b"1")
            now = await etcd.put(prefix + b"k", b"2")
            done = cluster.etcdctl("compact", str(now.revision))
            assert done.returncode == 0, done.stderr
            with pytest.raises(Compacted) as raised:
                async with contextlib.aclosing(
                    etcd.watch(prefix + b"k", start_revision=old.revision)
                ) as events:
                    async for _ in events:
                        pass
            assert raised.value.compact_revision == now.revision

    asyncio.run(body())
