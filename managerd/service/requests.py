"""Counters: the requests served (by method and outcome), limits hit, and the daemon's own."""

from __future__ import annotations

from dataclasses import dataclass

from managerd.histogram import Histogram


class RequestStats:
    """Request counts by method and outcome, and one latency histogram."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.latency = Histogram()
        self.limits: dict[str, int] = {}

    def record(self, method: str, outcome: str, seconds: float) -> None:
        key = (method, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.latency.observe(seconds)

    def limit_hit(self, limit: str) -> None:
        self.limits[limit] = self.limits.get(limit, 0) + 1


@dataclass
class Stats:
    """Counters the metrics endpoint reads."""

    bytes_in: int = 0
    bytes_out: int = 0
    auth_failures: int = 0
    handshake_timeouts: int = 0
    connections_refused: int = 0
    tls_failures: int = 0
    sessions_expired: int = 0
    #: Sessions a reconnecting client resumed here, by where they were: this daemon's
    #: own, or taken over from another gateway of the store.
    sessions_resumed: int = 0
    sessions_taken_over: int = 0
