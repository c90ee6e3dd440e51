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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.measure import run_gang
from bench.plan import Plan
from bench.servers import Client, Target, unique


def w_caller(
    ready: Callable[[], float], t: Target, name: str, seconds: float, max_ops: int
) -> dict[str, Any]:
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
    results, usage, elapsed = run_gang(
        t.pid, clients, "calls", plan.seconds + 120,
        w_caller, t, unique("saturation"), plan.seconds, plan.max_ops,
    )  # fmt: skip
    calls = sum(r["calls"] for r in results)
    rate = calls / elapsed if elapsed > 0 else 0.0
    per_core = rate / usage["server_cores_busy"] if usage["server_cores_busy"] > 0 else 0.0
    return {
        "rate": rate,
        "per_server_core": per_core,
        "clients": clients,
        "slowest_client_calls": min(r["calls"] for r in results),
        **usage,
        "elapsed_s": round(elapsed, 3),
    }
