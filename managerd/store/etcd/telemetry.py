"""What a gateway counts of its traffic with etcd, for ``managerd/metrics.py``.

Plain integers and bucket arrays bumped on the event loop by the etcd
client (``client.py``), read by the metrics collector at scrape time, as
the daemon's other metrics (``managerd/metrics.py``). Kept apart from the
client so that the metrics module can read it without importing gRPC (the
``etcd`` extra).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Final

from managerd.histogram import Histogram

#: Calls per shared Txn (``groupcommit.py``): 1 up to etcd's --max-txn-ops.
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128)


class SizeHistogram:
    """Counts of sizes in ``BATCH_BUCKETS``, as ``Histogram`` does for seconds."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.sum = 0
        self.count = 0

    def observe(self, size: int) -> None:
        self.counts[bisect_left(BATCH_BUCKETS, size)] += 1
        self.sum += size
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(BATCH_BUCKETS, self.counts, strict=False):
            total += n
            out.append((repr(float(bound)), float(total)))
        out.append(("+Inf", float(self.count)))
        return out


@dataclass
class EtcdMetrics:
    """One etcd client's (one gateway's) figures."""

    #: Round trips by RPC (``range``, ``txn``, ``lease_keepalive``...): each attempt.
    latency: dict[str, Histogram] = field(default_factory=dict)
    #: Calls per Txn sent by group commit (1: a call alone).
    batch_sizes: SizeHistogram = field(default_factory=SizeHistogram)
    watches_open: int = 0
    #: Lease renewals that failed (the lease was gone, or no member answered in time).
    keepalive_failures: int = 0
    #: Sessions taken over from another gateway (``EtcdSession.take_over``).
    session_resumes: int = 0

    def observe(self, rpc: str, seconds: float) -> None:
        hist = self.latency.get(rpc)
        if hist is None:
            hist = self.latency[rpc] = Histogram()
        hist.observe(seconds)
