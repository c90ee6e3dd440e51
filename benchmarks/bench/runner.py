"""The run: which workloads, against which systems, in which order; the command line.

Every managerd workload runs against this checkout's daemon (``managerd``)
and, with ``--managerd-from PATH``, against each other checkout's daemon
(``managerd@<rev>``), taking turns with it within each round.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.crowds import run_blocked, run_idle
from bench.measure import in_child, machine, mean_of, open_files_limit, pct
from bench.plan import DEFAULT_BATCH, PIPELINE_DEPTH, SIZES, Plan, plan_for
from bench.report import print_comparison, print_table, ratios, rounded, targets
from bench.saturation import run_saturation
from bench.servers import (
    Checkout,
    Target,
    checkout,
    floor_server,
    managerd_server,
    stock_server,
)
from bench.workloads import (
    run_imports,
    run_lock_contended,
    run_mpmc,
    run_pipe,
    w_connect,
    w_dict,
    w_floor_echo,
    w_floor_putget,
    w_lock,
    w_noop,
    w_putget,
)
from conftest import free_port

Run = Callable[[], dict[str, Any]]


def job(fn: Callable[..., Any], *args: Any) -> Run:
    """``fn(*args)`` in a forked child, when called (``in_child``)."""
    return functools.partial(in_child, fn, *args)


class Suite:
    def __init__(
        self,
        plan: Plan,
        only: set[str] | None,
        batch: int = DEFAULT_BATCH,
        checkouts: tuple[Checkout, ...] = (),
    ) -> None:
        self.plan = plan
        self.only = only
        self.batch = batch
        self.checkouts = checkouts
        self.labels = [c.label for c in checkouts]
        self.others: list[Target] = []  # the checkouts' daemons while run() runs
        self.results: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []
        self.started = time.monotonic()

    def wanted(self, group: str) -> bool:
        return self.only is None or group in self.only

    def record(self, key: str, **fields: Any) -> None:
        self.results[key] = fields
        load = os.getloadavg()[0]
        shown = {k: fields.get(k) for k in ("floor", "stock", "managerd", *self.labels)}
        at = time.monotonic() - self.started
        print(f"  {at:6.1f}s {key:<28} {json.dumps(rounded(shown))}  (load {load:.2f})", flush=True)
        if fields.get("ok") is False:
            self.failures.append(f"{key}: {json.dumps(rounded(fields.get('details', {})))}")

    def run(self, tmp: Path) -> None:
        plan = self.plan
        with contextlib.ExitStack() as stack:
            floor = stack.enter_context(floor_server())
            stock = stack.enter_context(stock_server())
            md = stack.enter_context(managerd_server(tmp / "main"))
            self.others = [
                stack.enter_context(managerd_server(tmp / f"other{i}", source=c))
                for i, c in enumerate(self.checkouts)
            ]
            self.single_client(floor, stock, md)
            self.multi_process(stock, md)
            if self.wanted("connect"):
                ms = {
                    s.name: in_child(w_connect, s, plan.connect_tries)
                    for s in (floor, stock, md, *self.others)
                }
                self.record(
                    "connect_first_call_ms", unit="ms (median)", better="lower",
                    **{k: pct(v, 0.5) for k, v in ms.items()},
                    details={k: {"median_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9),
                                 "max_ms": max(v), "tries": len(v)} for k, v in ms.items()},
                )  # fmt: skip
            if self.wanted("blocked"):
                self.blocked(stock, md)
            if self.wanted("imports"):
                # The client is this checkout's for every daemon: measured once.
                r = run_imports(md)
                self.record("client_imports", unit="modules added, all stdlib", better="-",
                            managerd=r["modules_added"], ok=r["ok"], details=r)  # fmt: skip
        self.others = []
        if self.wanted("variants"):
            self.variants(tmp)
        if self.wanted("loops"):
            self.event_loops(tmp)
        if self.wanted("idle"):
            self.idle(tmp)
        if self.wanted("many"):
            self.many(tmp)

    def compare(self, runs: dict[str, Run]) -> dict[str, dict[str, Any]]:
        """Each run ``plan.rounds`` times, the systems in turn; the mean of the rounds.

        Taking turns spreads a burst of other work on the machine over all
        the systems instead of landing on one of them.
        """
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for _ in range(self.plan.rounds):
            for name, run in runs.items():
                rounds[name].append(run())
        return {name: mean_of(measured) for name, measured in rounds.items()}

    def each_managerd(
        self, md: Target, fn: Callable[..., Any], *args: Any, forked: bool = True
    ) -> dict[str, Run]:
        """``fn(t, *args)`` for this checkout's daemon, then each other checkout's.

        ``forked``: the call runs in a forked child (``in_child``); else here
        (a ``run_*`` that forks its own workers).
        """
        return {
            t.name: job(fn, t, *args) if forked else functools.partial(fn, t, *args)
            for t in (md, *self.others)
        }

    def single_client(self, floor: Target, stock: Target, md: Target) -> None:
        plan = self.plan
        ping: dict[str, Any] = {}
        mds = (md, *self.others)
        if any(self.wanted(g) for g in ("floor", "noop", "dict", "lock")):
            runs = {
                "floor": job(w_floor_echo, floor, 100, plan),
                "stock": job(w_noop, stock, "value", plan),
            }
            for t in mds:
                runs[f"ping {t.name}"] = job(w_noop, t, "ping", plan)
                runs[f"value {t.name}"] = job(w_noop, t, "value", plan)
            r = self.compare(runs)
            ping = r["floor"]
            self.record("floor_pingpong_100B", unit="round trips/s", better="higher",
                        floor=ping["rate"], details={"floor": ping})  # fmt: skip
            for which, label in (("ping", "noop_ping"), ("value", "noop_value_get")):
                mine = {t.name: r[f"{which} {t.name}"] for t in mds}
                self.record(label, unit="calls/s", better="higher", floor=ping["rate"],
                            stock=r["stock"]["rate"], **{k: v["rate"] for k, v in mine.items()},
                            details={"floor": ping, "stock": r["stock"], **mine})  # fmt: skip
        if self.wanted("putget"):
            for label, size in SIZES.items():
                r = self.compare({
                    "floor": job(w_floor_putget, floor, size, plan),
                    "stock": job(w_putget, stock, size, plan),
                    **self.each_managerd(md, w_putget, size, plan),
                })  # fmt: skip
                self.record(f"queue_put_get_{label}", unit="pairs/s", better="higher",
                            **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
                if label == "32KB":
                    # One call (a put, or a get) is one round trip of the 32 KB payload.
                    rt = {k: max(v["per_op_p50_us"]) / 1000 for k, v in r.items()}
                    p99 = {k: max(v["per_op_p99_us"]) / 1000 for k, v in r.items()}
                    self.record("roundtrip_32KB_ms", unit="ms per call (p50)", better="lower",
                                **rt, details={"p99_ms": p99})  # fmt: skip
            r = self.compare({
                "stock": job(w_putget, stock, 0, plan, False, True),
                **self.each_managerd(md, w_putget, 0, plan, False, True),
            })  # fmt: skip
            self.record("queue_put_get_record", unit="pairs/s", better="higher",
                        **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("putonly"):
            r = self.compare({
                "floor": job(w_floor_putget, floor, 100, plan, True),
                "stock": job(w_putget, stock, 100, plan, True),
                **self.each_managerd(md, w_putget, 100, plan, True),
            })  # fmt: skip
            self.record("put_only_100B", unit="puts/s", better="higher",
                        **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("dict"):
            for op in ("set", "get"):
                r = self.compare({
                    "stock": job(w_dict, stock, op, plan),
                    **self.each_managerd(md, w_dict, op, plan),
                })  # fmt: skip
                self.record(f"dict_{op}", unit="ops/s", better="higher", floor=ping["rate"],
                            **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("lock"):
            r = self.compare({
                "stock": job(w_lock, stock, plan),
                **self.each_managerd(md, w_lock, plan),
            })  # fmt: skip
            self.record("lock_uncontended", unit="pairs/s", better="higher",
                        floor=ping["rate"] / 2, **{k: v["rate"] for k, v in r.items()},
                        details=r)  # fmt: skip

    def multi_process(self, stock: Target, md: Target) -> None:
        plan = self.plan
        if self.wanted("lock"):
            r = self.compare({
                "stock": functools.partial(run_lock_contended, stock, 4, plan),
                **self.each_managerd(md, run_lock_contended, 4, plan, forked=False),
            })  # fmt: skip
            self.record("lock_contended_4procs", unit="pairs/s (total)", better="higher",
                        **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("mpmc"):
            for n in (2, 8):
                r = self.compare({
                    "stock": functools.partial(run_mpmc, stock, n, n, plan),
                    **self.each_managerd(md, run_mpmc, n, n, plan, forked=False),
                })  # fmt: skip
                self.record(f"queue_{n}p{n}c_100B", unit="messages/s", better="higher",
                            **{k: v["rate"] for k, v in r.items()},
                            ok=all(v["ok"] for v in r.values()), details=r)  # fmt: skip
        if self.wanted("saturation"):
            n = plan.saturation_clients
            r = self.compare({
                "stock": functools.partial(run_saturation, stock, n, plan),
                **self.each_managerd(md, run_saturation, n, plan, forked=False),
            })  # fmt: skip
            self.record(f"saturation_{n}_clients_per_core", unit="requests/s per server core",
                        better="higher", **{k: v["per_server_core"] for k, v in r.items()},
                        details=r)  # fmt: skip
        if self.wanted("batch"):
            mds = (md, *self.others)
            runs: dict[str, Run] = {"stock": functools.partial(run_pipe, stock, 1, plan)}
            for t in mds:
                runs[f"single {t.name}"] = functools.partial(run_pipe, t, 1, plan)
                runs[f"batch {t.name}"] = functools.partial(run_pipe, t, self.batch, plan)
                runs[f"pipelined {t.name}"] = functools.partial(
                    run_pipe, t, self.batch, plan, PIPELINE_DEPTH
                )
            r = self.compare(runs)
            pipelined = {t.name: r[f"pipelined {t.name}"] for t in mds}
            single = {t.name: r[f"single {t.name}"] for t in mds}
            batch = {t.name: r[f"batch {t.name}"] for t in mds}
            self.record("queue_1p1c_100B", unit="messages/s", better="higher",
                        stock=r["stock"]["rate"], **{k: v["rate"] for k, v in single.items()},
                        ok=r["stock"]["ok"] and all(v["ok"] for v in single.values()),
                        details={"stock": r["stock"], **single})  # fmt: skip
            self.record(f"batch_{self.batch}_1p1c_100B", unit="messages/s", better="higher",
                        stock=r["stock"]["rate"], **{k: v["rate"] for k, v in batch.items()},
                        ok=all(v["ok"] for v in batch.values()),
                        details={"stock (single put/get)": r["stock"], **batch})  # fmt: skip
            self.record(f"batch_{self.batch}_1p1c_100B_pipelined", unit="messages/s",
                        better="higher", stock=r["stock"]["rate"],
                        **{k: v["rate"] for k, v in pipelined.items()},
                        ok=all(v["ok"] for v in pipelined.values()),
                        details={"stock (single put/get)": r["stock"], **pipelined})  # fmt: skip

    def blocked(self, stock: Target, md: Target) -> None:
        plan = self.plan
        s = run_blocked(stock, plan.consumers, plan.consumer_procs, plan)
        m = {t.name: run_blocked(t, plan.consumers, plan.consumer_procs, plan)
             for t in (md, *self.others)}  # fmt: skip
        self.record(f"blocked_get_{plan.consumers}_wake_ms", unit="ms (p50 put -> wake)",
                    better="lower", stock=s["wake_p50_ms"],
                    **{k: v["wake_p50_ms"] for k, v in m.items()},
                    ok=s["ok"] and all(v["ok"] for v in m.values()),
                    details={"stock": s, **m})  # fmt: skip

    def variants(self, tmp: Path) -> None:
        """The default daemon beside one serving metrics and one with a data directory."""
        plan = self.plan
        with contextlib.ExitStack() as stack:
            daemons = {
                "managerd": stack.enter_context(managerd_server(tmp / "plain")),
                "metrics": stack.enter_context(managerd_server(
                    tmp / "metrics", {"MANAGERD_METRICS_PORT": str(free_port())})),
                "data_dir": stack.enter_context(managerd_server(
                    tmp / "durable", {"MANAGERD_DATA_DIR": str(tmp / "durable" / "data")})),
            }  # fmt: skip
            pings = {k: job(w_noop, t, "ping", plan) for k, t in daemons.items()}
            pairs = {k: job(w_putget, t, 100, plan) for k, t in daemons.items()}
            for label, runs in (("variants_noop_ping", pings), ("variants_put_get_100B", pairs)):
                r = self.compare(runs)
                unit = "calls/s" if "noop" in label else "pairs/s"
                self.record(label, unit=unit, better="higher",
                            **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip

    def event_loops(self, tmp: Path) -> None:
        """m.ping() on a daemon per event loop, measured in turn (A, U, A, U): the mean."""
        plan = self.plan
        sources: dict[str, Checkout | None] = {"managerd": None}
        sources.update((c.label, c) for c in self.checkouts)
        loops = ("asyncio", "uvloop")
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {
            (loop, name): [] for loop in loops for name in sources
        }
        with contextlib.ExitStack() as stack:
            daemons = {
                (loop, name): stack.enter_context(
                    managerd_server(
                        tmp / (loop if source is None else f"{loop}-other{i}"),
                        {"MANAGERD_EVENT_LOOP": loop},
                        source,
                    )
                )
                for loop in loops
                for i, (name, source) in enumerate(sources.items())
            }
            for _ in range(2):
                for key, md in daemons.items():
                    runs[key].append(in_child(w_noop, md, "ping", plan))
        for loop in loops:
            rates: dict[str, float] = {}
            details: dict[str, Any] = {}
            for name in sources:
                measured = runs[loop, name]
                rates[name] = sum(r["rate"] for r in measured) / len(measured)
                per_round = {f"round {i + 1}": r for i, r in enumerate(measured)}
                if name == "managerd":
                    details.update(per_round)
                else:
                    details[name] = per_round
            self.record(f"noop_ping_{loop}", unit="calls/s (mean of 2)", better="higher",
                        **rates, details=details)  # fmt: skip

    def idle(self, tmp: Path) -> None:
        plan = self.plan
        n = plan.idle_clients
        m: dict[str, dict[str, Any]] = {}
        with managerd_server(tmp / "idle") as md:
            m["managerd"] = run_idle(md, n, plan.idle_procs, plan)
        for i, source in enumerate(self.checkouts):
            with managerd_server(tmp / f"idle-other{i}", source=source) as other:
                m[other.name] = run_idle(other, n, plan.idle_procs, plan)
        with stock_server() as stock:
            s = run_idle(stock, n, plan.idle_procs, plan)
        details = {"stock": s, **m}
        ok = all(v["connected"] == n and v["alive_at_end"] == v["connected"] for v in m.values())
        self.record(f"idle_{n}_server_rss_mb", unit="MB (VmRSS)", better="lower",
                    stock=s["server_rss_mb"], **{k: v["server_rss_mb"] for k, v in m.items()},
                    ok=ok, details=details)  # fmt: skip
        self.record(f"idle_{n}_other_call_p99_ms", unit="ms (p99)", better="lower",
                    stock=s["probe"]["p99_us"] / 1000,
                    **{k: v["probe"]["p99_us"] / 1000 for k, v in m.items()},
                    details={k: v["probe"] for k, v in details.items()})  # fmt: skip

    def many(self, tmp: Path) -> None:
        """As many connections as the target: the probe and N - 1 idle sessions."""
        plan = self.plan
        m: dict[str, dict[str, Any]] = {}
        sources: list[Checkout | None] = [None, *self.checkouts]
        for i, source in enumerate(sources):
            where = tmp / ("many" if source is None else f"many-other{i}")
            with managerd_server(where, source=source) as md:
                limit = open_files_limit(md.pid)
                r = run_idle(md, plan.many_connections - 1, plan.many_procs, plan)
            r["daemon_open_files_limit_at_start"] = limit
            r["accepted_with_probe"] = r["connected"] + 1
            m[md.name] = r
        # Without other checkouts the details are this daemon's alone (as before the comparison).
        details = m["managerd"] if len(m) == 1 else m
        self.record(f"connections_{plan.many_connections}_accepted", unit="sessions",
                    better="higher", **{k: v["connected"] + 1 for k, v in m.items()},
                    details=details)  # fmt: skip


def main(description: str = "") -> int:
    parser = argparse.ArgumentParser(description=(description or __doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, help="per timed loop (default 2; 0.25 quick)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke (CI)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--only",
        help="comma-separated groups: floor,noop,putget,putonly,dict,lock,mpmc,saturation,"
        "batch,connect,blocked,imports,variants,loops,idle,many",
    )
    parser.add_argument("--connections", type=int, help="the many-connections workload's count")
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="items per put_many/get_many"
    )
    parser.add_argument(
        "--managerd-from",
        "--compare",
        dest="managerd_from",
        metavar="PATH",
        type=Path,
        action="append",
        default=[],
        help="also measure the daemon of this other checkout (a git worktree), as "
        "managerd@<rev>, in turn with this one's (repeatable; clients stay this checkout's)",
    )
    args = parser.parse_args()
    plan = plan_for(args.quick, args.seconds)
    if args.connections:
        plan = dataclasses.replace(plan, many_connections=args.connections)
    only = set(args.only.split(",")) if args.only else None
    checkouts: list[Checkout] = []
    for path in args.managerd_from:
        checkouts.append(checkout(path, {"managerd", *(c.label for c in checkouts)}))
    info = machine()
    load_start = os.getloadavg()
    print(f"machine: {json.dumps(info)}")
    for c in checkouts:
        print(f"compared: {c.label} = {json.dumps(c.describe())}")
    print(f"plan: {plan}; load average at start {load_start}", flush=True)
    suite = Suite(plan, only, args.batch, tuple(checkouts))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="managerd-bench-") as tmp:
        suite.run(Path(tmp))
    ratios(suite.results, suite.labels)
    goals = targets(suite.results, plan, args.batch)
    print_table(suite.results, goals)
    if suite.labels:
        print_comparison(suite.results, suite.labels)
    report: dict[str, Any] = {
        "machine": info,
        "plan": plan.__dict__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "duration_s": round(time.monotonic() - started, 1),
        "workloads": rounded(suite.results),
        "targets": rounded(goals),
        "correctness_failures": suite.failures,
    }
    if checkouts:
        report["compared"] = {c.label: c.describe() for c in checkouts}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    else:
        print(json.dumps(report, indent=2))
    print(f"took {report['duration_s']}s; load average at end {report['load_average_end']}")
    for failure in suite.failures:
        print(f"CORRECTNESS FAILURE {failure}", file=sys.stderr)
    return 1 if suite.failures else 0
