"""What the daemon remembers about peer addresses before they authenticate.

Two limits keep one address from costing everyone else:

- **failed handshakes**: an address that fails ``auth_failure_limit``
  handshakes (wrong authkey, garbage, timeouts, failed TLS) within
  ``auth_penalty_s`` is *penalized* for ``auth_penalty_s``. Its connections
  then get no challenge — no random bytes, no HMAC, no handshake timer — and
  are held silent for :data:`PENALTY_HOLD_S` before one ``#REFUSED#`` frame
  says why, so a brute-forcer that waits for answers is slowed to a crawl
  instead of being served as fast as it can ask;
- **pending handshakes**: an address may have at most
  ``max_handshakes_per_peer`` connections that have not authenticated yet,
  so it cannot fill ``max_connections`` with half-open handshakes.

Addresses in ``auth_penalty_exempt`` (loopback by default, as fail2ban's
``ignoreip``) are never penalized: their failures are not even counted.
Otherwise one hostile process on a host would lock every legitimate client
of that host out, and on loopback that is everyone on the daemon's own
machine. The pending-handshake limit still applies to them.

A penalized address's refusal carries the seconds it has left
(:func:`managerd_client.wire.refused_frame`), so that a client that was
not the culprit waits that long and retries, within its connect timeout.

An address is the peer's IP address as the socket reports it. Everything here
runs on the event loop, but for the readers the metrics thread calls; the
tables are bounded (:data:`MAX_TRACKED`).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("managerd")

#: How long a penalized address's connection waits, silent, before it is refused.
PENALTY_HOLD_S: Final = 1.0
#: Addresses tracked at most (failures and penalties each); beyond it the
#: oldest are forgotten, so a flood from many addresses cannot grow memory.
MAX_TRACKED: Final = 65536


class LogBudget:
    """At most ``lines`` refusal log lines per ``window_s``; then one line with the count.

    A peer failing thousands of handshakes a second must not cost the
    daemon (and everyone it serves) a formatted, written log line each.
    """

    def __init__(self, lines: int = 20, window_s: float = 10.0) -> None:
        self.lines = lines
        self.window_s = window_s
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self._suppressed:
                log.warning(
                    "%d more refused connections were not logged in the last %.0fs",
                    self._suppressed, self.window_s,
                )  # fmt: skip
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.lines:
            self._logged += 1
            return True
        self._suppressed += 1
        return False


@dataclass
class _Failures:
    since: float
    count: int


class PeerGuard:
    """Failed-handshake counts, penalties and pending handshakes per address."""

    def __init__(
        self,
        failure_limit: int,
        penalty_s: float,
        max_pending: int,
        log_budget: LogBudget,
        max_tracked: int = MAX_TRACKED,
        exempt: Iterable[str] = (),
    ) -> None:
        self.log_budget = log_budget
        #: Networks whose failed handshakes are never counted.
        self.exempt: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in exempt)
        self.max_tracked = max_tracked
        #: 0 turns the failure penalty off.
        self.failure_limit = failure_limit
        self.penalty_s = penalty_s
        self.max_pending = max_pending
        self._failures: dict[str, _Failures] = {}
        self._penalized: dict[str, float] = {}  # address -> monotonic end of penalty
        self._pending: dict[str, int] = {}
        #: Connections refused because their address was penalized / had too
        #: many pending handshakes (the metrics read these).
        self.penalty_refusals = 0
        self.pending_refusals = 0
        self.penalties = 0

    # -- admission ------------------------------------------------------------------
    def refusal(self, address: str) -> tuple[str, bool, float | None] | None:
        """Why a new connection from ``address`` is refused, or None to admit it.

        The flag says whether to hold the connection (penalized) rather than
        refuse it at once (too many pending: holding would add another); the
        number is the monotonic end of the penalty, if that is the reason
        (the refusal tells the client how long is left when it is sent).
        """
        if self._penalized:
            until = self._penalized.get(address)
            if until is not None:
                if until > time.monotonic():
                    self.penalty_refusals += 1
                    return (
                        f"too many failed authentications from {address}",
                        self._pending.get(address, 0) < self.max_pending,
                        until,
                    )
                del self._penalized[address]
        if self._pending.get(address, 0) >= self.max_pending:
            self.pending_refusals += 1
            return (
                f"too many unauthenticated connections from {address} "
                f"(max_handshakes_per_peer={self.max_pending})",
                False,
                None,
            )
        return None

    def is_exempt(self, address: str) -> bool:
        """Whether ``address`` is in ``auth_penalty_exempt`` (IPv4-mapped IPv6 counts as IPv4)."""
        if not self.exempt:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # not an IP address (a Unix socket): never exempt
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.exempt)

    def begin(self, address: str) -> None:
        """A connection from ``address`` starts (or is held before) its handshake."""
        self._pending[address] = self._pending.get(address, 0) + 1

    def end(self, address: str) -> None:
        """That connection authenticated or went away."""
        n = self._pending.get(address, 0) - 1
        if n > 0:
            self._pending[address] = n
        else:
            self._pending.pop(address, None)

    # -- failures ---------------------------------------------------------------------
    def failed(self, address: str) -> None:
        """A handshake from ``address`` failed; penalize it at the limit."""
        if not self.failure_limit or self.is_exempt(address):
            return
        now = time.monotonic()
        entry = self._failures.get(address)
        if entry is None or now - entry.since >= self.penalty_s:
            if entry is None and len(self._failures) >= self.max_tracked:
                self._forget_expired(now)
            entry = self._failures[address] = _Failures(now, 0)
        entry.count += 1
        if entry.count < self.failure_limit:
            return
        del self._failures[address]
        if address not in self._penalized and len(self._penalized) >= self.max_tracked:
            self._forget_expired(now)
        self._penalized[address] = now + self.penalty_s
        self.penalties += 1
        if self.log_budget.allow():
            log.warning(
                "refusing connections from %s for %.0fs: %d failed authentications within %.0fs",
                address, self.penalty_s, entry.count, self.penalty_s,
            )  # fmt: skip

    def _forget_expired(self, now: float) -> None:
        for address, entry in list(self._failures.items()):
            if now - entry.since >= self.penalty_s:
                del self._failures[address]
        for address, until in list(self._penalized.items()):
            if until <= now:
                del self._penalized[address]
        # Still full: forget the oldest (dicts keep insertion order).
        for table in (self._failures, self._penalized):
            while len(table) >= self.max_tracked:
                del table[next(iter(table))]

    # -- reading (also from the metrics thread: copy first, in one C call) -----------
    def penalized(self) -> dict[str, float]:
        """Penalized addresses and the seconds each has left."""
        now = time.monotonic()
        return {a: until - now for a, until in list(self._penalized.items()) if until > now}

    def pending(self) -> int:
        """Connections that have not authenticated yet."""
        return sum(list(self._pending.values()))
