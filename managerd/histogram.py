"""A latency histogram: fixed buckets, plain integers bumped on the event loop."""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

#: Seconds; from a fast call on loopback to a long blocking wait.
LATENCY_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Histogram:
    """Bucket counts bumped on the loop thread; read by the collector."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value_s: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS_S, value_s)] += 1
        self.sum += value_s
        self.count += 1

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum
        self.count += other.count

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(LATENCY_BUCKETS_S, self.counts, strict=False):
            total += n
            out.append((repr(bound), float(total)))
        out.append(("+Inf", float(self.count)))
        return out
