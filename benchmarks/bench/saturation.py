"""The server's saturation point: many clients calling at once, and CPU per request.

``run_saturation`` starts ``clients`` forked processes, each with its own
connection (a managerd session, or a stock manager connection served by a
thread of its own), calling ``Value.get()`` in a closed loop. It reports the
requests answered per second and the server's CPU over the same window, and
from the two the saturation point: requests per second of one server core
(requests / server CPU seconds). On a 2-core machine 64 clients cannot keep
one server core busy while they share the other with it, so the measured
rate alone understates what a daemon answers when it has a core to itself;
the per-core figure is what the issue's "requests/s it answers on one core
with 64 clients" means. Stock's server runs a thread per connection under
one GIL, so its figure is per core too.

A client that never gets an answer (seen with stock's server and 64 clients
on a loaded machine: the client waits in ``recv`` for the reply to a request
its server thread never saw) is reported as ``hung`` rather than stopping the
suite.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from bench.measure import CpuWindow, Gang
from bench.plan import CTX, Plan
from bench.servers import Client, Target, unique

#: Seconds after its loop ended that a client still in a call counts as hung.
HUNG_AFTER_S = 60.0
#: Clients connecting (and making their first call) at the same time.
CONNECTING_AT_ONCE = 8
#: Seconds for every client to connect and make its first call.
READY_WITHIN_S = 180.0


def w_caller(
    ready: Callable[[], float],
    t: Target,
    name: str,
    seconds: float,
    max_ops: int,
    gate: Any,
) -> dict[str, Any]:
    with gate:  # a few connecting at a time: stock's listener has a backlog of 16
        c = Client(t)
        get = c.value(name).get
        get()
    mono = time.monotonic
    deadline = ready() + seconds
    n = 0
    while n < max_ops and mono() < deadline:
        get()
        n += 1
    end = mono()
    c.close()
    return {"calls": n, "end": end}


def run_saturation(t: Target, clients: int, plan: Plan) -> dict[str, Any]:
    """The gang's figures; clients still in a call a minute after their loops
    ended are counted as ``hung`` (their calls not counted) and killed."""
    gang = Gang()
    name = unique("saturation")
    gate = CTX.BoundedSemaphore(CONNECTING_AT_ONCE)
    for _ in range(clients):
        gang.spawn(w_caller, t, name, plan.seconds, plan.max_ops, gate)
    try:
        gang.wait_ready(clients, READY_WITHIN_S)
        cpu = CpuWindow(t.pid)
        t_go = gang.go()
        give_up = t_go + plan.seconds + HUNG_AFTER_S
        results: list[dict[str, Any]] = []
        while len(results) < clients:
            try:
                results.append(gang.result(max(0.1, give_up - time.monotonic()))[1])
            except queue.Empty:
                break
        calls = sum(r["calls"] for r in results)
        usage = cpu.stop(calls)
    finally:
        gang.kill()
    elapsed = max((r["end"] for r in results), default=t_go) - t_go
    rate = calls / elapsed if elapsed > 0 else 0.0
    # Requests per second of server CPU: not the window's wall time, which a hung
    # client stretches.
    per_us = usage["server_cpu_us_per_msg"]
    return {
        "rate": rate,
        "per_server_core": 1e6 / per_us if per_us > 0 else 0.0,
        "clients": clients,
        "hung": clients - len(results),
        "slowest_client_calls": min((r["calls"] for r in results), default=0),
        **usage,
        "elapsed_s": round(elapsed, 3),
    }
