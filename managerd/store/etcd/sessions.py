"""A session on etcd: a lease kept alive, and a key on it that says the session lives.

Everything a session holds in etcd (a lock's key, a semaphore's slot) is put
on its lease, so when the session ends — revoked on close, or expired
because nobody kept it alive (its gateway died, or was cut off from etcd)
— etcd deletes all of it at once, and waiters watching those keys move on.
Reserved queue items are the exception (queues.py): they must go back,
not vanish.

**Resuming through another gateway.** The client's resume token (the
secret it got at hello, ``Session.resume_token``) is kept as a SHA-256 hash,
the key ``/m/t/<hash>`` on the session's lease, holding the session's etcd
id, its public id and the gateway serving it. A client whose gateway died
reconnects to another, which finds that key by the token's hash, renews the
lease and names itself the owner (``take_over``): everything the session
held is still held (its keys are on that lease). Only a live lease is
found: an expired one took the key with it. A gateway that ends a session
it no longer owns (taken over while the gateway lived, cut off from its
client) stops renewing without revoking (``owned``). ``resume(sid)`` is
the same by the etcd id, for the store's own use and tests.

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
import hashlib
import json
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


def token_key(root: bytes, token: str) -> bytes:
    """Where a session is found by its resume token: the token's hash, never the token."""
    return root + b"t/" + hashlib.sha256(token.encode()).hexdigest().encode()


class EtcdSession:
    """``await EtcdSession.open(client, ttl_s)``; ``await session.close()`` revokes."""

    def __init__(self, client: EtcdClient, lease_id: int, ttl_s: int, sid: str, root: bytes):
        self.client = client
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.sid = sid
        self.key = root + b"s/" + sid.encode()
        #: ``/m/t/<hash of the resume token>`` (None: not resumable, a stock session).
        self.token_key: bytes | None = None
        #: The managerd session's public id (``Session.id``), kept across gateways.
        self.public_id = ""
        #: This gateway, as it names itself in the token key's value.
        self.gateway = ""
        #: The revision at which this gateway put the token key (a later put of it
        #: naming another gateway is a takeover; an earlier one is history).
        self.token_revision = 0
        #: Set once etcd says the lease is gone (expired or revoked).
        self.lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        client: EtcdClient,
        ttl_s: int,
        *,
        sid: str | None = None,
        root: bytes = DEFAULT_ROOT,
        resume_token: str | None = None,
        public_id: str = "",
        gateway: str = "",
    ) -> EtcdSession:
        """Grant a lease of ``ttl_s`` seconds, put the session key on it (and the key of
        its ``resume_token``, if given), keep it alive."""
        if ttl_s < 1:
            raise ValueError(f"an etcd lease lasts whole seconds, at least 1, not {ttl_s}")
        lease_id = await client.lease_grant(ttl_s)
        session = cls(client, lease_id, ttl_s, sid or secrets.token_hex(16), root)
        session.public_id, session.gateway = public_id, gateway
        puts = [Put(session.key, f"{lease_id:x}".encode(), lease=lease_id)]
        if resume_token is not None:
            session.token_key = token_key(root, resume_token)
            puts.append(Put(session.token_key, session._owner_value(), lease=lease_id))
        # create_revision == 0: a retried put finds its own key and changes nothing.
        done = await client.txn(
            [Compare(session.key, Target.CREATE, "==", 0)], puts, idempotent=True
        )
        session.token_revision = done.revision
        session._keeper = asyncio.create_task(
            session._keep_alive(), name=f"etcd lease {session.sid}"
        )
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

    @classmethod
    async def take_over(
        cls, client: EtcdClient, resume_token: str, gateway: str, *, root: bytes = DEFAULT_ROOT
    ) -> EtcdSession | None:
        """The live session whose resume token this is, kept alive from here and owned
        by ``gateway`` from now on; None if there is none (never was, or its lease
        expired or was revoked)."""
        key = token_key(root, resume_token)
        while True:
            kv = await client.get(key)
            if kv is None:
                return None
            try:
                ttl_s = await client.lease_keepalive(kv.lease)  # renewed: the TTL it was granted
            except LeaseNotFound:
                return None
            found = json.loads(kv.value)
            session = cls(client, kv.lease, ttl_s, str(found["sid"]), root)
            session.token_key = key
            session.public_id, session.gateway = str(found["id"]), gateway
            # Compared: the key is still on that lease (not expired, nor taken meanwhile).
            done = await client.txn(
                [Compare(key, Target.MOD, "==", kv.mod_revision)],
                [Put(key, session._owner_value(), lease=kv.lease)],
            )
            if done.succeeded:
                session.token_revision = done.revision
                client.metrics.session_resumes += 1
                break
        session._keeper = asyncio.create_task(
            session._keep_alive(), name=f"etcd lease {session.sid}"
        )
        return session

    def _owner_value(self) -> bytes:
        return json.dumps({"sid": self.sid, "id": self.public_id, "gateway": self.gateway}).encode()

    async def owned(self) -> bool:
        """Whether this gateway still serves the session (no other took it over)."""
        if self.token_key is None:
            return True
        kv = await self.client.get(self.token_key)
        if kv is None or kv.lease != self.lease_id:
            return True  # gone with the lease (revoking changes nothing), or not this lease
        return bool(json.loads(kv.value).get("gateway") == self.gateway)

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
