"""A creation is answered only once its name is in etcd: nothing acknowledged is lost (issue 13).

The etcd store registers a new name at once and writes it to etcd in the
background (``EtcdStore.get_or_create``); the daemon answers a client's
creation (managerd ``create``, a stock client's ``create``) only once that
write is done (``Store.created``), or with why it failed.

With real processes (``managerd serve --store etcd://...`` gateways A and B,
a real 3-node etcd): A reaches etcd through a relay that holds A's bytes from
the creating write on, as a network cut at that moment does. A client's
creation through A is not answered meanwhile; A is killed with SIGKILL; then
whenever the client was told the object exists, gateway B knows it (a stock
client does not create it again elsewhere, as a managerd proxy would).

In process (gateways as ``EtcdStore`` objects on one cluster): a creation that
loses a race to another type through another gateway answers
ObjectTypeConflict, and the mirror then has what etcd has; a creation etcd
does not answer is StoreUnavailable, and the next get-or-create of the name
tries again; a creation its client gave up (a cancel) is still made.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from typing import Any, cast

import pytest
from test_etcd_resume import TTL_S, Gateways, gateways, in_thread, new_session, two_stores

from managerd.service.ops import ServerOps
from managerd.store.api import Call
from managerd.store.etcd.store import EtcdStore
from managerd.store.interface import Handle
from managerd.store.memory.store import MemoryStore
from managerd_client.errors import ObjectTypeConflict, StoreUnavailable

from conftest import Daemon
from etcd_support import EtcdCluster, EtcdRelay, RelayThread, cluster, relayed_and_direct

__all__ = ["cluster", "gateways"]  # the fixtures


@pytest.fixture
def relayed(gateways: Gateways, cluster: EtcdCluster) -> Iterator[tuple[Daemon, RelayThread]]:
    """Gateway A of ``gateways``' store, reaching etcd through a relay only."""
    relay = RelayThread(cluster.endpoints[0])
    args = list(gateways.args)
    args[args.index("--store") + 1] = "etcd://" + relay.address
    a = Daemon(gateways.tmp / "a", args=args)
    a.authkey = gateways.authkey
    try:
        gateways.started.append(a.start())
        yield a, relay
    finally:
        a.stop()
        relay.close()


class StockManager(BaseManager):
    """A stock client of queues."""


StockManager.register("Queue")


def managerd_create(gateways: Gateways, a: Daemon, b: Daemon, name: str) -> Callable[[], Any]:
    def create() -> Any:
        with gateways.client(a, b) as m:
            return m.Queue(name).name

    return create


def stock_create(gateways: Gateways, a: Daemon, b: Daemon, name: str) -> Callable[[], Any]:
    def create() -> Any:
        stock = StockManager(address=("127.0.0.1", a.port), authkey=gateways.authkey)
        stock.connect()
        return stock.Queue(name)._id  # type: ignore[attr-defined]

    return create


@pytest.mark.parametrize("client", [managerd_create, stock_create])
def test_a_creation_is_answered_only_once_its_name_is_in_etcd(
    gateways: Gateways,
    relayed: tuple[Daemon, RelayThread],
    client: Callable[[Gateways, Daemon, Daemon, str], Callable[[], Any]],
) -> None:
    a, relay = relayed
    b = gateways.start("b")
    name = "created-" + secrets.token_hex(12)  # its bytes mark the creating write
    relay.hold_from(name.encode())
    creating, got = in_thread(client(gateways, a, b, name))
    assert relay.held(30), "the creating write never reached the relay"
    creating.join(1.0)
    answered_while_held = not creating.is_alive()
    a.kill()  # with the name's write still held: it never reaches etcd
    creating.join(60)
    assert not creating.is_alive()
    [outcome] = got
    with b.connect() as look:
        known = dict(look.objects())
    if not isinstance(outcome, Exception):
        # Told the object exists: another gateway knows it.
        assert known.get(name) == "Queue", (outcome, known)
    assert not answered_while_held, outcome
    if client is managerd_create:  # asked again through B, where its session went on
        assert outcome == name, outcome


# -- in process -------------------------------------------------------------------------


async def outcome(store: EtcdStore, handle: Handle) -> Any:
    kept = store.created(handle)
    return None if kept is None else await kept


def test_a_creation_that_loses_a_race_to_another_type_answers_the_conflict(
    cluster: EtcdCluster,
) -> None:
    async def body(a: EtcdStore, b: EtcdStore) -> None:
        for attempt in range(5):  # each gateway makes it new; one Txn wins
            name = f"race-{attempt}"
            x, y = a.get_or_create("Event", name, {}), b.get_or_create("Lock", name, {})
            results = await asyncio.gather(outcome(a, x), outcome(b, y), return_exceptions=True)
            [lost] = [i for i, r in enumerate(results) if isinstance(r, ObjectTypeConflict)]
            assert results[1 - lost] is None
            loser, winner_type, loser_type = (
                (a, "Lock", "Event") if lost == 0 else (b, "Event", "Lock")
            )
            # The loser's mirror has what etcd has: the conflict at once, the winner's type kept.
            assert dict(loser.listing())[name] == winner_type
            with pytest.raises(ObjectTypeConflict):
                loser.get_or_create(loser_type, name, {})
            assert loser.created(loser.get_or_create(winner_type, name, {})) is None

    two_stores(cluster, body)


def test_a_creation_etcd_does_not_answer_is_store_unavailable_and_is_tried_again(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        name = "unanswered-" + secrets.token_hex(12)
        relay.hold_from(name.encode())
        first = a.get_or_create("Queue", name, {})
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(outcome(a, first), 60)
        relay.let_through()  # the held write may land now: outcome unknown
        again = a.get_or_create("Queue", name, {})
        assert again is not first  # not the failed creation's answer again
        await asyncio.wait_for(outcome(a, again), 60)
        # It exists once: B's mirror learns it from etcd.
        while name not in dict(b.listing()):
            await asyncio.sleep(0.01)
        assert b.created(b.get_or_create("Queue", name, {})) is None

    root = b"/c" + secrets.token_hex(4).encode() + b"/"
    relayed_and_direct(cluster, body, root=root, session_ttl_s=TTL_S)


def test_a_creation_given_up_by_its_client_is_still_made(cluster: EtcdCluster) -> None:
    """The client's cancel of its waiting ``create`` drops the answer, not the creation
    every call of the object waits for."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        ops = ServerOps(a, cast(Any, None), cast(Any, None), {}, 0.0)
        s = new_session("gives up")
        name = "given-up-" + secrets.token_hex(8)
        create = ops.methods["create"].fn
        waiting = create(ops, Call(s, 0, asyncio.get_running_loop()), "Queue", name, {})
        assert isinstance(waiting, asyncio.Future) and not waiting.done()
        a.abandon(ops, "create", s, waiting)
        assert waiting.cancelled()
        again = create(ops, Call(s, 0, asyncio.get_running_loop()), "Queue", name, {})
        assert isinstance(again, asyncio.Future)  # the same creation, still on its way
        await asyncio.wait_for(again, 30)
        assert create(ops, Call(s, 0, asyncio.get_running_loop()), "Queue", name, {}) is None
        while name not in dict(b.listing()):  # in etcd: B's mirror learns it
            await asyncio.sleep(0.01)

    two_stores(cluster, body)


def test_the_memory_store_answers_a_creation_at_once() -> None:
    async def main() -> None:
        store = MemoryStore(asyncio.get_running_loop())
        assert store.created(store.get_or_create("Queue", "jobs", {})) is None

    asyncio.run(main())
