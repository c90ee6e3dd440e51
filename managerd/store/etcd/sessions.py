"""A session on etcd: a lease kept alive, and a key on it that says the session lives.

Everything a session holds in etcd (a lock's key, a semaphore's slot) is put
on its lease, so when the session ends — revoked on close, or expired
because nobody kept it alive (its gateway died, or was cut off from etcd)
— etcd deletes all of it at once, and waiters watching those keys move on.
Reserved queue items are the exception (queues.py): they must go back,
not vanish.

The session's id is its secret: a client whose gateway died reconnects to
another, which takes the session over with ``resume(sid)`` while its lease
lives, and everything it held is still held (its keys are on that lease).

The keep-alive renews every third of the TTL, so two renewals can fail
before the lease is at risk. ``lost`` is set once etcd says the lease is
gone, or once its TTL and an election's allowance have passed since the
last renewal etcd answered (a gateway cut off from etcd cannot know, and
must not go on as a holder for long): from then on the session holds
nothing, and the gateway ends it. A leader change restarts
every lease's TTL (etcd #2660, #9395), so a dead session can outlive its
TTL by about an election.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import Compare, EtcdError, LeaseNotFound, Put, Target
from managerd_client.errors import SessionExpired

log = logging.getLogger(__name__)

DEFAULT_ROOT = b"/m/"
#: How long past its TTL an unrenewed lease may live: a leader change restarts every
#: lease's TTL, and an election after a leader kill took up to ~3 s here.
ELECTION_ALLOWANCE_S = 5.0


class EtcdSession:
    """``await EtcdSession.open(client, ttl_s)``; ``await session.close()`` revokes."""

    def __init__(self, client: EtcdClient, lease_id: int, ttl_s: int, sid: str, root: bytes):
        self.client = client
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.sid = sid
        self.key = root + b"s/" + sid.encode()
        #: Set once etcd says the lease is gone (expired or revoked).
        self.lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, client: EtcdClient, ttl_s: int, *, sid: str | None = None, root: bytes = DEFAULT_ROOT
    ) -> EtcdSession:
        """Grant a lease of ``ttl_s`` seconds, put the session key on it, keep it alive."""
        if ttl_s < 1:
            raise ValueError(f"an etcd lease lasts whole seconds, at least 1, not {ttl_s}")
        lease_id = await client.lease_grant(ttl_s)
        # The id is the session's secret: whoever knows it can resume the session.
        session = cls(client, lease_id, ttl_s, sid or secrets.token_hex(16), root)
        # create_revision == 0: a retried put finds its own key and changes nothing.
        await client.txn(
            [Compare(session.key, Target.CREATE, "==", 0)],
            [Put(session.key, f"{lease_id:x}".encode(), lease=lease_id)],
            idempotent=True,
        )
        session._keeper = asyncio.create_task(session._keep_alive(), name=f"etcd lease {sid}")
        return session

    @classmethod
    async def resume(
        cls, client: EtcdClient, sid: str, *, root: bytes = DEFAULT_ROOT
    ) -> EtcdSession:
        """The live session ``sid`` (opened through another gateway, say), kept alive from
        here; ``SessionExpired`` if its lease is gone. What it holds stays held."""
        kv = await client.get(root + b"s/" + sid.encode())
        if kv is None:
            raise SessionExpired(f"session {sid} has ended")
        try:
            ttl_s = await client.lease_keepalive(kv.lease)  # renewed: the TTL it was granted
        except LeaseNotFound as exc:
            raise SessionExpired(f"session {sid} has ended") from exc
        session = cls(client, kv.lease, ttl_s, sid, root)
        session._keeper = asyncio.create_task(session._keep_alive(), name=f"etcd lease {sid}")
        return session

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.ttl_s / 3
        # Without a renewal answered for a TTL (counted from when the last answered
        # one was sent), the lease may have expired and its locks gone to others;
        # but a leader change restarts every lease's TTL, so during an election it
        # lives on. Past the TTL and an election's allowance with no answer (cut off
        # from etcd), take it as lost and stop renewing, so that it does expire.
        renewed_at = loop.time()
        give_up_s = self.ttl_s + ELECTION_ALLOWANCE_S
        while True:
            await asyncio.sleep(interval_s)
            sent_at = loop.time()
            try:
                left_s = renewed_at + give_up_s - sent_at
                await asyncio.wait_for(self.client.lease_keepalive(self.lease_id), left_s)
                renewed_at = sent_at
            except LeaseNotFound:
                log.warning("etcd session %s: lease %x expired", self.sid, self.lease_id)
                self.lost.set()
                return
            except (EtcdError, TimeoutError) as exc:
                if loop.time() >= renewed_at + give_up_s:
                    log.warning(
                        "etcd session %s: lease %x not renewed for %.0f s (TTL %d s): "
                        "taken as expired",
                        self.sid, self.lease_id, give_up_s, self.ttl_s,
                    )  # fmt: skip
                    self.lost.set()
                    return
                # Unreachable for a moment: keep trying.
                log.warning("etcd session %s: keep-alive failed: %r", self.sid, exc)

    async def _stop_keep_alive(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None

    async def abandon(self) -> None:
        """Stop renewing without revoking: the lease expires after its TTL, as when a
        gateway dies. (What a gateway does for a session whose client went quiet.)"""
        await self._stop_keep_alive()

    async def close(self) -> None:
        """Revoke: everything on the lease is deleted now."""
        await self._stop_keep_alive()
        await self.client.lease_revoke(self.lease_id)
        self.lost.set()
