"""What every part of the suite shares: the fork context, payload shapes, limits, the Plan."""

from __future__ import annotations

import multiprocessing
import struct
from dataclasses import dataclass

# Fork: a worker starts in milliseconds (spawn re-imports everything, ~0.3 s
# a process), which keeps the multi-process workloads and --quick short.
# Workers open their own connections after the fork.
CTX = multiprocessing.get_context("fork")

P100 = b"x" * 100
SIZES = {"100B": 100, "32KB": 32 * 1024, "1MB": 1024 * 1024}
#: Queue items of the multi-process workloads: producer, sequence, padding (100 B).
HEAD = struct.Struct("!II")
PAD = b"p" * (100 - HEAD.size)
SENTINEL = b""
BOUNDED_QUEUE = 10_000  # maxsize of the producer/consumer queues (both systems)
DEFAULT_BATCH = 1_000  # items per put_many / get_many (--batch)
#: Batches in flight per producer and per consumer in the pipelined batch workload.
PIPELINE_DEPTH = 2
GET_TIMEOUT_S = 60.0  # a consumer that waits this long reports a failure
GO_TIMEOUT_S = 300.0  # workers wait at most this long for the start signal
CONNECT_PHASE_S = 180.0  # idle clients: a worker stops connecting after this long
FINAL_PINGS_S = 60.0  # idle clients: the check that every session still answers
CHECK_EVERY = 50  # blocked consumers: puts between two checks of the parked count


@dataclass(frozen=True)
class Plan:
    """How long and how many: the full run or the --quick smoke."""

    seconds: float
    max_ops: int  # every timed loop stops at this many iterations too
    connect_tries: int
    idle_clients: int
    idle_procs: int
    many_connections: int
    many_procs: int
    consumers: int
    consumer_procs: int
    saturation_clients: int  # the saturation point: clients calling at once
    rounds: int  # single-client and multi-process workloads: systems measured in turn
    quick: bool


def plan_for(quick: bool, seconds: float | None) -> Plan:
    if quick:
        return Plan(
            seconds=0.25 if seconds is None else seconds,
            max_ops=50_000,
            connect_tries=5,
            idle_clients=50,
            idle_procs=2,
            many_connections=200,
            many_procs=2,
            consumers=50,
            consumer_procs=2,
            saturation_clients=8,
            rounds=1,
            quick=True,
        )
    return Plan(
        seconds=2.0 if seconds is None else seconds,
        max_ops=5_000_000,
        connect_tries=30,
        idle_clients=1_000,
        idle_procs=4,
        many_connections=10_000,
        many_procs=16,
        consumers=1_000,
        consumer_procs=4,
        saturation_clients=64,
        rounds=2,
        quick=False,
    )
