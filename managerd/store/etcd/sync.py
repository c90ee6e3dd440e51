"""Event and Semaphore on etcd.

**Event** ``/m/ev/<name>``: the key exists while the event is set. ``wait``
reads it, and if it is unset watches for its next put from that read's
revision (``watching.py``): a ``set`` wakes every waiter, on any gateway,
even if the event is cleared again at once (as ``threading.Event``).

**Semaphore** ``/m/sem/<name>/``: ``n`` holds the number of permits
(the initial value, plus what was released beyond what was held); each
acquire puts its own contender key ``c/<lease>/<random>`` on the session's
lease. The permits are held by the ``n`` oldest contenders (by
create_revision, which is also each holding's fencing token); the others
wait, in arrival order, watching the semaphore's keys. A contender key is
named by the client's request id when there is one (``c/<lease>/r<id>``):
an acquire asked again after the gateway that ran it died (``REISSUE``,
naming the request it first was) finds the key that request put, on the
session's lease that outlived the gateway. Still waiting, the key keeps
its place in line; holding (the permit was granted, its answer lost with
the gateway), the permit is the one the call asked again is answered with:
never a second one, never one lost. A key that is gone (that acquire timed
out, or its permit was released by another thread of the session, as any
release of the session's may) is put anew, at the end of the line. ``n`` never shrinks
and a contender key only goes away, so a holder stays a holder. When a
session ends its contender keys vanish with its lease: its permits go back
and the next waiters hold them. As the memory store: any client may
release; the releaser's own permits go first, then other sessions' (their
keys are deleted), and the rest raises ``n``. ``bounded``: a release past
the initial value is a ``ValueError``.

An acquire answered but given up by its caller (an interrupt) is undone by
``PermitReturn``: the very permit it was answered with goes back (its
contender key, found by the token, deleted with a compare on it), a delete
that is safe to make again until etcd answers. A release, by contrast,
picks permits and raises ``n`` at the time it runs: made again after an
attempt applied unanswered, it would give back a second permit.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from managerd.store.etcd.client import EtcdClient, cleanup, settled
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    EtcdUnavailable,
    EventType,
    KeyValue,
    Op,
    Put,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession
from managerd.store.etcd.watching import changed, deadline_of
from managerd_client.errors import LockLost


class EtcdEvent:
    """The event ``name``."""

    def __init__(self, client: EtcdClient, name: str, *, root: bytes = DEFAULT_ROOT) -> None:
        self.client = client
        self.key = root + b"ev/" + name_key(name)

    async def is_set(self) -> bool:
        return await self.client.get(self.key) is not None

    async def set(self) -> None:
        await self.client.txn(
            [Compare(self.key, Target.CREATE, "==", 0)], [Put(self.key, b"1")], idempotent=True
        )

    async def clear(self) -> None:
        await self.client.txn(
            [Compare(self.key, Target.CREATE, "!=", 0)], [Delete(self.key)], idempotent=True
        )

    async def wait(self, timeout_s: float | None = None) -> bool:
        """True once set (at once if it is), False after ``timeout_s``."""
        if timeout_s is not None and timeout_s <= 0:
            return await self.is_set()
        deadline = deadline_of(timeout_s)
        try:
            while True:
                read = await self.client.range(self.key)
                if read.kvs:
                    return True
                put = await changed(
                    self.client,
                    self.key,
                    after_revision=read.revision,
                    kind=EventType.PUT,
                    deadline=deadline,
                )
                if put:
                    return True
        except TimeoutError:
            return False


@dataclass(frozen=True, slots=True)
class _State:
    """A semaphore as read at one revision."""

    revision: int
    permits: int
    permits_revision: int
    contenders: list[KeyValue]  # by create_revision

    @property
    def holders(self) -> list[KeyValue]:
        return self.contenders[: self.permits]

    @property
    def value(self) -> int:
        return self.permits - len(self.holders)


class EtcdSemaphore:
    """The semaphore ``name`` (``create`` it once with its initial value)."""

    def __init__(
        self, client: EtcdClient, name: str, *, bounded: bool = False, root: bytes = DEFAULT_ROOT
    ) -> None:
        self.client = client
        self.name = name
        self.bounded = bounded
        self.base = root + b"sem/" + name_key(name) + b"/"
        self.permits_key = self.base + b"n"
        self.contenders = self.base + b"c/"

    async def create(self, value: int) -> None:
        """Set the initial value unless the semaphore exists."""
        await self.client.txn(
            [Compare(self.permits_key, Target.CREATE, "==", 0)],
            [Put(self.permits_key, b"%d" % value)],
            idempotent=True,
        )

    async def _read(self) -> _State:
        read = await self.client.range(self.base, prefix_end(self.base))
        permits, permits_revision = 0, 0
        contenders = []
        for kv in read.kvs:
            if kv.key == self.permits_key:
                permits, permits_revision = int(kv.value), kv.mod_revision
            elif kv.key.startswith(self.contenders):
                contenders.append(kv)
        contenders.sort(key=lambda kv: kv.create_revision)
        return _State(read.revision, permits, permits_revision, contenders)

    def _session_prefix(self, session: EtcdSession) -> bytes:
        return self.contenders + f"{session.lease_id:016x}/".encode()

    def contender_key(self, session: EtcdSession, request: int = 0) -> bytes:
        """The contender key of ``session``'s acquire made as client request ``request``
        (0: none known, a random key)."""
        tail = b"r%016x" % request if request else secrets.token_hex(8).encode()
        return self._session_prefix(session) + tail

    async def acquire(
        self,
        session: EtcdSession,
        *,
        blocking: bool = True,
        timeout_s: float | None = None,
        request: int = 0,
    ) -> int | None:
        """A permit's fencing token, or None if none came in time (or at once).

        ``request``: the client's id of the request this acquire is (for one asked
        again, the request it first was): its key, if that request put one that is
        still there, keeps its place in line, or holds its permit already.
        """
        key = self.contender_key(session, request)

        async def withdrawn(_: object) -> None:
            await self._withdraw_if_ours(session, key)

        # Cancelled meanwhile, the put is waited for before its key is withdrawn: a key
        # that landed after the withdrawal would take the next permit, for nobody.
        done = await settled(
            self.client.txn(
                [Compare(key, Target.CREATE, "==", 0)],
                [Put(key, session.sid.encode(), lease=session.lease_id)],
                idempotent=True,
                own_revision=True,  # the fencing token and place in line: no other's
            ),
            withdrawn,
        )
        deadline = deadline_of(timeout_s if blocking else None)
        try:
            token = done.revision
            if not done.succeeded:  # our own put (retried, or by the gateway that first ran it)
                kv = await self.client.get(key)
                if kv is None:
                    raise LockLost(f"the session's lease ended while acquiring {self.name}")
                token = kv.create_revision
            while True:
                state = await self._read()
                mine = [i for i, kv in enumerate(state.contenders) if kv.key == key]
                if not mine:
                    raise LockLost(f"the session's lease ended while acquiring {self.name}")
                if mine[0] < state.permits:
                    return token
                if not blocking:
                    break
                await changed(
                    self.client,
                    self.base,
                    prefix_end(self.base),
                    after_revision=state.revision,
                    deadline=deadline,
                )
        except TimeoutError:
            pass
        except BaseException:
            await cleanup(withdrawn(None))
            raise
        await self._withdraw(key)
        return None

    async def _withdraw_if_ours(self, session: EtcdSession, key: bytes) -> None:
        """A cancelled acquire's key goes, unless another gateway took the session over
        (this one lets it go): there, the acquire asked again keeps that key."""
        if await session.owned():
            await self._withdraw(key)

    async def _withdraw(self, key: bytes) -> None:
        await self.client.txn(
            [Compare(key, Target.CREATE, "!=", 0)], [Delete(key)], idempotent=True
        )

    async def release(self, session: EtcdSession | None, n: int = 1) -> None:
        """Give back ``n`` permits: ``session``'s own first, then others'; the rest adds."""
        if n < 1:
            raise ValueError("n must be one or more")
        while True:
            state = await self._read()
            if self.bounded and state.value + n > self._initial(state):
                raise ValueError("Semaphore released too many times")
            freed = self._released(state, session)[:n]
            extra = n - len(freed)
            compares = [Compare(self.permits_key, Target.MOD, "==", state.permits_revision)]
            compares += [Compare(kv.key, Target.CREATE, "==", kv.create_revision) for kv in freed]
            ops: list[Op] = [Delete(kv.key) for kv in freed]
            if extra:
                ops.append(Put(self.permits_key, b"%d" % (state.permits + extra)))
            if (await self.client.txn(compares, ops)).succeeded:
                return

    def _released(self, state: _State, session: EtcdSession | None) -> list[KeyValue]:
        """The permits a release takes, in turn: ``session``'s own, then each other
        session's, sessions in the order they came to hold (as the memory store
        counts them); a session's newest permit first, so that its oldest one marks
        since when it holds (until it holds none)."""
        groups: dict[bytes, list[KeyValue]] = {}
        for kv in state.holders:  # oldest first
            lease = kv.key[len(self.contenders) :].split(b"/", 1)[0]
            groups.setdefault(lease, []).append(kv)
        own = b"%016x" % session.lease_id if session is not None else None
        ordered = list(reversed(groups.pop(own, []))) if own is not None else []
        for kvs in groups.values():
            ordered += reversed(kvs)
        return ordered

    def _initial(self, state: _State) -> int:
        # A BoundedSemaphore's n never grows (a release past it is refused).
        return state.permits

    async def value(self) -> int:
        return (await self._read()).value

    async def holdings(self) -> tuple[int, list[tuple[str, int]]]:
        """``(value, [(session id, permits held)...])`` as read now."""
        state = await self._read()
        held: dict[str, int] = {}
        for kv in state.holders:
            sid = kv.value.decode()
            held[sid] = held.get(sid, 0) + 1
        return state.value, list(held.items())

    async def waiting(self) -> int:
        state = await self._read()
        return len(state.contenders) - len(state.holders)


class PermitReturn:
    """The undo of ``sem``'s acquire answered with ``token`` to a caller that left: the
    permit given back. Each call is one try of it, safe to make again until etcd
    answers (``client.until_answered``): never a second permit given back.

    The permit is the contender key of the session whose create_revision is
    ``token``, deleted with a compare on that revision (a try applied unanswered
    and made again deletes nothing more). If that key is gone before a try of
    ours could have deleted it (the session released it meanwhile: a release
    takes the releaser's newest permit first, or another client's release took
    it), another permit the session holds goes back instead, its newest, if it
    holds one: as in the memory store, whose undo gives one permit back if the
    session still holds any (it counts a session's permits, it does not name
    them), so that the two stores leave the same count and no permit is held
    for nobody. A key found gone after a try whose answer was lost is taken as
    given back by that try (never another: one of the session's threads holds
    it).
    """

    def __init__(self, sem: EtcdSemaphore, token: int) -> None:
        self.sem = sem
        self.token = token
        #: The key and create_revision of the permit this undo gives back, once chosen.
        self._target: tuple[bytes, int] | None = None
        #: Whether a try on ``_target`` may have been applied (its answer was lost).
        self._maybe_applied = False

    async def __call__(self, session: EtcdSession) -> None:
        while True:
            if self._target is None:
                self._target = await self._choose(session)
                self._maybe_applied = False
                if self._target is None:
                    return  # the session holds no permit any more: nothing to give back
            key, revision = self._target
            try:
                done = await self.sem.client.txn(
                    [Compare(key, Target.CREATE, "==", revision)], [Delete(key)], idempotent=True
                )
            except EtcdUnavailable:
                self._maybe_applied = True
                raise
            if done.succeeded or done.repeated or self._maybe_applied:
                return
            self._target = None  # gone before any try of ours reached it: another one

    async def _choose(self, session: EtcdSession) -> tuple[bytes, int] | None:
        """The session's permit of ``token``, else its newest held, else None."""
        state = await self.sem._read()
        own = self.sem._session_prefix(session)
        for kv in state.contenders:
            if kv.key.startswith(own) and kv.create_revision == self.token:
                return kv.key, kv.create_revision
        held = [kv for kv in state.holders if kv.key.startswith(own)]  # oldest first
        return (held[-1].key, held[-1].create_revision) if held else None
