"""Prometheus metrics, read from the live state at scrape time.

Gauges (queue depths, lock holders, waiters, sessions) are not kept up to
date as things happen: a prometheus-client collector reads them from the
store's ``stats()`` snapshots (``store/stats.py``) when Prometheus scrapes,
so they are exact and cost nothing between scrapes. Counters and
histograms are plain integers and bucket arrays that the event loop bumps
(no locks, no label lookups on the hot path); the collector copies them
out. The scrape runs on prometheus-client's HTTP thread; it only reads,
and the store copies containers before iterating them (a copy of a dict
is atomic under the GIL).

A gateway on etcd (``--store etcd://...``) adds ``managerd_etcd_*``:
round trips by RPC, calls per shared Txn (group commit), watches open,
failed lease keep-alives and sessions resumed from another gateway
(``store/etcd/telemetry.py``).

Per-object labels are bounded by ``metrics_max_objects``: the first objects
by name get their own series, the rest are summed under ``_other``, so a
million queue names cannot blow up Prometheus.

The endpoint also answers Kubernetes-style probes: ``/healthz`` (the
process is alive: never depends on anything else, so that an etcd outage
does not get every gateway restarted) and ``/readyz`` (it accepts clients,
its event loop answers, and its store can serve calls: a gateway whose
etcd cluster does not answer a read within ``READY_TIMEOUT_S`` is not
ready, so a load balancer sends clients to another). It also serves the
status page: ``/`` (a self-contained page from ``managerd/web``) and
``/status.json``, the document ``managerd status --json`` prints.
``/status.json`` (and the store's readiness) is read on the event loop
(the objects are the loop's), never from this thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from importlib import resources
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer

from managerd.histogram import Histogram
from managerd.service.ops import ServerOps
from managerd.service.peers import PeerGuard
from managerd.service.requests import RequestStats, Stats
from managerd.service.sessions import SessionTable
from managerd.settings import Settings
from managerd.store.etcd.telemetry import EtcdMetrics
from managerd.store.interface import Store
from managerd.store.stats import (
    BarrierStats,
    ConditionStats,
    EventStats,
    LockStats,
    ObjectStats,
    QueueStats,
    SemaphoreStats,
)


class MetricsCore(Protocol):
    """What the metrics endpoint reads of the daemon (``server.ServerCore`` is one).

    Passed in rather than imported: the server imports this module.
    """

    @property
    def settings(self) -> Settings: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def connections(self) -> Sized: ...
    @property
    def store(self) -> Store: ...
    @property
    def sessions(self) -> SessionTable: ...
    @property
    def ops(self) -> ServerOps: ...
    @property
    def peers(self) -> PeerGuard: ...
    @property
    def requests(self) -> RequestStats: ...
    @property
    def stats(self) -> Stats: ...


log = logging.getLogger("managerd")

OTHER: Final = "_other"


def _bounded(
    objects: Iterable[ObjectStats], limit: int
) -> tuple[list[ObjectStats], list[ObjectStats]]:
    """(objects with their own series, the rest) — the first ``limit`` by name."""
    ordered = sorted(objects, key=lambda o: o.name)
    return ordered[:limit], ordered[limit:]


class Collector:
    """Reads the daemon's state into metric families at scrape time."""

    def __init__(self, core: MetricsCore) -> None:
        self.core = core

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        core = self.core
        limit = core.settings.metrics_max_objects
        store_stats = core.store.stats()
        objects = store_stats.objects
        by_type: dict[str, int] = {}
        for obj in objects:
            by_type[obj.typeid] = by_type.get(obj.typeid, 0) + 1

        count = GaugeMetricFamily("managerd_objects", "Named objects, by type.", labels=["type"])
        for typeid, n in sorted(by_type.items()):
            count.add_metric([typeid], n)
        yield count

        queues = [o for o in objects if isinstance(o, QueueStats)]
        yield from self._per_object(
            queues,
            limit,
            "queue",
            [
                ("managerd_queue_depth", "Items ready in the queue.", "gauge",
                 lambda q: q.depth),
                ("managerd_queue_reserved", "Items reserved and not yet acked.", "gauge",
                 lambda q: q.reserved),
                ("managerd_queue_waiters", "Blocked get/put/join calls.", "gauge",
                 lambda q: q.waiters),
                ("managerd_queue_puts_total", "Items put.", "counter", lambda q: q.puts_total),
                ("managerd_queue_gets_total", "Items taken (get or reserve).", "counter",
                 lambda q: q.gets_total),
            ],
        )  # fmt: skip
        locks = [o for o in objects if isinstance(o, LockStats)]
        yield from self._per_object(
            locks,
            limit,
            "lock",
            [
                ("managerd_lock_held", "1 while the lock is held.", "gauge",
                 lambda lk: 1 if lk.holder is not None else 0),
                ("managerd_lock_waiters", "Clients waiting to acquire.", "gauge",
                 lambda lk: lk.waiters),
                ("managerd_lock_acquires_total", "Successful acquisitions.", "counter",
                 lambda lk: lk.acquires_total),
            ],
        )  # fmt: skip
        yield from self._histograms(locks, limit, "lock", "managerd_lock_wait_seconds",
                                    "Time from asking to acquiring.",
                                    "wait_seconds")  # fmt: skip
        yield from self._histograms(locks, limit, "lock", "managerd_lock_hold_seconds",
                                    "Time from acquiring to releasing.",
                                    "hold_seconds")  # fmt: skip
        sems = [o for o in objects if isinstance(o, SemaphoreStats)]
        yield from self._per_object(
            sems,
            limit,
            "semaphore",
            [
                ("managerd_semaphore_available", "Permits available.", "gauge",
                 lambda s: s.value),
                ("managerd_semaphore_held", "Permits held by clients.", "gauge",
                 lambda s: s.held),
                ("managerd_semaphore_waiters", "Clients waiting for a permit.", "gauge",
                 lambda s: s.waiters),
            ],
        )  # fmt: skip
        yield from self._histograms(sems, limit, "semaphore", "managerd_semaphore_wait_seconds",
                                    "Time from asking to acquiring.",
                                    "wait_seconds")  # fmt: skip
        waitable: type[EventStats | ConditionStats | BarrierStats]
        for waitable, label in (
            (EventStats, "event"),
            (ConditionStats, "condition"),
            (BarrierStats, "barrier"),
        ):
            yield from self._per_object(
                [o for o in objects if isinstance(o, waitable)],
                limit,
                label,
                [(f"managerd_{label}_waiters", f"Clients waiting on the {label}.", "gauge",
                  lambda o: o.waiters)],
            )  # fmt: skip

        sessions = GaugeMetricFamily("managerd_sessions", "Live client sessions.", labels=["kind"])
        kinds: dict[str, int] = {"managerd": 0, "stock": 0}
        for session in list(core.sessions):
            kinds[session.kind.value] = kinds.get(session.kind.value, 0) + 1
        for kind, n in sorted(kinds.items()):
            sessions.add_metric([kind], n)
        yield sessions
        yield GaugeMetricFamily(
            "managerd_connections", "Open client connections.", value=len(core.connections)
        )
        yield GaugeMetricFamily(
            "managerd_handshakes_pending",
            "Open connections that have not authenticated yet.",
            value=core.peers.pending(),
        )
        yield GaugeMetricFamily(
            "managerd_addresses_penalized",
            "Addresses refused for failing too many handshakes.",
            value=len(core.peers.penalized()),
        )
        yield CounterMetricFamily(
            "managerd_address_penalties",
            "Times an address was penalized for failed handshakes.",
            value=core.peers.penalties,
        )

        stats = core.stats
        for name, doc, value in (
            ("managerd_auth_failures_total", "Failed authkey handshakes.", stats.auth_failures),
            ("managerd_tls_failures_total", "Failed TLS handshakes.", stats.tls_failures),
            ("managerd_sessions_expired_total", "Sessions ended by lease expiry.",
             stats.sessions_expired),
            ("managerd_sessions_resumed_total", "Sessions resumed by a reconnecting client.",
             stats.sessions_resumed),
            ("managerd_sessions_taken_over_total",
             "Sessions of another gateway resumed here (etcd store).",
             stats.sessions_taken_over),
            ("managerd_deadlocks_total", "Cycles of lock waiters found (deadlock setting).",
             store_stats.deadlocks_total),
            ("managerd_received_bytes_total", "Bytes received from clients.", stats.bytes_in),
            ("managerd_sent_bytes_total", "Bytes sent to clients.", stats.bytes_out),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=value)

        requests = core.requests
        total = CounterMetricFamily(
            "managerd_requests_total", "Requests answered, by method and outcome.",
            labels=["method", "outcome"],
        )  # fmt: skip
        for (method, outcome), n in sorted(dict(requests.counts).items()):
            total.add_metric([method, outcome], n)
        yield total
        latency = HistogramMetricFamily(
            "managerd_request_seconds", "Time from a request's arrival to its answer."
        )
        latency.add_metric([], requests.latency.buckets(), requests.latency.sum)
        yield latency
        limits = CounterMetricFamily(
            "managerd_limits_hit_total", "Requests or connections refused by a limit.",
            labels=["limit"],
        )  # fmt: skip
        hits = dict(requests.limits)
        hits.setdefault("frame_size", 0)
        hits["handshake_timeout"] = stats.handshake_timeouts
        hits["max_connections"] = stats.connections_refused
        hits["auth_penalty"] = core.peers.penalty_refusals
        hits["handshakes_per_peer"] = core.peers.pending_refusals
        for name, n in sorted(hits.items()):
            limits.add_metric([name], n)
        yield limits
        etcd = getattr(core.store, "etcd_metrics", None)
        if isinstance(etcd, EtcdMetrics):
            yield from self._etcd(etcd)

    def _etcd(self, etcd: EtcdMetrics) -> Iterator[Metric]:
        """A gateway's traffic with etcd."""
        latency = HistogramMetricFamily(
            "managerd_etcd_request_seconds",
            "Round trip of one etcd request (each attempt), by RPC.",
            labels=["rpc"],
        )
        for rpc, hist in sorted(dict(etcd.latency).items()):
            latency.add_metric([rpc], hist.buckets(), hist.sum)
        yield latency
        batches = HistogramMetricFamily(
            "managerd_etcd_txn_batch_size", "Calls per Txn sent to etcd (group commit)."
        )
        batches.add_metric([], etcd.batch_sizes.buckets(), etcd.batch_sizes.sum)
        yield batches
        yield GaugeMetricFamily(
            "managerd_etcd_watches_open", "etcd watches open.", value=etcd.watches_open
        )
        yield CounterMetricFamily(
            "managerd_etcd_lease_keepalive_failures",
            "Lease keep-alives that failed (lease gone, or no member answered).",
            value=etcd.keepalive_failures,
        )
        yield CounterMetricFamily(
            "managerd_etcd_session_resumes",
            "Sessions taken over from another gateway.",
            value=etcd.session_resumes,
        )

    def _per_object(
        self,
        objects: list[Any],  # of one kind of ObjectStats, which ``families`` read
        limit: int,
        label: str,
        families: list[tuple[str, str, str, Callable[[Any], float]]],
    ) -> Iterator[Metric]:
        named, rest = _bounded(objects, limit)
        for name, doc, kind, read in families:
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=[label])
            else:
                family = GaugeMetricFamily(name, doc, labels=[label])
            for obj in named:
                family.add_metric([obj.name], read(obj))
            if rest:
                family.add_metric([OTHER], sum(read(obj) for obj in rest))
            yield family

    def _histograms(
        self, objects: list[Any], limit: int, label: str, name: str, doc: str, attr: str
    ) -> Iterator[Metric]:
        family = HistogramMetricFamily(name, doc, labels=[label])
        named, rest = _bounded(objects, limit)
        for obj in named:
            hist: Histogram = getattr(obj, attr)
            family.add_metric([obj.name], hist.buckets(), hist.sum)
        if rest:
            merged = Histogram()
            for obj in rest:
                merged.merge(getattr(obj, attr))
            family.add_metric([OTHER], merged.buckets(), merged.sum)
        yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


#: The page's files (package data), served as they are.
WEB_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
STATUS_TIMEOUT_S: Final = 5.0
#: /readyz: how long the store may take to answer. Below Kubernetes' default probe
#: timeout (1 s), so a slow store reads as not ready rather than as a failed probe.
READY_TIMEOUT_S: Final = 0.8
#: Rates on /status.json come from the sample before this one, if it is at least this old.
MIN_RATE_INTERVAL_S: Final = 0.5


def web_file(name: str) -> bytes:
    return resources.files("managerd").joinpath("web", name).read_bytes()


class StatusSource:
    """``/status.json``: a status sample taken on the loop, rates against the previous one."""

    def __init__(self, core: MetricsCore) -> None:
        self.core = core
        self._lock = threading.Lock()
        self._previous: tuple[float, dict[str, Any]] | None = None

    def _sample(self) -> dict[str, Any]:
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self.core.ops.report())
            except BaseException as exc:
                future.set_exception(exc)

        self.core.loop.call_soon_threadsafe(take)
        return future.result(STATUS_TIMEOUT_S)

    def document(self) -> dict[str, Any]:
        from managerd.status import summarize

        now = time.monotonic()
        after = self._sample()
        with self._lock:
            previous = self._previous
            if previous is None or now - previous[0] >= MIN_RATE_INTERVAL_S:
                self._previous = (now, after)
        if previous is None:
            return summarize(after, after, 1.0)
        return summarize(previous[1], after, max(now - previous[0], 1e-3))


def readiness(core: MetricsCore) -> str | None:
    """None if the daemon is ready for clients, else why not (from the metrics thread)."""
    if not core.accepting:
        return "not accepting clients"
    try:
        probe = asyncio.run_coroutine_threadsafe(core.store.ready(READY_TIMEOUT_S), core.loop)
    except RuntimeError:  # the loop is closed
        return "the daemon is stopping"
    try:
        # A little longer than the store's own bound: past it, the loop itself is stuck.
        return probe.result(READY_TIMEOUT_S + 0.2)
    except concurrent.futures.TimeoutError:
        probe.cancel()
        return "the daemon's event loop did not answer"
    except (concurrent.futures.CancelledError, asyncio.CancelledError):
        return "the daemon is stopping"
    except Exception as exc:  # a probe says not ready; it does not fail the request
        log.warning("readiness check failed", exc_info=exc)
        return f"the store's check failed ({type(exc).__name__})"


def _not_yet(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting\n"]


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background HTTP thread."""

    def __init__(self, host: str, port: int, token: bytes | None = None) -> None:
        """Bind the port (before the daemon touches its data directory); :meth:`start` serves."""
        #: With a token, ``/metrics`` answers only ``Authorization: Bearer <token>``
        #: (the health endpoints stay open: they tell nothing but up or down).
        self._expected = b"Bearer " + token if token else None
        try:
            self.httpd = make_server(
                host, port, _not_yet, ThreadingWSGIServer, handler_class=_QuietHandler
            )
        except OSError as exc:  # said as the main port's is (server._listen)
            raise OSError(
                exc.errno, f"cannot listen on {host}:{port} (metrics): {exc.strerror}"
            ) from None
        self.address: tuple[str, int] = self.httpd.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="managerd-metrics", daemon=True
        )

    def _app(self, core: MetricsCore) -> Callable[..., Iterable[bytes]]:
        expected = self._expected
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(core))
        ProcessCollector(registry=registry)  # process_* : memory, CPU, open files
        metrics_app = make_wsgi_app(registry)
        status = StatusSource(core)

        def authorized(environ: dict[str, Any], start_response: Callable[..., Any]) -> bool:
            given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
            if expected is None or hmac.compare_digest(given, expected):
                return True
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return False

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            if path == "/readyz":
                why_not = readiness(core)
                start_response(
                    "200 OK" if why_not is None else "503 Service Unavailable",
                    [("Content-Type", "text/plain")],
                )
                return [b"ready\n" if why_not is None else f"not ready: {why_not}\n".encode()]
            if path == "/metrics":
                if not authorized(environ, start_response):
                    return [b"a bearer token is required (metrics_token_file)\n"]
                result: Iterable[bytes] = metrics_app(environ, start_response)
                return result
            if path == "/status.json":
                if not authorized(environ, start_response):
                    return [b"a bearer token is required (metrics_token_file)\n"]
                try:
                    doc = status.document()
                except (concurrent.futures.TimeoutError, RuntimeError) as exc:
                    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                    return [f"the daemon did not answer: {exc}\n".encode()]
                body = json.dumps(doc, default=str).encode()
                start_response(
                    "200 OK",
                    [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
                )
                return [body]
            if path in WEB_FILES:
                # The page holds no data (it fetches /status.json with the token).
                file, content_type = WEB_FILES[path]
                start_response(
                    "200 OK",
                    [
                        ("Content-Type", content_type),
                        ("Cache-Control", "no-cache"),
                        ("X-Content-Type-Options", "nosniff"),
                        ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:"),
                    ],
                )
                return [web_file(file)]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /, /status.json, /metrics, /healthz or /readyz\n"]

        return app

    def start(self, core: MetricsCore) -> None:
        self.httpd.set_app(self._app(core))
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, the status page on /", *self.address)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def close(self) -> None:
        """Give the port back without having served (the daemon did not start)."""
        self.httpd.server_close()
