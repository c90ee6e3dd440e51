"""A lock on etcd with fencing tokens: etcd's mutex recipe, FIFO.

Each contender puts its own key ``/m/l/<name>/<lease>[/<owner>]`` on its
session's lease; the holder is the contender whose key was created first,
and its **fencing token is that key's create_revision** — a cluster-wide
revision, so tokens strictly increase across gateways, restarts and
failovers. A waiter watches only its predecessor (the newest key created
before its own) for deletion, so a release wakes one waiter, in arrival
order, with no herd and no polling; after a wake-up it looks again (a
predecessor that gave up is not the holder).

The holder's key is on its session's lease: when the session ends (closed,
or its lease expired because its gateway died or was cut off), etcd
deletes the key and the next waiter holds the lock, with a larger token.
Release deletes the key only if its create_revision is still the token
(``LockLost`` otherwise: the session expired and someone else may hold it).
``release_holder`` is ``threading.Lock``'s release by anyone: it deletes
whichever key holds the lock. ``adopt`` is an acquire asked again after
the gateway that ran it died: its key, still on the session's lease, keeps
its place.

A Lock's key value is a random attempt mark, then ``note`` (the
acquiring client thread, ``@<thread>``: status and the wait-for graph of
``deadlocks.py`` name the holding thread).

**RLock**: the owner (a client thread) re-enters by raising a count kept in
its key's value, changed with a compare on the key's create_revision (the
token), so a count never lands on another holding; the key goes at 0.
"""

from __future__ import annotations

import asyncio
import secrets

from managerd.store.etcd.client import EtcdClient, cleanup, settled
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Put,
    RangeResult,
    Target,
    TxnResult,
    name_key,
    prefix_end,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession
from managerd.store.etcd.watching import changed
from managerd_client.errors import LockLost


class EtcdLock:
    """The lock ``name``; each call says whose session (and owner, e.g. a client thread) acts."""

    def __init__(self, client: EtcdClient, name: str, *, root: bytes = DEFAULT_ROOT):
        self.client = client
        self.name = name
        self.prefix = root + b"l/" + name_key(name) + b"/"

    def _key(self, session: EtcdSession, owner: str) -> bytes:
        key = self.prefix + f"{session.lease_id:016x}".encode()
        return key + b"/" + owner.encode() if owner else key

    async def acquire(
        self,
        session: EtcdSession,
        owner: str = "",
        *,
        blocking: bool = True,
        timeout_s: float | None = None,
        caller: int = 0,
        note: bytes = b"",
        attempt: bytes | None = None,
        request: int = 0,
    ) -> int | None:
        """The fencing token once held; None if not held in time (or at once, not blocking).

        A contender that gives up (timeout, not blocking, or cancelled)
        removes its key, so the waiter behind it watches on. ``caller`` (the
        client thread) is marked in the key, for ``adopt``; ``note`` follows the
        mark (who holds: status and the wait-for graph). ``attempt``: the mark of
        this acquisition (new if None); a key found with it is this acquisition's
        own (a retry, or a contender key put for it: a Condition's notify queues
        its waiters so). ``request``: the client's id of the request it is (an
        RLock keeps it: ``adopt``).
        """
        key = self._key(session, owner)
        attempt = (attempt or new_attempt(caller)) + note

        async def withdrawn(done: TxnResult | None) -> None:
            if done is not None and done.succeeded:
                await self._withdraw_if_ours(session, key, done.revision)
            else:  # a retry's, or its outcome unknown: the key if it is this attempt's
                await self._withdraw_marked(session, key, attempt[:_ATTEMPT_BYTES])

        # Our key, unless it exists: a retry of this call finds its own attempt.
        # Cancelled meanwhile, the put is waited for before its key is withdrawn: a key
        # that landed after the withdrawal would hold the lock next, for nobody.
        done = await settled(
            self.client.txn(
                [Compare(key, Target.CREATE, "==", 0)],
                [Put(key, attempt, lease=session.lease_id)],
                [Get(key)],
                idempotent=True,
                own_revision=True,  # the fencing token: no other contender's
            ),
            withdrawn,
        )
        if done.succeeded:
            token = done.revision
        else:
            [existing] = done.responses
            assert isinstance(existing, RangeResult)
            kv = existing.kvs[0]
            if kv.value != attempt:
                raise RuntimeError(f"{owner or session.sid} already holds or waits for {self.name}")
            token = kv.create_revision
        try:
            if await self._wait_turn(key, token, blocking, timeout_s):
                return token
        except BaseException:
            await cleanup(self._withdraw_if_ours(session, key, token))
            raise
        await self._withdraw(key, token)
        return None

    async def adopt(
        self,
        session: EtcdSession,
        owner: str = "",
        *,
        blocking: bool = True,
        timeout_s: float | None = None,
        caller: int = 0,
        note: bytes = b"",
        request: int = 0,
    ) -> int | None:
        """``acquire`` asked again for a call of ``caller`` lost with the gateway that
        ran it (the session was taken over by this one): the key that call put, if it
        is there, keeps its place in line, or holds already; else (no key, another
        thread's holding of the session's Lock, or an RLock's holding that ``request``
        did not deepen: ``_made_by``) an acquire as any."""
        key = self._key(session, owner)
        try:
            kv = await self.client.get(key)
        except asyncio.CancelledError:  # that call's key is this one's to withdraw
            await cleanup(self._withdraw_marked(session, key, _caller_mark(caller), at=4))
            raise
        if (
            kv is None
            or kv.value[_ATTEMPT_BYTES - 4 : _ATTEMPT_BYTES] != _caller_mark(caller)
            or not self._made_by(kv.value, request)
        ):
            return await self.acquire(
                session, owner, blocking=blocking, timeout_s=timeout_s, caller=caller,
                note=note, request=request,
            )  # fmt: skip
        token = kv.create_revision
        try:
            if await self._wait_turn(key, token, blocking, timeout_s):
                return token
        except BaseException:
            await cleanup(self._withdraw_if_ours(session, key, token))
            raise
        await self._withdraw(key, token)
        return None

    def _made_by(self, value: bytes, request: int) -> bool:
        """Whether a key of the caller's thread, found by ``adopt``, is the lost
        call's: a Lock's is (a thread waits in one acquire at a time)."""
        return True

    async def _wait_turn(
        self, key: bytes, token: int, blocking: bool, timeout_s: float | None
    ) -> bool:
        loop = asyncio.get_running_loop()
        give_up = None if timeout_s is None else loop.time() + timeout_s
        end = prefix_end(self.prefix)
        while True:
            before = await self.client.range(
                self.prefix, end, limit=1, max_create_revision=token - 1, newest_first=True
            )
            if not before.kvs:
                if (await self.client.get(key)) is None:
                    raise LockLost(f"the session's lease ended while waiting for {self.name}")
                return True
            if not blocking:
                return False
            left_s = None if give_up is None else give_up - loop.time()
            if left_s is not None and left_s <= 0:
                return False
            predecessor = before.kvs[0].key
            try:
                # Its delete, or [] if that history is gone: look again either way.
                await asyncio.wait_for(
                    changed(
                        self.client, predecessor, after_revision=before.revision,
                        kind=EventType.DELETE,
                    ),
                    left_s,
                )  # fmt: skip
            except TimeoutError:
                return False

    async def _withdraw_if_ours(self, session: EtcdSession, key: bytes, token: int) -> None:
        """A cancelled acquire's key goes, unless another gateway took the session over
        (this one is ending it): there, the call asked again keeps that key."""
        if await session.owned():
            await self._withdraw(key, token)

    async def _withdraw_marked(
        self, session: EtcdSession, key: bytes, mark: bytes, *, at: int = 0
    ) -> None:
        """``key`` withdrawn if its value has ``mark`` at ``at`` (an attempt's, or from
        4, a caller's): a cancelled acquire's key, whose put's answer it never read."""
        kv = await self.client.get(key)
        if kv is not None and kv.value[at : at + len(mark)] == mark:
            await self._withdraw_if_ours(session, key, kv.create_revision)

    async def _withdraw(self, key: bytes, token: int) -> None:
        await self.client.txn(
            [Compare(key, Target.CREATE, "==", token)], [Delete(key)], idempotent=True
        )

    async def release(self, session: EtcdSession, token: int, owner: str = "") -> None:
        """Give it up; ``LockLost`` if the key is no longer the one of ``token``."""
        key = self._key(session, owner)
        done = await self.client.txn(
            [Compare(key, Target.CREATE, "==", token)], [Delete(key)], idempotent=True
        )
        if not done.succeeded and not done.repeated:
            raise LockLost(f"{self.name} was not held with token {token} (the session expired?)")
        # Repeated over a failover, the failed compare is our own delete applied
        # unanswered (or the lease's end): our holding is over either way. Reading it
        # as LockLost would send the gateway on to release whoever holds it next.

    async def release_holder(self) -> bool:
        """Release whoever holds it (``threading.Lock`` lets anyone); False if free.

        One attempt: if the holding read is gone when the delete comes (its
        holder released it, its lease expired, or this very delete was applied
        unanswered and retried), the lock was released all the same. Looking
        again would release the *next* holder, who was never asked to.
        """
        held = await self.holder()
        if held is None:
            return False
        key, token = held
        await self.client.txn(
            [Compare(key, Target.CREATE, "==", token)], [Delete(key)], idempotent=True
        )
        return True

    async def holder(self) -> tuple[bytes, int] | None:
        """The holder's key and token (the oldest contender), or None if free."""
        first = await self.client.range(self.prefix, prefix_end(self.prefix))
        if not first.kvs:
            return None
        kv = min(first.kvs, key=lambda kv: kv.create_revision)
        return kv.key, kv.create_revision


class EtcdRLock(EtcdLock):
    """A re-entrant lock: ``owner`` (a client thread) may acquire it again while it holds it."""

    async def acquire(
        self,
        session: EtcdSession,
        owner: str = "",
        *,
        blocking: bool = True,
        timeout_s: float | None = None,
        caller: int = 0,
        note: bytes = b"",
        attempt: bytes | None = None,
        request: int = 0,
    ) -> int | None:
        """As ``EtcdLock.acquire``; ``note`` is not kept (the key names the thread):
        the value keeps the count and the ``request`` that last raised it."""
        key = self._key(session, owner)
        while True:
            kv, first = await asyncio.gather(
                self.client.get(key),
                self.client.range(
                    self.prefix, prefix_end(self.prefix), limit=1, keys_only=True,
                    oldest_first=True,
                ),
            )  # fmt: skip
            if kv is None:
                return await super().acquire(
                    session,
                    owner,
                    blocking=blocking,
                    timeout_s=timeout_s,
                    caller=caller,
                    attempt=attempt,
                    note=_count_note(1, request),
                )
            if not first.kvs or first.kvs[0].key != key:
                # Our key waits in line: a Condition wait of this thread queued to take
                # the lock back (notified, or given up). Not a holding to re-enter: the
                # caller waits for that key to go, as for a Lock its session holds.
                raise RuntimeError(f"{owner or session.sid} already waits for {self.name}")
            # Our key holds it: a re-entry.
            depth = lock_depth(kv.value)

            async def undone(done: TxnResult | None, held: KeyValue = kv) -> None:
                # Cancelled, the count it raised goes back down (it would keep the
                # lock held after the thread's last release).
                now = await self.client.get(key) if done is None else None
                if done is not None and done.succeeded:
                    revision = done.revision
                elif (
                    now is not None
                    and now.create_revision == held.create_revision
                    and now.mod_revision != held.mod_revision
                    and lock_depth(now.value) == lock_depth(held.value) + 1
                ):
                    revision = now.mod_revision
                else:
                    return
                await self.client.txn(
                    [
                        Compare(key, Target.CREATE, "==", held.create_revision),
                        Compare(key, Target.MOD, "==", revision),
                    ],
                    [Put(key, held.value, lease=session.lease_id)],
                )

            done = await settled(
                self.client.txn(
                    [
                        Compare(key, Target.CREATE, "==", kv.create_revision),
                        Compare(key, Target.MOD, "==", kv.mod_revision),
                    ],
                    [
                        Put(
                            key,
                            _count_value(kv.value, depth + 1, request),
                            lease=session.lease_id,
                        )
                    ],
                ),
                undone,
            )
            if done.succeeded:
                return kv.create_revision

    def _made_by(self, value: bytes, request: int) -> bool:
        """An RLock's key of the thread holds from before when the lost call was a
        re-entry: it is that call's only if the count was raised by ``request``
        (else the re-entry never landed, and is made now)."""
        return not request or _request_of(value) == request

    async def depth(self, session: EtcdSession, owner: str = "") -> int:
        """How many times ``owner`` holds it (0: not)."""
        kv = await self.client.get(self._key(session, owner))
        return 0 if kv is None else lock_depth(kv.value)

    async def release(self, session: EtcdSession, token: int, owner: str = "") -> None:
        key = self._key(session, owner)
        while True:
            kv = await self.client.get(key)
            if kv is None or kv.create_revision != token:
                raise LockLost(f"{self.name} is not held with token {token} (session expired?)")
            count = lock_depth(kv.value)
            if count <= 1:
                await super().release(session, token, owner)
                return
            done = await self.client.txn(
                [
                    Compare(key, Target.CREATE, "==", token),
                    Compare(key, Target.MOD, "==", kv.mod_revision),
                ],
                [Put(key, _count_value(kv.value, count - 1), lease=session.lease_id)],
            )
            if done.succeeded:
                return


_ATTEMPT_BYTES = 8  # the attempt mark EtcdLock.acquire puts first: 4 random, 4 the caller's


def _caller_mark(caller: int) -> bytes:
    return (caller & 0xFFFFFFFF).to_bytes(4, "big")


def new_attempt(caller: int = 0) -> bytes:
    """A mark of one acquisition (the start of its key's value): random, then the
    calling client thread's (``adopt``)."""
    return secrets.token_bytes(_ATTEMPT_BYTES - 4) + _caller_mark(caller)


def lock_depth(value: bytes) -> int:
    """How many times an RLock key's owner holds it."""
    return int(value[_ATTEMPT_BYTES:].partition(b"#")[0] or b"1")


def _request_of(value: bytes) -> int:
    """The client's id of the request that last raised an RLock key's count (0: none
    said)."""
    return int(value[_ATTEMPT_BYTES:].partition(b"#")[2] or b"0", 16)


def _count_note(count: int, request: int = 0) -> bytes:
    """What follows an RLock key's mark: its count, and ``#<request>`` (hex) that
    raised it to that, if known."""
    return b"%d" % count + (b"#%x" % request if request else b"")


def _count_value(value: bytes, count: int, request: int = 0) -> bytes:
    return value[:_ATTEMPT_BYTES] + _count_note(count, request)
