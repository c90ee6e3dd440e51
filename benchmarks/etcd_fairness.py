"""Who gets the items when consumers block in ``Queue.get`` over two etcd gateways (vs embedded).

On etcd, blocked gets of every gateway wait in one line, in the order they
parked (their places, ``managerd/store/etcd/queues.py``); a call parks a
round trip or two to etcd after it reached its gateway, and its gateway
takes its item a round trip or two after the put. This measures what that
means for consumers.

Starts a 3-node cluster with ``tests/etcd_support.py``, two real gateways
(``managerd serve --store etcd://...``) and, for comparison, an embedded
daemon (``tests/conftest.py``'s ``Daemon``). On each system, ``--consumers``
threads of this process, one connection each (spread over the two gateways:
consumer ``i`` on gateway ``i % 2``), loop in a blocking ``get()``; one
producer (its own connection, on gateway 0) puts numbered items, first at
``--rate`` per second (100 by default: one producer's puts through a
gateway reached only ~170/s on 2 loaded cores, so 200/s would not be a
paced phase), then as fast as it can, ``--seconds`` each. Then one
sentinel per consumer: all items are before them in the queue, and each
consumer stops at its first.

Per consumer and phase: items received, share, the longest gap between two
of its items (counting from the phase's first put), and the p50/max wait
from put to get. For the paced phase, how often an item went to the
consumer that had been waiting longest: an item counts as *overtaking* when
another consumer's ``get`` began before the receiver's and returned after
it (the embedded store's FIFO line never does that, but for the clocks'
jitter: its figure is the measure's noise), told apart by whether some
overtaking consumer was on the receiver's gateway or only ones of the other
gateway. That counts the time each item takes to come back too; *handed in
order* counts only the order items were handed out in: an item is out of
order when another consumer's ``get`` that began before the receiver's (and
still waited) was handed a later item.

Every item must be received exactly once (else the exit status is 1).
``--json PATH`` writes the figures (the smoke test reads it). A number to
read, not a test (2 shared cores: relative figures)::

    uv run python benchmarks/etcd_fairness.py --seconds 20
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from etcd_gateways import embedded_and_gateways  # noqa: E402

from conftest import Daemon  # noqa: E402
from etcd_support import running_cluster  # noqa: E402

GATEWAYS = 2
#: A consumer's blocking get gives up after this (a hang, not a figure).
GET_TIMEOUT_S = 120.0


@dataclass
class Take:
    """One ``get`` of a consumer that returned an item."""

    seq: int
    put_at: float
    called_at: float
    got_at: float


@dataclass
class Consumer:
    index: int
    gateway: int
    takes: list[Take] = field(default_factory=list)
    #: The call that got the sentinel, as (called_at, got_at): it waited too.
    last: list[tuple[float, float]] = field(default_factory=list)
    error: BaseException | None = None


def consume(daemon: Daemon, name: str, c: Consumer, ready: threading.Barrier) -> None:
    """Loop in a blocking get on ``name`` until a sentinel (``None``) comes."""
    try:
        with daemon.connect() as m:
            q = m.Queue(name)
            ready.wait()
            while True:
                called_at = time.perf_counter()
                item = q.get(timeout=GET_TIMEOUT_S)
                got_at = time.perf_counter()
                if item is None:
                    c.last.append((called_at, got_at))
                    return
                seq, put_at = item
                c.takes.append(Take(seq, put_at, called_at, got_at))
    except BaseException as exc:
        c.error = exc
        ready.abort()


def produce(daemon: Daemon, name: str, rate: float | None, seconds: float, consumers: int) -> int:
    """Put ``(seq, time)`` items for ``seconds`` (``rate`` per second, or as fast as it
    can), then ``consumers`` sentinels; return how many items."""
    with daemon.connect() as m:
        q = m.Queue(name)
        began = time.perf_counter()
        seq = 0
        while (now := time.perf_counter()) - began < seconds:
            if rate is not None:
                due = began + seq / rate
                if due > now:
                    time.sleep(due - now)
            q.put((seq, time.perf_counter()))
            seq += 1
        for _ in range(consumers):
            q.put(None)
        return seq


def run_phase(
    daemons: list[Daemon], name: str, consumers: int, rate: float | None, seconds: float
) -> tuple[list[Consumer], int]:
    """One phase: consumers blocked on ``name``, one producer on ``daemons[0]``."""
    cs = [Consumer(i, i % len(daemons)) for i in range(consumers)]
    ready = threading.Barrier(consumers + 1)
    threads = [
        threading.Thread(target=consume, args=(daemons[c.gateway], name, c, ready), daemon=True)
        for c in cs
    ]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.2)  # every consumer's first get is parked before the first put
    puts = produce(daemons[0], name, rate, seconds, consumers)
    for t in threads:
        t.join(GET_TIMEOUT_S + 30)
    for c in cs:
        if c.error is not None:
            raise RuntimeError(f"consumer {c.index} failed: {c.error!r}") from c.error
    return cs, puts


def overtaken(cs: list[Consumer]) -> tuple[int, int]:
    """Items taken while another consumer's earlier get still waited (see the docstring):
    how many by a consumer of the same gateway, and how many of the rest by one of
    another gateway.

    A consumer's calls follow each other, so the only one of its calls that can
    have begun before ``t.called_at`` and ended after ``t.got_at`` is the one
    running at ``t.called_at``: one bisection per consumer and item.
    """
    spans = {c.index: [(t.called_at, t.got_at) for t in c.takes] + c.last for c in cs}
    starts = {i: [s for s, _ in calls] for i, calls in spans.items()}
    same = other = 0
    for c in cs:
        for t in c.takes:
            passed = set()
            for o in cs:
                k = bisect.bisect_left(starts[o.index], t.called_at) - 1
                if o is not c and k >= 0 and spans[o.index][k][1] > t.got_at:
                    passed.add(o.gateway == c.gateway)
            same += True in passed
            other += passed == {False}
    return same, other


def handed_out_of_order(cs: list[Consumer]) -> int:
    """Items handed to a call while a call of another consumer that began earlier (and
    still waited) was handed a later item, or a sentinel, in the end: a measure of
    the order items are handed out in, whatever time each takes to come back."""
    calls = {
        c.index: [(t.called_at, t.got_at, float(t.seq)) for t in c.takes]
        + [(s, g, float("inf")) for s, g in c.last]
        for c in cs
    }
    starts = {i: [s for s, _, _ in spans] for i, spans in calls.items()}
    late = 0
    for c in cs:
        for t in c.takes:
            for o in cs:
                k = bisect.bisect_left(starts[o.index], t.called_at) - 1
                if o is c or k < 0:
                    continue
                _, got_at, seq = calls[o.index][k]
                if got_at > t.called_at and seq > t.seq:
                    late += 1
                    break
    return late


def report(system: str, phase: str, cs: list[Consumer], puts: int, paced: bool) -> dict[str, Any]:
    """Print one phase's table; return its figures (and the exactly-once check)."""
    seqs = Counter(t.seq for c in cs for t in c.takes)
    missing = puts - len([s for s in seqs if 0 <= s < puts])
    twice = sum(1 for n in seqs.values() if n > 1)
    stray = sum(n for s, n in seqs.items() if not 0 <= s < puts)
    first_put = min((t.put_at for c in cs for t in c.takes), default=0.0)
    took = max((t.got_at for c in cs for t in c.takes), default=first_put) - first_put
    print(f"\n{system}, {phase}: {puts} items in {took:.1f} s ({puts / max(took, 1e-9):,.0f}/s)")
    print("| consumer | gateway | items | share | longest gap s | wait p50 ms | wait max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for c in cs:
        got = [t.got_at for t in c.takes]
        gaps = [b - a for a, b in zip([first_put, *got], got, strict=False)]
        waits = [(t.got_at - t.put_at) * 1000 for t in c.takes]
        row = {
            "items": len(c.takes),
            "share": len(c.takes) / max(puts, 1),
            "longest_gap_s": max(gaps, default=took),
            "wait_p50_ms": statistics.median(waits) if waits else None,
            "wait_max_ms": max(waits, default=None),
        }
        rows.append(row)
        p50 = "-" if row["wait_p50_ms"] is None else f"{row['wait_p50_ms']:.1f}"
        wmax = "-" if row["wait_max_ms"] is None else f"{row['wait_max_ms']:.1f}"
        print(
            f"| {c.index} | {c.gateway} | {row['items']} | {row['share']:.1%} |"
            f" {row['longest_gap_s']:.2f} | {p50} | {wmax} |"
        )
    by_gateway = Counter({c.gateway: 0 for c in cs})
    for c in cs:
        by_gateway[c.gateway] += len(c.takes)
    print(
        "per gateway: " + ", ".join(f"{g}: {n / max(puts, 1):.1%}" for g, n in by_gateway.items())
    )
    figures: dict[str, Any] = {
        "puts": puts,
        "missing": missing,
        "twice": twice,
        "stray": stray,
        "consumers": rows,
    }
    if paced:
        same, other = overtaken(cs)
        fifo = 1 - (same + other) / max(puts, 1)
        in_order = 1 - handed_out_of_order(cs) / max(puts, 1)
        figures.update(
            to_longest_waiting=fifo,
            overtaking_same_gateway=same,
            overtaking_other=other,
            handed_in_order=in_order,
        )
        print(
            f"to the consumer waiting longest: {fifo:.1%} (overtaking {same} within a gateway,"
            f" {other} only across gateways)"
        )
        print(f"handed in the order the calls began: {in_order:.1%}")
    verdict = "exactly once" if missing == twice == stray == 0 else "NOT exactly once"
    print(f"{verdict}: {missing} missing, {twice} received twice, {stray} never put")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="items/s of the paced phase")
    parser.add_argument("--quick", action="store_true", help="2 s phases (the smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2.0
    phases: list[tuple[str, float | None]] = [
        (f"paced {args.rate:g}/s", args.rate),
        ("as fast as one producer can", None),
    ]
    results: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_cluster(Path(tmp)) as cluster,
        embedded_and_gateways(Path(tmp), cluster, GATEWAYS) as (memory, gateways),
    ):
        systems = [("embedded daemon", [memory]), (f"{GATEWAYS} etcd gateways", gateways)]
        for system, daemons in systems:
            for k, (phase, rate) in enumerate(phases):
                name = f"fair-{len(results)}"
                cs, puts = run_phase(daemons, name, args.consumers, rate, args.seconds)
                results[f"{system}, {phase}"] = report(system, phase, cs, puts, k == 0)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    broken = [k for k, r in results.items() if r["missing"] or r["twice"] or r["stray"]]
    if broken:
        print(f"\nNOT exactly once: {broken}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
