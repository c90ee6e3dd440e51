"""An asyncio client for the etcd v3 API: KV, Txn, leases and watches, over all endpoints.

Why this and not a ready client
-------------------------------
- python-etcd3 (0.12) does not import with current protobuf, and is synchronous.
- aetcd (1.0, Apache-2.0, asyncio) takes one ``host:port``: no failover to
  another member. Its ``Client`` is untyped, hides the response header (the
  queue's blocking get must watch from ``header.revision + 1``) and retries
  by its own rules.
- Generating stubs from etcd's ``rpc.proto`` ourselves would put code
  generated from etcd's sources (Apache-2.0) in this repository, or
  ``grpcio-tools``, a copy of the protos and the stripping of their
  gogoproto / google.api imports in every install.

So this module speaks gRPC itself (``grpcio``'s asyncio API, maintained by
the gRPC project) and takes only the **message classes** from ``aetcd.rpc``,
the package's public module of etcd's generated protobuf messages. Nothing
else of aetcd is used; the messages are wire-compatible with every etcd 3.x
server, so another source of them would change only the import below. What
callers see is typed here (``KeyValue``, ``Event``, ``TxnResult``...):
protobuf objects stay inside this module.

Failover, deadlines, retries
----------------------------
- One gRPC channel over **all** endpoints (``ipv4:a:p,b:p,...``, names
  resolved once at start) with ``round_robin``: a dead member's subchannel
  goes to TRANSIENT_FAILURE and calls go to the others; ``wait_for_ready``
  makes a call wait for a live member (a call that was never sent is always
  safe) rather than fail at once.
- Every RPC attempt has a deadline (``rpc_timeout_s``, 2 s); a retried call
  also stops at ``retry_budget_s`` (long enough for a few elections, ~2 s
  each here). The attempt deadline is what bounds a failover: a write a
  follower forwarded to a leader that then died is never answered, so it
  waits out its deadline before the retry. With 5 s, writes stalled 5.0 s
  after a leader kill; with 2 s, p50 1.8 s and max 2.6 s over 10 kills
  (``benchmarks/etcd_store.py``).
- Retries only where repeating cannot change the outcome: Range, lease
  keep-alive/TTL/revoke, LeaseGrant (with an ID chosen here, so a repeat
  finds its own lease), and a Txn the caller marks ``idempotent`` (e.g.
  guarded by ``create_revision == 0`` on a key only it uses, or a compare
  on a revision it read). Put, DeleteRange and other Txns are retried only
  on ``etcdserver: no leader``, which etcd returns before proposing; any
  other failure is ``EtcdUnavailable``, whose write may or may not have
  been applied.
- Watches carry ``hasleader`` (a member cut off from the leader cancels the
  stream instead of going quiet), resume after a broken stream from the
  revision after the last event delivered (no event missed or repeated),
  and raise ``Compacted`` when that revision is gone: the caller re-reads
  its state and watches from the new revision.

Group commit
------------
``txn`` and ``range`` go through ``GroupCommit`` (``groupcommit.py``): the
calls of concurrent callers leave as one Txn, each caller's Txn nested in
it (a Range as one operation of it), so each keeps its own outcome; a call
alone leaves as itself. ``put`` and ``delete`` are sent as they are.

TLS
---
``credentials=tls_credentials(ca, cert, key)`` (``--store etcds://...``,
``store_tls_*``): the members' certificates are checked against the CA and
the first endpoint's host name; a client certificate answers etcd's
``--client-cert-auth``.

Writes made for a session
-------------------------
A write that reaches etcd late (held in a cut network, then delivered after
healing) must not land once its session is over: by then another client
may hold the lock that write was made under. While ``SESSION_GUARD`` names
a session's key (the store sets it around a session's call), every Txn,
put and delete that writes is sent as a Txn nested in one that compares
that key's existence: once the session's lease ended (its key with it),
nothing is written and the call raises ``SessionGone``. Reads are not
guarded, and work the store does for nobody's call runs without a guard
(``unguarded``).

A call cancelled while its write is in flight (the client gave it up)
cannot take the write back: it may still land, after anything the cancel
did at once. A write that a cancel must undo (a lock contender's key) goes
through ``settled``: the cancel waits for its answer, then undoes it.

Not here yet: user/password authentication, one shared keep-alive stream for many leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import random
import secrets
import socket
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from aetcd import rpc

from managerd.store.etcd.groupcommit import (
    DEFAULT_MAX_IN_FLIGHT,
    Footprint,
    GroupCommit,
    Pending,
    footprint,
    width,
)
from managerd.store.etcd.kv import (
    Compacted,
    Compare,
    Delete,
    DeleteResult,
    EtcdError,
    EtcdUnavailable,
    Event,
    EventType,
    Get,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    PutResult,
    RangeResult,
    RequestTooLarge,
    SessionGone,
    Target,
    TxnResult,
)
from managerd.store.etcd.telemetry import EtcdMetrics

T = TypeVar("T")

DEFAULT_RPC_TIMEOUT_S = 2.0
DEFAULT_RETRY_BUDGET_S = 15.0
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 0.5
_MAX_MESSAGE_BYTES = 2**31 - 1  # as etcd's own client: etcd bounds requests itself
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.lb_policy_name", "round_robin"),
    # A dead member is found without waiting for TCP; etcd refuses pings more
    # often than every 5 s (--grpc-keepalive-min-time) or without a stream.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A member that stops answering (frozen, partitioned) under an open watch: a ping
    # unanswered for 5 s closes the connection (gRPC waits 60 s by default: a blocked
    # get's wake-up waited that long), and pings go on every 10 s while only a watch
    # is open (by default gRPC stops after 2 pings without data, then waits minutes).
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_time_between_pings_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
]
_REQUIRE_LEADER = (("hasleader", "true"),)


_RESULTS = {"==": 0, ">": 1, "<": 2, "!=": 3}
_TARGET_FIELD = {
    Target.VERSION: "version",
    Target.CREATE: "create_revision",
    Target.MOD: "mod_revision",
    Target.VALUE: "value",
    Target.LEASE: "lease",
}


def channel_target(endpoints: Sequence[str]) -> str:
    """A gRPC target naming every endpoint (``ipv4:a:p,b:p``); names are resolved now."""
    v4: list[str] = []
    v6: list[str] = []
    for endpoint in endpoints:
        host, sep, port = endpoint.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not HOST:PORT")
        host = host.strip("[]")
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        family, *_, sockaddr = min(infos, key=lambda i: i[0] != socket.AF_INET)
        if family == socket.AF_INET:
            v4.append(f"{sockaddr[0]}:{port}")
        else:
            v6.append(f"[{sockaddr[0]}]:{port}")
    if v4 and v6:
        raise ValueError(f"etcd endpoints mix IPv4 and IPv6: {list(endpoints)}")
    if not v4 and not v6:
        raise ValueError("no etcd endpoint given")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def tls_credentials(
    ca: bytes | None = None, cert: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS to etcd: members' certificates checked against ``ca`` (PEM; None: the system's
    CAs), and ``cert``/``key`` (PEM) sent when etcd asks for a client certificate
    (``--client-cert-auth``)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _kv(m: Any) -> KeyValue:
    return KeyValue(
        bytes(m.key), bytes(m.value), m.create_revision, m.mod_revision, m.version, m.lease
    )


def _range_result(m: Any) -> RangeResult:
    return RangeResult(m.header.revision, [_kv(kv) for kv in m.kvs], m.more, m.count)


def _put_result(m: Any) -> PutResult:
    return PutResult(m.header.revision, _kv(m.prev_kv) if m.HasField("prev_kv") else None)


def _delete_result(m: Any) -> DeleteResult:
    return DeleteResult(m.header.revision, m.deleted, [_kv(kv) for kv in m.prev_kvs])


#: The key of the session a write is made for (None: the store's own work).
SESSION_GUARD: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "SESSION_GUARD", default=None
)


def unguarded(
    coro: Any, *, name: str | None = None, loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Task[Any]:
    """A task for ``coro`` whose writes are made for no session (shared work started
    from inside a session's call: a queue's line, a background confirm)."""
    context = contextvars.copy_context()
    context.run(SESSION_GUARD.set, None)
    loop = loop or asyncio.get_running_loop()
    return loop.create_task(coro, name=name, context=context)


def cleanup(coro: Any) -> asyncio.Future[Any]:
    """``coro`` shielded from the caller's cancel, its writes made for no session: what a
    cancelled call leaves in order (its session may be ending, or over)."""
    return asyncio.shield(unguarded(coro))


async def settled(
    write: Coroutine[Any, Any, T], undo: Callable[[T | None], Coroutine[Any, Any, Any]]
) -> T:
    """The answer of ``write``, a write that a cancel must not cut short: a cancelled
    caller waits until the write is answered (or failed), then for ``undo`` of it
    (as ``cleanup``: shielded, for no session), and only then is cancelled.

    Cutting the write short would not keep it from etcd: with group commit it
    leaves with its batch all the same, and a gRPC call cancelled once sent may
    still be applied. An undo made at once, before the write lands, finds nothing
    to undo, and the write then lands for nobody (a lock contender's or a
    semaphore's key on the session's lease: it would take the next lock or permit,
    and hold it until the session ends). ``undo`` is given the write's answer, or
    None if it failed (its outcome unknown: the undo looks for itself).
    """
    task = asyncio.ensure_future(write)  # in a copy of this context: the session guard too
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await cleanup(_undo_after(task, undo))
        raise
    except EtcdUnavailable:  # it may have landed: undone too, now or once etcd answers
        try:
            await cleanup(undo(None))
        except EtcdUnavailable:
            # Still unreachable. Left alone, a write that did land would hold its
            # lock or permit for nobody until the session ends, and a live
            # client's session does not end: asked again until etcd answers.
            _undo_later(undo)
        except EtcdError:
            pass
        raise


#: Undos waiting for etcd to answer (kept here: a task nobody refers to can vanish).
_UNDOS_LATER: set[asyncio.Task[None]] = set()
#: The first and the longest pause between two tries of an undo (seconds).
UNDO_RETRY_FIRST_S = 0.2
UNDO_RETRY_MAX_S = 5.0


#: The pauses of undos between two tries (``until_answered``): ``try_undos_now`` ends them.
_UNDO_PAUSES: set[asyncio.Future[None]] = set()


def _undo_later(undo: Callable[[Any], Coroutine[Any, Any, Any]]) -> None:
    task = unguarded(until_answered(lambda: undo(None), first_now=False), name="managerd-undo")
    _UNDOS_LATER.add(task)
    task.add_done_callback(_UNDOS_LATER.discard)


def undos_later(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
    """The undos of ``_undo_later`` on ``loop`` still waiting for etcd to answer."""
    return [task for task in _UNDOS_LATER if task.get_loop() is loop and not task.done()]


def try_undos_now(loop: asyncio.AbstractEventLoop) -> None:
    """Every undo on ``loop`` pausing between two tries (``until_answered``) tries again
    now: a gateway that stops gives them a last chance before it cancels them."""
    for pause in list(_UNDO_PAUSES):
        if pause.get_loop() is loop:
            _end_pause(pause)


def _end_pause(pause: asyncio.Future[None]) -> None:
    if not pause.done():
        pause.set_result(None)


async def _pause(pause_s: float) -> None:
    """``asyncio.sleep(pause_s)``, ended early by ``try_undos_now``."""
    loop = asyncio.get_running_loop()
    pause: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(pause_s, _end_pause, pause)
    _UNDO_PAUSES.add(pause)
    try:
        await pause
    finally:
        timer.cancel()
        _UNDO_PAUSES.discard(pause)


async def until_answered(
    make: Callable[[], Coroutine[Any, Any, Any]], *, first_now: bool = True
) -> None:
    """``make()`` awaited, and made again after a pause (longer each time) while etcd
    cannot answer it: for an undo that must not be dropped by an outage.

    Only for work that is safe to repeat (its writes compare what they change: a
    release by its token, a withdrawal by its attempt's mark), since a try that
    failed may have been applied; once the session's lease is gone, so is what
    such work looks for. Any other etcd error is an answer: the work is over.
    """
    pause = UNDO_RETRY_FIRST_S
    if not first_now:
        await _pause(pause)
    while True:
        try:
            await make()
            return
        except EtcdUnavailable:
            await _pause(pause)
            pause = min(pause * 2, UNDO_RETRY_MAX_S)
        except EtcdError:
            return


async def _undo_after(
    task: asyncio.Future[T], undo: Callable[[T | None], Coroutine[Any, Any, Any]]
) -> None:
    try:
        answer: T | None = await task
    except Exception:
        answer = None
    await undo(answer)


def _compare(c: Compare) -> Any:
    m = rpc.Compare(key=c.key, target=c.target.value, result=_RESULTS[c.op], range_end=c.range_end)
    setattr(m, _TARGET_FIELD[c.target], c.value)
    return m


def _request_op(op: Op) -> Any:
    if isinstance(op, Get):
        return rpc.RequestOp(
            request_range=rpc.RangeRequest(
                key=op.key,
                range_end=op.range_end,
                limit=op.limit,
                keys_only=op.keys_only,
                count_only=op.count_only,
            )
        )
    if isinstance(op, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(
                key=op.key, value=op.value, lease=op.lease, prev_kv=op.prev_kv
            )
        )
    return rpc.RequestOp(
        request_delete_range=rpc.DeleteRangeRequest(
            key=op.key, range_end=op.range_end, prev_kv=op.prev_kv
        )
    )


def _response_op(m: Any, revision: int) -> RangeResult | PutResult | DeleteResult | TxnResult:
    kind = m.WhichOneof("response")
    if kind == "response_range":
        return _range_result(m.response_range)
    if kind == "response_put":
        return _put_result(m.response_put)
    if kind == "response_delete_range":
        return _delete_result(m.response_delete_range)
    if kind == "response_txn":  # a guarded Txn's own (its header is the outer one's)
        return _txn_result(m.response_txn, revision)
    raise EtcdError(f"unexpected Txn response {kind!r}")


def _txn_result(m: Any, revision: int, repeated: bool = False) -> TxnResult:
    responses = [_response_op(r, revision) for r in m.responses]
    return TxnResult(revision, m.succeeded, responses, repeated)


def _nested(request: Any) -> Any:
    """A call's Range or Txn as one operation of a shared Txn."""
    if isinstance(request, rpc.RangeRequest):
        return rpc.RequestOp(request_range=request)
    return rpc.RequestOp(request_txn=request)


def _refused(exc: grpc.aio.AioRpcError) -> bool:
    """Refused before it was proposed: never applied."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "no leader" in (exc.details() or "")


def _retryable(exc: grpc.aio.AioRpcError, idempotent: bool) -> bool:
    if _refused(exc):
        return True
    return idempotent and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _translate(exc: grpc.aio.AioRpcError) -> EtcdError:
    details = exc.details() or ""
    code = exc.code()
    if "lease not found" in details:
        return LeaseNotFound(details)
    if "request is too large" in details or code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RequestTooLarge(
            f"the request is larger than etcd accepts ({details}; etcd's --max-request-bytes, "
            "1.5 MiB by default): keep large values out of the store, or raise that limit"
        )
    if "compacted" in details:
        return Compacted(0)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EtcdUnavailable(f"{code.name}: {details}")
    return EtcdError(f"{code.name}: {details}")


class EtcdClient:
    """A channel over every endpoint; create it inside the event loop that uses it."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        credentials: grpc.ChannelCredentials | None = None,
        group_commit: bool = True,
        max_txn_batches_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_budget_s = retry_budget_s
        target = channel_target(endpoints)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            # The target lists addresses; a member's certificate is checked against the
            # host name of the first endpoint as given (one name for every member: a
            # shared name or IP in every member's subjectAltName).
            server_name = endpoints[0].strip().rpartition(":")[0].strip("[]")
            options = [*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name)]
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)

        def unary(path: str, request: Any, response: Any) -> Any:
            return self._channel.unary_unary(
                path,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

        self._range = unary("/etcdserverpb.KV/Range", rpc.RangeRequest, rpc.RangeResponse)
        self._put = unary("/etcdserverpb.KV/Put", rpc.PutRequest, rpc.PutResponse)
        self._delete = unary(
            "/etcdserverpb.KV/DeleteRange", rpc.DeleteRangeRequest, rpc.DeleteRangeResponse
        )
        self._txn = unary("/etcdserverpb.KV/Txn", rpc.TxnRequest, rpc.TxnResponse)
        self._grant = unary(
            "/etcdserverpb.Lease/LeaseGrant", rpc.LeaseGrantRequest, rpc.LeaseGrantResponse
        )
        self._revoke = unary(
            "/etcdserverpb.Lease/LeaseRevoke", rpc.LeaseRevokeRequest, rpc.LeaseRevokeResponse
        )
        self._ttl = unary(
            "/etcdserverpb.Lease/LeaseTimeToLive",
            rpc.LeaseTimeToLiveRequest,
            rpc.LeaseTimeToLiveResponse,
        )
        self._keepalive = self._channel.stream_stream(
            "/etcdserverpb.Lease/LeaseKeepAlive",
            request_serializer=rpc.LeaseKeepAliveRequest.SerializeToString,
            response_deserializer=rpc.LeaseKeepAliveResponse.FromString,
        )
        self._watch = self._channel.stream_stream(
            "/etcdserverpb.Watch/Watch",
            request_serializer=rpc.WatchRequest.SerializeToString,
            response_deserializer=rpc.WatchResponse.FromString,
        )
        self.metrics = EtcdMetrics()
        self._rpc_names = {
            id(self._range): "range",
            id(self._put): "put",
            id(self._delete): "delete_range",
            id(self._txn): "txn",
            id(self._grant): "lease_grant",
            id(self._revoke): "lease_revoke",
            id(self._ttl): "lease_time_to_live",
        }
        #: Txns of concurrent calls, sent together (``groupcommit.py``); None: one by one.
        self.group: GroupCommit | None = (
            GroupCommit(self._send_batch, max_in_flight=max_txn_batches_in_flight)
            if group_commit
            else None
        )
        if self.group is not None:
            self.group.on_batch = self.metrics.batch_sizes.observe

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, *, idempotent: bool) -> Any:
        return (await self._attempts(method, request, idempotent=idempotent))[0]

    async def _attempts(self, method: Any, request: Any, *, idempotent: bool) -> tuple[Any, bool]:
        """The answer, and whether the request was sent again after an attempt whose
        outcome is unknown (``TxnResult.repeated``)."""
        loop = asyncio.get_running_loop()
        repeated = False
        give_up = loop.time() + self.retry_budget_s
        backoff_s = _BACKOFF_MIN_S
        rpc_name = self._rpc_names[id(method)]
        while True:
            timeout_s = max(0.001, min(self.rpc_timeout_s, give_up - loop.time()))
            sent = loop.time()
            try:
                return await method(request, timeout=timeout_s, wait_for_ready=True), repeated
            except grpc.aio.AioRpcError as exc:
                if not _retryable(exc, idempotent) or loop.time() + backoff_s >= give_up:
                    raise _translate(exc) from exc
                repeated = repeated or not _refused(exc)
            finally:
                self.metrics.observe(rpc_name, loop.time() - sent)
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(2 * backoff_s, _BACKOFF_MAX_S)

    # KV

    async def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        max_create_revision: int = 0,
        newest_first: bool = False,
        oldest_first: bool = False,
    ) -> RangeResult:
        """Linearizable read of ``[key, range_end)`` (just ``key`` without range_end).

        In key order, or by create_revision, ``newest_first`` or ``oldest_first``
        (etcd sorts the whole range for that: only for small ranges, such as a
        lock's contenders or a dict's entries).
        """
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end,
            limit=limit,
            revision=revision,
            keys_only=keys_only,
            count_only=count_only,
            max_create_revision=max_create_revision,
        )
        if newest_first or oldest_first:
            request.sort_target = rpc.RangeRequest.CREATE
            request.sort_order = (
                rpc.RangeRequest.DESCEND if newest_first else rpc.RangeRequest.ASCEND
            )
        if self.group is None or revision:
            return _range_result(await self._call(self._range, request, idempotent=True))
        # A read joins the Txns in flight (a Range in the shared Txn reads at its revision).
        read = Footprint(((key, range_end),), ())
        return cast(
            RangeResult, await self.group.submit(request, read, 0, request.ByteSize(), True)
        )

    async def get(self, key: bytes) -> KeyValue | None:
        kvs = (await self.range(key)).kvs
        return kvs[0] if kvs else None

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> PutResult:
        """Not retried once sent (see the module docstring): guard with a Txn to retry."""
        if SESSION_GUARD.get() is not None:
            return cast(PutResult, (await self.txn([], [Put(key, value, lease)])).responses[0])
        request = rpc.PutRequest(key=key, value=value, lease=lease)
        return _put_result(await self._call(self._put, request, idempotent=False))

    async def delete(self, key: bytes, range_end: bytes = b"") -> DeleteResult:
        if SESSION_GUARD.get() is not None:
            done = await self.txn([], [Delete(key, range_end)])
            return cast(DeleteResult, done.responses[0])
        request = rpc.DeleteRangeRequest(key=key, range_end=range_end)
        return _delete_result(await self._call(self._delete, request, idempotent=False))

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        idempotent: bool = False,
        own_revision: bool = False,
    ) -> TxnResult:
        """If every compare holds, the success ops, else the failure ops, atomically.

        ``idempotent=True`` retries an ambiguous failure: only for a Txn whose
        repeat after it was applied fails its compares (and whose caller can
        read that failure as "already done"). ``own_revision=True``: its writes
        share their revision with no other call's (group commit leaves it
        alone): when that revision is a fencing token or a place in a line.
        """
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in compare],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure],
        )
        fp = footprint(compare, success, failure)
        guard = SESSION_GUARD.get()
        if guard is not None and fp.writes:
            request = rpc.TxnRequest(
                compare=[_compare(Compare(guard, Target.CREATE, ">", 0))],
                success=[rpc.RequestOp(request_txn=request)],
            )
            fp = Footprint((*fp.reads, (guard, b"")), fp.writes)
        if self.group is None:
            m, repeated = await self._attempts(self._txn, request, idempotent=idempotent)
            result = _txn_result(m, m.header.revision, repeated)
        else:
            result = cast(
                TxnResult,
                await self.group.submit(
                    request,
                    fp,
                    width(compare, success, failure),
                    request.ByteSize(),
                    idempotent,
                    own_revision=own_revision,
                ),
            )
        if guard is None or not fp.writes:
            return result
        if not result.succeeded:
            raise SessionGone(f"the session's key {guard!r} is gone: its lease ended")
        inner = result.responses[0]
        assert isinstance(inner, TxnResult)
        return dataclasses.replace(inner, revision=result.revision, repeated=result.repeated)

    async def _send_batch(self, batch: list[Pending]) -> None:
        """Send the Txns of ``batch`` (see ``groupcommit.py``) and settle each call."""
        if len(batch) == 1:
            await self._send_alone(batch[0])
            return
        shared = rpc.TxnRequest(success=[_nested(p.request) for p in batch])
        try:
            m, repeated = await self._attempts(
                self._txn, shared, idempotent=all(p.idempotent for p in batch)
            )
        except EtcdUnavailable as exc:  # maybe applied: only idempotent ones may go again
            for p in batch:
                if not p.idempotent and not p.future.done():
                    p.future.set_exception(EtcdUnavailable(str(exc)))
            await asyncio.gather(
                *(self._send_alone(p, repeated=True) for p in batch if p.idempotent)
            )
            return
        except EtcdError:  # refused, never applied: each alone, to say which one
            await asyncio.gather(*(self._send_alone(p) for p in batch))
            return
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:  # a bug: nobody is left waiting
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            raise
        for p, r in zip(batch, m.responses, strict=True):
            if p.future.done():
                continue
            if r.HasField("response_txn"):
                # A nested Txn's header is empty: its revision is the shared Txn's.
                p.future.set_result(_txn_result(r.response_txn, m.header.revision, repeated))
            else:
                p.future.set_result(_range_result(r.response_range))

    async def _send_alone(self, p: Pending, *, repeated: bool = False) -> None:
        if p.future.done():
            return
        read = isinstance(p.request, rpc.RangeRequest)
        try:
            m, again = await self._attempts(
                self._range if read else self._txn, p.request, idempotent=p.idempotent
            )
        except Exception as exc:
            if not p.future.done():
                p.future.set_exception(exc)
            return
        if not p.future.done():
            p.future.set_result(
                _range_result(m) if read else _txn_result(m, m.header.revision, repeated or again)
            )

    # Leases

    async def lease_grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its ID is chosen here so a retry is safe."""
        lease_id = secrets.randbits(62) + 1
        request = rpc.LeaseGrantRequest(TTL=ttl_s, ID=lease_id)
        while True:
            try:
                m = await self._call(self._grant, request, idempotent=True)
            except EtcdError as exc:
                if "lease already exists" not in str(exc):
                    raise
                # Our own earlier attempt if it lives with our TTL (an ID clash of
                # 62 random bits is not worth a branch of its own: it fails below).
                if await self.lease_time_to_live(lease_id) > 0:
                    return lease_id
                raise
            if m.error:
                raise EtcdError(m.error)
            return int(m.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke (its keys are deleted); a lease already gone is not an error."""
        try:
            await self._call(self._revoke, rpc.LeaseRevokeRequest(ID=lease_id), idempotent=True)
        except LeaseNotFound:
            pass

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Seconds left; -1 once the lease expired or was revoked."""
        m = await self._call(self._ttl, rpc.LeaseTimeToLiveRequest(ID=lease_id), idempotent=True)
        return int(m.TTL)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew once; the new TTL in seconds. ``LeaseNotFound`` if it already expired."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_budget_s
        backoff_s = _BACKOFF_MIN_S
        while True:
            timeout_s = max(0.001, min(self.rpc_timeout_s, give_up - loop.time()))
            call = self._keepalive(timeout=timeout_s, wait_for_ready=True)
            sent = loop.time()
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                m: Any = await call.read()
                if m is grpc.aio.EOF:
                    self.metrics.keepalive_failures += 1
                    raise EtcdUnavailable("keep-alive stream closed without an answer")
                if m.TTL <= 0:
                    self.metrics.keepalive_failures += 1
                    raise LeaseNotFound(f"lease {lease_id:x} expired")
                return int(m.TTL)
            except grpc.aio.AioRpcError as exc:
                if not _retryable(exc, True) or loop.time() + backoff_s >= give_up:
                    self.metrics.keepalive_failures += 1
                    raise _translate(exc) from exc
            finally:
                call.cancel()
                self.metrics.observe("lease_keepalive", loop.time() - sent)
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(2 * backoff_s, _BACKOFF_MAX_S)

    # Watches

    async def watch(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
        on_created: Callable[[int], None] | None = None,
    ) -> AsyncGenerator[list[Event], None]:
        """Batches of events on ``[key, range_end)`` from ``start_revision`` (0: from now).

        ``on_created`` is told the store's revision when the watch was created
        (each time the stream is opened): a watch from past that revision
        missed nothing and sees a later change as it is made.

        Runs until the caller stops iterating (close it with
        ``contextlib.aclosing``). A broken stream is reopened on another member
        from the revision after the last event delivered; ``Compacted`` if that
        revision is gone.
        """
        self.metrics.watches_open += 1
        try:
            async with contextlib.aclosing(
                self._watch_events(key, range_end, start_revision, prev_kv, on_created)
            ) as batches:
                async for events in batches:
                    yield events
        finally:
            self.metrics.watches_open -= 1

    async def _watch_events(
        self,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        prev_kv: bool,
        on_created: Callable[[int], None] | None,
    ) -> AsyncGenerator[list[Event], None]:
        next_revision = start_revision
        backoff_s = _BACKOFF_MIN_S
        while True:
            call = self._watch(metadata=_REQUIRE_LEADER, wait_for_ready=True)
            try:
                create = rpc.WatchCreateRequest(
                    key=key,
                    range_end=range_end,
                    start_revision=next_revision,
                    prev_kv=prev_kv,
                    progress_notify=True,
                )
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    m: Any = await call.read()
                    if m is grpc.aio.EOF:
                        break
                    if m.compact_revision:
                        raise Compacted(m.compact_revision)
                    if m.canceled:
                        if "no leader" not in m.cancel_reason:
                            raise EtcdError(f"watch canceled: {m.cancel_reason}")
                        break  # this member is cut off from the leader: reopen elsewhere
                    backoff_s = _BACKOFF_MIN_S
                    if m.created:
                        if next_revision == 0:
                            next_revision = m.header.revision + 1
                        if on_created is not None:
                            on_created(m.header.revision)
                        continue
                    if not m.events:
                        # Progress notice: later events are above header.revision.
                        next_revision = max(next_revision, m.header.revision + 1)
                        continue
                    events = [
                        Event(
                            EventType(e.type),
                            _kv(e.kv),
                            _kv(e.prev_kv) if e.HasField("prev_kv") else None,
                        )
                        for e in m.events
                    ]
                    next_revision = events[-1].kv.mod_revision + 1
                    yield events
            except grpc.aio.AioRpcError as exc:
                if not _retryable(exc, True):
                    raise _translate(exc) from exc
            finally:
                call.cancel()
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(2 * backoff_s, _BACKOFF_MAX_S)
