"""One gateway elected among all to do a cluster-wide job (etcd's election recipe).

Why: returning expired and orphaned reservations of every queue must keep
happening when any gateway dies, yet doing it in every gateway multiplies
the reads by the number of gateways (each pass reads every queue's
reservations). So one gateway does it, chosen by etcd.

How (etcd's ``concurrency.Election``): each gateway puts a key
``<prefix><lease id>`` on a lease of its own, kept alive every third of its
TTL. The key with the lowest create_revision wins. The others watch the
winner's key from the revision of their read, so its deletion (its gateway
stopped, or died and its lease expired: within the TTL) wakes them and the
next in line leads. A gateway whose lease is lost (partitioned from etcd
for a TTL) stops leading at once and campaigns again with a new lease.

Leading is not exclusive in every instant: a leader cut off from etcd may
believe it leads until its keep-alive fails, while the next one already
does. The job must be safe when two run at once (the requeue compares each
reservation's revision before moving it); the election only keeps it from
being done N times over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import (
    Compare,
    EtcdError,
    EventType,
    LeaseNotFound,
    Put,
    Target,
    prefix_end,
)
from managerd.store.etcd.watching import changed

log = logging.getLogger(__name__)

_RETRY_S = 1.0


class Election:
    """Campaign under ``prefix`` with leases of ``ttl_s``; see the module docstring."""

    def __init__(self, client: EtcdClient, prefix: bytes, ttl_s: int, value: bytes = b"") -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = max(1, ttl_s)
        #: What the key holds: who this is (for people and tests looking at etcd).
        self.value = value
        self.leading = False

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """For ever: campaign, and while this one leads, run ``lead()`` (cancelled when
        leadership is lost)."""
        while True:
            try:
                await self._term(lead)
            except EtcdError as exc:
                log.warning("election %s: %s; campaigning again", self.prefix.decode(), exc)
            await asyncio.sleep(_RETRY_S)

    async def _term(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """One lease's campaign: until the lease is lost (or an error)."""
        lease = await self.client.lease_grant(self.ttl_s)
        key = self.prefix + b"%016x" % lease
        keeper = asyncio.create_task(self._keep_alive(lease), name=f"keep-alive {key!r}")
        try:
            await self.client.txn(
                [Compare(key, Target.CREATE, "==", 0)],
                [Put(key, self.value, lease=lease)],
                idempotent=True,
            )
            while not keeper.done():
                first = await self.client.range(
                    self.prefix, prefix_end(self.prefix), limit=1, oldest_first=True
                )
                if not first.kvs:
                    return  # not even ours: the lease is gone
                if first.kvs[0].key == key:
                    await self._lead(lead, keeper)
                    return
                # Wait for the one leading to go (or for our own lease to be lost).
                gone = asyncio.create_task(
                    changed(
                        self.client,
                        first.kvs[0].key,
                        after_revision=first.revision,
                        kind=EventType.DELETE,
                    )
                )
                try:
                    await asyncio.wait([gone, keeper], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
                    with contextlib.suppress(BaseException):
                        await gone
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
            with contextlib.suppress(EtcdError):
                await asyncio.shield(self.client.lease_revoke(lease))

    async def _lead(
        self, lead: Callable[[], Coroutine[Any, Any, None]], keeper: asyncio.Task[None]
    ) -> None:
        self.leading = True
        log.info("election %s: this gateway leads", self.prefix.decode())
        leading = asyncio.create_task(lead())
        try:
            await asyncio.wait([leading, keeper], return_when=asyncio.FIRST_COMPLETED)
            if leading.done() and not leading.cancelled() and leading.exception() is not None:
                raise EtcdError(f"the leader's job failed: {leading.exception()!r}")
        finally:
            self.leading = False
            leading.cancel()
            with contextlib.suppress(BaseException):
                await leading

    async def _keep_alive(self, lease: int) -> None:
        """Renew every third of the TTL; return once the lease is lost."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.client.lease_keepalive(lease)
            except LeaseNotFound:
                log.warning("election %s: lease %x lost", self.prefix.decode(), lease)
                return
            except EtcdError as exc:  # unreachable for now: the lease may still live
                log.warning("election %s: keep-alive failed: %s", self.prefix.decode(), exc)
