"""Condition and Barrier on etcd.

**Condition**: waiter keys on the session's lease, next to a named Lock or RLock.

``wait`` is one Txn: it compares that the caller's lock key is the one it
holds, deletes it (the lock is free for the next contender) and puts a
waiter key ``/m/cv/<name>/w/<lease>/<random>`` on the session's lease (its
value: the mark of its retake and its owner); then it watches that key.
``notify(n)`` deletes the first ``n`` waiter keys (in arrival order: by
create_revision), ``notify_all`` all of them, each in a Txn that also puts
that waiter's contender key for the lock, so notified waiters take the
lock back in notify order; a waiter whose key is deleted was notified, and
takes the lock back (as deep as it held it, for an RLock) before it
returns True. A timeout withdraws the key
(False, unless a notify deleted it first), then takes the lock back too.
A waiter's session that ends takes its key with it.

**A wait asked again** (``REISSUE``: the gateway that ran it died, its
session taken over by another): the waiter key is named by the client's
request id (``w/<lease>/r<id>``) and the retake's marks derive from it (one
once notified, another once it gave up: a timeout withdraws the waiter key
and queues the retake in one Txn), so the gateway that takes the wait over
finds where it stood (``_found``). Its waiter key there: it waits on, in its
place in notify order (a notify meanwhile deleted the key and queued the
retake: it was notified). Its retake there: it goes on queueing for the
lock, or holds it, and answers as the first gateway would have (notified,
or not). The caller's own holding there: the wait had not begun, and
begins. An RLock's depth rides in the waiter key's value (``*<n>``) and in
the retake's (its count), so it is held as deep as before. **Where the
place is not kept**: a Lock's waiter notified (or timed out) while another
thread of its session held that Lock leaves no trace; asked again, it takes
the Lock back (after that holding) and answers True: at worst a wake-up
with no notify (``threading.Condition`` callers check their predicate),
never a notify lost, never the lock held twice. A gateway that lives on
and lets go of a session taken over leaves its waits' keys to the waits
asked again.

A ``wait`` given up by its client (an interrupt: ``stop`` set) stops
waiting for a notify and takes the lock back, for the client's ``restore``
(``ConditionHandle``), as the memory store does; a wait cancelled (its
session ended, a stock client's interrupt) lets the lock go, even before
its Txn ran, and does not take it back.

**Barrier** ``/m/b/<name>``: its generation, the count of parties arrived,
whether it is broken and how often it was reset, in one key changed by
compare-and-set; a party waits by watching the key until the generation
moves on (released: its index) or it breaks or is reset
(``BrokenBarrierError``). A timeout breaks it; a party cancelled breaks it
(its session ended: nobody comes back for it), unless its client gave the
wait up (an interrupt): then it leaves the count, as in the memory store,
in a Txn that also deletes its arrival key (below), compared: safe to make
again, the leave is made again while etcd is out of reach, until answered,
and never lowers the count twice. Each arrival notes, in its Txn, which
client request it was, in which round and with which index
(``/m/bp/<name>/<lease>/<thread>``, on the session's lease): a **wait asked
again** (``REISSUE``: its gateway died, its session taken over by another)
that had arrived is the same party of the same round, never counted twice,
the round not broken: it waits on for that round (its index once released,
``BrokenBarrierError`` if it broke or was reset); one that had not arrived
arrives. A gateway that lives on and lets go of a session taken over leaves
its parties counted, for the waits asked again. **Differs from the memory
store**: a party whose gateway died and whose client never came back stays
counted (nobody is left to break the barrier for it): the others wait for
their timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import marshal
import secrets
import threading
from collections.abc import Callable
from typing import Any

from managerd.store.api import BadArgument, BadState
from managerd.store.etcd.client import EtcdClient, cleanup, until_answered
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    EventType,
    Get,
    Put,
    RangeResult,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.locks import (
    EtcdLock,
    EtcdRLock,
    _caller_mark,
    lock_depth,
    new_attempt,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession
from managerd.store.etcd.watching import changed


class EtcdCondition:
    """The condition ``name`` over ``lock``."""

    def __init__(
        self, client: EtcdClient, name: str, lock: EtcdLock, *, root: bytes = DEFAULT_ROOT
    ) -> None:
        self.client = client
        self.lock = lock
        self.waiters = root + b"cv/" + name_key(name) + b"/w/"
        self.end = prefix_end(self.waiters)

    async def _held(self, session: EtcdSession, owner: str, what: str) -> tuple[int, int]:
        """``(token, depth)`` of the caller's holding; BadState if it does not hold it."""
        key = self.lock._key(session, owner)
        held = await self.lock.holder()
        if held is None or held[0] != key:
            raise BadState(f"cannot {what} on un-acquired lock")
        kv = await self.client.get(key)
        if kv is None:
            raise BadState(f"cannot {what} on un-acquired lock")
        return held[1], lock_depth(kv.value) if isinstance(self.lock, EtcdRLock) else 1

    def waiter_key(self, session: EtcdSession, request: int = 0) -> bytes:
        """The waiter key of ``session``'s ``wait`` made as client request ``request``
        (0: none known, a random key)."""
        tail = b"r%016x" % request if request else secrets.token_hex(8).encode()
        return self.waiters + f"{session.lease_id:016x}/".encode() + tail

    async def wait(
        self,
        session: EtcdSession,
        owner: str,
        timeout_s: float | None,
        on_wake: Callable[[], None] | None = None,
        stop: asyncio.Event | None = None,
        key: bytes | None = None,
        released: asyncio.Future[None] | None = None,
        *,
        request: int = 0,
        caller: int = 0,
        again: bool = False,
    ) -> tuple[bool, int]:
        """Release, wait for a notify or the timeout, take the lock back: ``(notified,
        new token)``. ``on_wake`` runs once it waits for the lock, no longer a notify.

        ``key`` is the waiter key (``waiter_key``, a new one if None). ``released``
        is set once the lock was let go (or the wait refused: ``BadState``).
        ``stop`` set (the client gave the wait up): it stops waiting for a notify
        and takes the lock back, as a timeout does. Cancelled: the lock is let go
        if it was not yet, and not taken back. ``request``: the client's id of the
        request this wait is (it names the waiter key and the retake's marks);
        ``caller``: the client thread. ``again``: the wait asked again after the
        gateway that ran it died (``REISSUE``): it goes on from where that one was
        (``_found``).
        """
        lock_key = self.lock._key(session, owner)
        key = key or self.waiter_key(session, request)
        # The mark of its retake once notified: a notify queues it for the lock with
        # it, in notify order (``_wake``); a timeout's retake has its own
        # (``_given_up``), so that a wait asked again knows which it was.
        mark = wait_mark(request, caller)
        try:
            found = await self._found(session, owner, key, mark, caller) if again else None
            if found is None:
                depth = await self._release(session, owner, lock_key, key, mark)
                found = (None, mark + _depth_digits(depth))
        except asyncio.CancelledError:
            # The wait was called: the lock goes, as the memory store lets it go at once.
            await cleanup(self._abandon(session, owner, key))
            raise
        finally:
            if released is not None and not released.done():
                released.set_result(None)
        notified, attempt = found
        if notified is None:
            notified, attempt = await self._await_notify(
                session, lock_key, key, attempt, timeout_s, stop
            )
        if on_wake is not None:
            on_wake()
        try:
            new_token = await self._take_back(session, owner, attempt)
        except asyncio.CancelledError:
            # Dropped while queued for the lock (a notify may have queued it): it goes,
            # unless the session went on through another gateway (the wait asked
            # again there takes it).
            await cleanup(self._withdraw(session, lock_key, attempt))
            raise
        return notified, new_token

    async def _release(
        self, session: EtcdSession, owner: str, lock_key: bytes, key: bytes, mark: bytes
    ) -> int:
        """Let the lock go and become a waiter, in one Txn; how deep it was held."""
        token, depth = await self._held(session, owner, "wait")
        done = await self.client.txn(
            [Compare(lock_key, Target.CREATE, "==", token)],
            [Delete(lock_key), Put(key, _waiter_value(mark, owner, depth), lease=session.lease_id)],
        )
        if not done.succeeded:
            raise BadState("cannot wait on un-acquired lock")
        return depth

    async def _await_notify(
        self,
        session: EtcdSession,
        lock_key: bytes,
        key: bytes,
        attempt: bytes,
        timeout_s: float | None,
        stop: asyncio.Event | None,
    ) -> tuple[bool, bytes]:
        """Wait for the notify that deletes ``key``, or the timeout or ``stop``:
        ``(notified, the retake's attempt mark)``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._notified(key, stop)
            return True, attempt
        except (TimeoutError, _Stopped):
            return await self._give_up(session, lock_key, key, attempt)
        except asyncio.CancelledError:
            await cleanup(self._withdraw_waiter(session, key))
            raise

    async def _give_up(
        self, session: EtcdSession, lock_key: bytes, key: bytes, attempt: bytes
    ) -> tuple[bool, bytes]:
        """A timeout or ``stop``: withdraw the waiter key and, in the same Txn, queue for
        the lock with the given-up mark (a wait asked again finds either the waiter
        key or that retake, never neither). ``(notified, retake's mark)``: notified
        if a notify deleted the key first."""
        given_up = _given_up(attempt)
        done = await self.client.txn(
            [Compare(key, Target.CREATE, "!=", 0), Compare(lock_key, Target.CREATE, "==", 0)],
            [Delete(key), Put(lock_key, given_up, lease=session.lease_id)],
            [Get(key), Get(lock_key)],
            idempotent=True,
            own_revision=True,  # a contender for the lock: its revision is its token
        )
        if done.succeeded:
            return False, given_up
        waiter, lock = done.responses
        assert isinstance(waiter, RangeResult) and isinstance(lock, RangeResult)
        if lock.kvs and lock.kvs[0].value == given_up:
            return False, given_up  # our own Txn, applied unanswered and repeated
        if not waiter.kvs:
            return True, attempt  # a notify deleted it first
        # The session's Lock is held (another of its threads): the key alone goes, and
        # the retake queues behind that holding (``_take_back``).
        withdrawn = await self.client.txn(
            [Compare(key, Target.CREATE, "!=", 0)], [Delete(key)], idempotent=True
        )
        if withdrawn.succeeded:
            return False, given_up
        return True, attempt  # a notify deleted it first (or, repeated, ours: a wake-up)

    async def _found(
        self, session: EtcdSession, owner: str, key: bytes, mark: bytes, caller: int
    ) -> tuple[bool | None, bytes] | None:
        """Where a wait asked again stands, its first gateway having died: ``(None,
        attempt)`` if its waiter key is there (it waits on, in its place in notify
        order), ``(notified, attempt)`` if it was notified or gave up (its retake is
        queued, or holds: it goes on), None if it had not begun (this thread holds
        the lock: it begins now). ``attempt`` is the retake's mark."""
        waiter = await self.client.get(key)
        if waiter is not None:
            mark, _, digits = _parse_waiter(waiter.value)
            return None, mark + digits
        held = await self.client.get(self.lock._key(session, owner))
        if held is not None:
            if held.value[:_ATTEMPT] == mark:
                return True, held.value  # notified: queued for the lock, or holding it
            if held.value[:_ATTEMPT] == _given_up(mark)[:_ATTEMPT]:
                return False, held.value  # timed out (or stopped): queued, or holding
            if held.value[_ATTEMPT - 4 : _ATTEMPT] == _caller_mark(caller):
                return None  # this thread's holding: the wait had not let it go
        if isinstance(self.lock, EtcdRLock):
            return None  # no waiter, no retake, not held: a wait refused (BadState)
        # A Lock's waiter notified (or timed out) while another thread of its session
        # held the Lock leaves no trace: it takes the Lock back and says notified (at
        # worst a wake-up without a notify, never a notify lost).
        return True, mark

    async def _abandon(self, session: EtcdSession, owner: str, key: bytes) -> None:
        """A wait cancelled before it waited: its waiter key (if put) and the lock go,
        unless another gateway took the session over (the wait asked again there
        goes on with them)."""
        if await session.owned():
            await self.client.txn([Compare(key, Target.CREATE, "!=", 0)], [Delete(key)])
            await self._let_go(session, owner)

    async def _withdraw_waiter(self, session: EtcdSession, key: bytes) -> None:
        """A wait cancelled while it waited for a notify: its waiter key goes (the wait
        is no longer notified), unless the session went on through another gateway."""
        if await session.owned():
            await self.client.txn([Compare(key, Target.CREATE, "!=", 0)], [Delete(key)])

    async def _take_back(self, session: EtcdSession, owner: str, attempt: bytes) -> int:
        """The lock again, for a wait that ends: its token. If the caller's session holds
        a Lock meanwhile (another acquire of its own: a Lock is not re-entrant), the
        wait queues behind that holding, as a waiter of its own."""
        key = self.lock._key(session, owner)
        while True:
            try:
                # EtcdLock's acquire (an RLock's would take a key found as a re-entry).
                token = await EtcdLock.acquire(self.lock, session, owner, attempt=attempt)
                assert token is not None  # blocking, no timeout
                return token
            except RuntimeError:
                read = await self.client.range(key)
                if read.kvs and read.kvs[0].value[:_ATTEMPT] == _given_up(attempt)[:_ATTEMPT]:
                    # The same wait's other retake (a gateway that ran it gave up as a
                    # notify came, its session taken over): that one goes on.
                    attempt = read.kvs[0].value
                    continue
                if read.kvs:
                    await changed(
                        self.client, key, after_revision=read.revision, kind=EventType.DELETE
                    )

    async def _notified(self, key: bytes, stop: asyncio.Event | None) -> None:
        """Return once ``key`` (a waiter's) is deleted; ``_Stopped`` once ``stop`` is set."""
        read = await self.client.range(key)
        if not read.kvs:
            return
        deleted = asyncio.ensure_future(
            changed(self.client, key, after_revision=read.revision, kind=EventType.DELETE)
        )
        if stop is None:
            await deleted
            return
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([deleted, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            deleted.cancel()
            stopped.cancel()
        if deleted.done() and not deleted.cancelled():
            deleted.result()
            return
        raise _Stopped

    async def _withdraw(self, session: EtcdSession, key: bytes, attempt: bytes) -> None:
        """Delete the lock key ``key`` if it is still a retake of this wait (the mark of
        ``attempt``, or its other: ``_take_back``), and the session was not taken over
        by another gateway."""
        if not await session.owned():
            return
        kv = await self.client.get(key)
        marks = (attempt[:_ATTEMPT], _given_up(attempt)[:_ATTEMPT])
        if kv is not None and kv.value[:_ATTEMPT] in marks:
            await self.release_whole(key, kv.create_revision)

    async def _let_go(self, session: EtcdSession, owner: str) -> None:
        """Release the caller's holding whole (any depth), if it holds the lock."""
        key = self.lock._key(session, owner)
        kv = await self.client.get(key)
        if kv is not None:
            await self.release_whole(key, kv.create_revision)

    async def release_whole(self, key: bytes, token: int) -> bool:
        """Delete the holding ``key`` if it is still the one of ``token``."""
        done = await self.client.txn(
            [Compare(key, Target.CREATE, "==", token)], [Delete(key)], idempotent=True
        )
        return done.succeeded

    async def notify(self, session: EtcdSession, owner: str, n: Any = 1) -> list[bytes]:
        """Wake at most ``n`` waiters, counted as ``threading.Condition.notify`` counts;
        the waiter keys deleted."""
        await self._held(session, owner, "notify")
        waiting = await self.client.range(self.waiters, self.end, oldest_first=True, keys_only=True)
        woken = 0
        while woken < len(waiting.kvs):
            try:
                more = n > 0
            except TypeError as exc:
                raise BadArgument(str(exc)) from None
            if not more:
                break
            woken += 1
            n -= 1
        woken_kvs = waiting.kvs[:woken]
        for kv in woken_kvs:
            await self._wake(kv.key)
        return [kv.key for kv in woken_kvs]

    async def _wake(self, key: bytes) -> None:
        """Notify the waiter of ``key``: delete it and, in the same Txn, queue it for the
        lock (its contender key, on its lease, with its mark), so that notified
        waiters take the lock back in notify order. If its session holds the lock
        key already (a Lock taken again meanwhile), or the waiter is gone, only
        the delete: the waiter then queues itself when it sees it."""
        kv = await self.client.get(key)
        if kv is None:
            return
        if len(kv.value) < _ATTEMPT:  # a waiter without a mark: it queues itself
            await self.client.txn([], [Delete(key)])
            return
        lease_hex = kv.key[len(self.waiters) :].split(b"/", 1)[0]
        mark, owner, digits = _parse_waiter(kv.value)
        lock_key = self.lock.prefix + lease_hex + (b"/" + owner if owner else b"")
        # Its retake holds as deep as the wait let go (an RLock's count in the value).
        await self.client.txn(
            [
                Compare(key, Target.MOD, "==", kv.mod_revision),
                Compare(lock_key, Target.CREATE, "==", 0),
            ],
            [Delete(key), Put(lock_key, mark + digits, lease=kv.lease)],
            [Delete(key)],
        )

    async def notify_all(self, session: EtcdSession, owner: str) -> list[bytes]:
        """Wake every waiter; the waiter keys deleted. (No waiter comes meanwhile: a
        new one needs the lock, which the caller holds.)"""
        await self._held(session, owner, "notify")
        waiting = await self.client.range(self.waiters, self.end, oldest_first=True, keys_only=True)
        for kv in waiting.kvs:
            await self._wake(kv.key)
        return [kv.key for kv in waiting.kvs]

    async def waiting(self) -> int:
        return (await self.client.range(self.waiters, self.end, count_only=True)).count


_ATTEMPT = len(new_attempt())


def wait_mark(request: int, caller: int) -> bytes:
    """The attempt mark of the retake of a ``wait`` made as client request ``request``
    by client thread ``caller``, once notified: derived from the request (the gateway
    a wait asked again comes to finds it), random without one."""
    if not request:
        return new_attempt(caller)
    digest = hashlib.blake2b(b"cv/%d" % request, digest_size=_ATTEMPT - 4).digest()
    return digest + _caller_mark(caller)


def _given_up(attempt: bytes) -> bytes:
    """The mark of the retake of the wait whose notified mark starts ``attempt``, once
    it gave up (timed out, stopped): never the notified one."""
    flipped = bytes(b ^ 0xFF for b in attempt[: _ATTEMPT - 4])
    return flipped + attempt[_ATTEMPT - 4 :]


def _depth_digits(depth: int) -> bytes:
    """An RLock key's count after its mark (``locks.lock_depth``); none for 1."""
    return b"%d" % depth if depth > 1 else b""


def _waiter_value(mark: bytes, owner: str, depth: int) -> bytes:
    """A waiter key's value: its retake's mark, whose it is, and (``*<n>``) how deep
    its retake holds, for a notify that queues it (``_wake``) and a wait asked
    again (``_found``)."""
    return mark + owner.encode() + (b"*%d" % depth if depth > 1 else b"")


def _parse_waiter(value: bytes) -> tuple[bytes, bytes, bytes]:
    """``(mark, owner, depth digits)`` of a waiter key's value (``_waiter_value``)."""
    owner, _, digits = value[_ATTEMPT:].partition(b"*")
    return value[:_ATTEMPT], owner, digits


class _Stopped(Exception):
    """A condition wait given up by its client: it takes the lock back now."""


class EtcdBarrier:
    """The barrier ``name``: one key ``/m/b/<name>`` holding its state, changed by
    compare-and-set (see ``BarrierHandle`` for what differs from the memory store),
    and a key per waiting client thread, ``/m/bp/<name>/<lease>/<thread>`` on its
    session's lease, put in the Txn of its arrival: which request arrived, in which
    round, with which index (``_arrived``: a wait asked again finds it)."""

    def __init__(
        self, client: EtcdClient, name: str, parties: int, *, root: bytes = DEFAULT_ROOT
    ) -> None:
        self.client = client
        self.parties = parties
        self.key = root + b"b/" + name_key(name)
        self.arrivals = root + b"bp/" + name_key(name) + b"/"

    def initial(self) -> bytes:
        return _barrier(0, 0, False, 0)

    def arrival_key(self, session: EtcdSession, caller: int) -> bytes:
        """Where the arrival of client thread ``caller`` of ``session`` is noted."""
        return self.arrivals + b"%016x/%d" % (session.lease_id, caller)

    async def state(self) -> tuple[dict[str, Any], int]:
        kv = await self.client.get(self.key)
        if kv is None:
            return {"gen": 0, "count": 0, "broken": False, "resets": 0}, 0
        return marshal.loads(kv.value), kv.mod_revision

    async def _change(
        self,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        also: Callable[[dict[str, Any]], list[Put]] | None = None,
    ) -> tuple[dict[str, Any], int]:
        """Apply ``change`` (None: no change) by compare-and-set, with the puts ``also``
        makes of the state seen in the same Txn; the state it saw."""
        while True:
            state, revision = await self.state()
            new = change(dict(state))
            if new is None:
                return state, revision
            ops = [Put(self.key, _barrier(new["gen"], new["count"], new["broken"], new["resets"]))]
            done = await self.client.txn(
                [Compare(self.key, Target.MOD, "==", revision)],
                ops + (also(state) if also is not None else []),
            )
            if done.succeeded:
                return state, done.revision

    async def wait(
        self,
        timeout_s: float | None,
        leaves: Callable[[], bool] = bool,
        *,
        session: EtcdSession | None = None,
        caller: int = 0,
        request: int = 0,
        again: bool = False,
    ) -> int:
        """This party's index once ``parties`` have come; BrokenBarrierError if it breaks.

        Cancelled while waiting, the party breaks the barrier (its session ended:
        nobody comes back for it) unless ``leaves()`` says its client gave the
        wait up: then it leaves the count, and the others wait on; or unless
        another gateway took ``session`` over: the wait asked again there goes on.
        ``request`` (the client's id of the request this wait first was) and
        ``caller`` (its thread) note its arrival; ``again``: the wait asked again
        after the gateway that ran it died (``REISSUE``): a party that arrived
        stays the party it was, in its round (``_arrived``), never counted twice.
        """
        found = await self._arrived(session, caller, request) if again else None
        if found is None:
            seen, revision = await self._arrive(session, caller, request)
            index = int(seen["count"])
            if index + 1 == self.parties:
                return index
            noted = revision  # the arrival key's, put in the arrival's Txn
        else:
            seen, index, noted = found
            now, revision = await self.state()
            if now["gen"] != seen["gen"]:
                return index
            if now["broken"] or now["resets"] != seen["resets"]:
                raise threading.BrokenBarrierError
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    await changed(self.client, self.key, after_revision=revision)
                    now, revision = await self.state()
                    if now["gen"] != seen["gen"]:
                        return index
                    if now["broken"] or now["resets"] != seen["resets"]:
                        raise threading.BrokenBarrierError
        except TimeoutError:
            await self.abort(seen["gen"])
            raise threading.BrokenBarrierError from None
        except asyncio.CancelledError:
            arrival = None if session is None else (self.arrival_key(session, caller), noted)
            await cleanup(self._cancelled(session, seen, leaves(), arrival))
            raise

    async def _arrive(
        self, session: EtcdSession | None, caller: int, request: int
    ) -> tuple[dict[str, Any], int]:
        """Count this party in; the state it arrived at, and the revision after."""

        def arrive(state: dict[str, Any]) -> dict[str, Any]:
            if state["broken"]:
                raise threading.BrokenBarrierError
            if state["count"] + 1 == self.parties:
                return {**state, "gen": state["gen"] + 1, "count": 0}
            return {**state, "count": state["count"] + 1}

        def noted(state: dict[str, Any]) -> list[Put]:
            # Noted for every session's party, with a request id or not (a stock
            # client's): a party that leaves deletes it, compared (``_leave``).
            if session is None:
                return []
            arrival = {"request": request, "gen": state["gen"], "resets": state["resets"],
                       "index": state["count"]}  # fmt: skip
            key = self.arrival_key(session, caller)
            return [Put(key, marshal.dumps(arrival), lease=session.lease_id)]

        return await self._change(arrive, noted)

    async def _arrived(
        self, session: EtcdSession | None, caller: int, request: int
    ) -> tuple[dict[str, Any], int, int] | None:
        """A wait asked again: ``(the round it arrived in, its index, the revision of
        its arrival key)`` if the request arrived through the gateway that died, None
        if it had not."""
        if session is None or not request:
            return None
        kv = await self.client.get(self.arrival_key(session, caller))
        if kv is None:
            return None
        arrival = marshal.loads(kv.value)
        if arrival.get("request") != request:
            return None  # this thread's earlier wait: this one had not arrived
        return arrival, int(arrival["index"]), kv.mod_revision

    async def _cancelled(
        self,
        session: EtcdSession | None,
        seen: dict[str, Any],
        leaving: bool,
        arrival: tuple[bytes, int] | None,
    ) -> None:
        """A waiting party cancelled: it leaves (its client gave the wait up) or breaks
        the barrier (its session ended), unless the session went on through another
        gateway: there the wait asked again is still this party.

        A leave compared on the party's arrival key (``arrival``: the key and the
        revision it was put at) is safe to make again, so it is made again while
        etcd is out of reach (``client.until_answered``): left counted, the party
        would keep the others of its round waiting for one that never comes."""

        async def cancelled() -> None:
            if session is not None and not await session.owned():
                return
            if leaving:
                await self._leave(seen, arrival)
            else:
                await self.abort(seen["gen"])

        if leaving and arrival is not None:
            await until_answered(cancelled)
        else:
            await cancelled()

    async def _leave(self, seen: dict[str, Any], arrival: tuple[bytes, int] | None) -> None:
        """A party gave up: it leaves the count of its generation, not breaking it.

        ``arrival`` (its arrival key and the revision it was put at): the leave's
        Txn deletes that key, compared, so a try applied whose answer was lost,
        made again, finds it gone and lowers the count no further."""
        while True:
            if arrival is not None:
                kv = await self.client.get(arrival[0])
                if kv is None or kv.mod_revision != arrival[1]:
                    return  # left already (or its session is over)
            state, revision = await self.state()
            if state["gen"] != seen["gen"] or state["resets"] != seen["resets"]:
                return
            if state["broken"] or not state["count"]:
                return
            new = _barrier(state["gen"], state["count"] - 1, False, state["resets"])
            compare = [Compare(self.key, Target.MOD, "==", revision)]
            ops: list[Put | Delete] = [Put(self.key, new)]
            if arrival is not None:
                compare.append(Compare(arrival[0], Target.MOD, "==", arrival[1]))
                ops.append(Delete(arrival[0]))
            if (await self.client.txn(compare, ops)).succeeded:
                return

    async def abort(self, generation: int | None = None) -> None:
        def abort(state: dict[str, Any]) -> dict[str, Any] | None:
            if generation is not None and state["gen"] != generation:
                return None
            return {**state, "broken": True, "count": 0}

        await self._change(abort)

    async def reset(self) -> None:
        await self._change(lambda s: {**s, "broken": False, "count": 0, "resets": s["resets"] + 1})


def _barrier(gen: int, count: int, broken: bool, resets: int) -> bytes:
    return marshal.dumps({"gen": gen, "count": count, "broken": broken, "resets": resets})
