"""Workloads of many clients: idle sessions beside a timed probe, consumers parked in get()."""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from managerd_client import ManagerdError, connect

from bench.measure import Gang, measure, open_files_limit, pct, raise_nofile, vmrss_mb
from bench.plan import CHECK_EVERY, CONNECT_PHASE_S, CTX, FINAL_PINGS_S, GO_TIMEOUT_S, Plan
from bench.servers import Client, Target, daemon_warnings, unique

# -- many clients ---------------------------------------------------------------------------------


def w_probe(ready: Callable[[], float], t: Target, seconds: float, max_ops: int) -> dict[str, Any]:
    """Another client: connected before the crowd; times its calls while the crowd idles."""
    c = Client(t)
    op = c.m.ping if t.system == "managerd" else c.value(unique("probe")).get
    op()
    ready()
    r = measure([op], seconds, max_ops, t.pid)
    c.close()
    return r


def w_idle_managerd(
    ready: Callable[[], float], t: Target, count: int, release: Any
) -> dict[str, Any]:
    """``count`` connect() sessions, each pinged once, held until ``release``.

    Connecting stops after CONNECT_PHASE_S; the final pings stop after
    FINAL_PINGS_S (a session that was lost reconnects on its next call).
    """
    nofile = raise_nofile(count + 256)
    threading.stack_size(256 * 1024)  # one heartbeat thread per session
    managers = []
    failures: list[str] = []
    started = time.monotonic()
    for _ in range(count):
        if time.monotonic() - started > CONNECT_PHASE_S:
            failures.append(f"stopped connecting after {CONNECT_PHASE_S:.0f}s")
            break
        try:
            m = connect(t.address, authkey=t.authkey, connect_timeout_s=5)
            m.ping()
            managers.append(m)
        except (ManagerdError, OSError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            if len(failures) >= 20:
                break
    connect_s = time.monotonic() - started
    ready()
    release.wait(GO_TIMEOUT_S)
    # A session lost and started again (lease expired, connection dropped)
    # shows as a session epoch above 1.
    replaced = sum(m.session_epoch - 1 for m in managers)
    alive = 0
    deadline = time.monotonic() + FINAL_PINGS_S
    for m in managers:
        if time.monotonic() < deadline:
            try:
                m.ping()
                alive += 1
            except ManagerdError:
                pass
        m.close()
    return {"connected": len(managers), "alive_at_end": alive, "failures": len(failures),
            "first_failures": failures[:3], "connect_s": round(connect_s, 2),
            "sessions_replaced": replaced, "nofile_soft": nofile}  # fmt: skip


def w_idle_stock(ready: Callable[[], float], t: Target, count: int, release: Any) -> dict[str, Any]:
    """``count`` stock connections: a thread each (a stock proxy connects per thread)."""
    nofile = raise_nofile(count + 256)
    threading.stack_size(256 * 1024)
    c = Client(t)
    v = c.value("idle")
    hold = threading.Event()
    opened: list[int] = []
    failures: list[str] = []

    def one(done: threading.Event) -> None:
        try:
            v.get()
            opened.append(1)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        done.set()
        hold.wait(GO_TIMEOUT_S)

    started = time.monotonic()
    threads = []
    # One at a time, as the managerd clients connect: the stock listener's
    # backlog is 16, and a burst of connects beyond it waits for SYN retries.
    for _ in range(count):
        done = threading.Event()
        th = threading.Thread(target=one, args=(done,), daemon=True)
        th.start()
        threads.append(th)
        if not done.wait(60):
            failures.append("no connection within 60s")
            break
    connect_s = time.monotonic() - started
    ready()
    release.wait(GO_TIMEOUT_S)
    hold.set()
    for th in threads:
        th.join(10)
    return {"connected": len(opened), "alive_at_end": len(opened), "failures": len(failures),
            "first_failures": failures[:3], "connect_s": round(connect_s, 2),
            "sessions_replaced": 0, "nofile_soft": nofile}  # fmt: skip


def run_idle(t: Target, clients: int, procs: int, plan: Plan) -> dict[str, Any]:
    """A probe client connects, then ``clients`` idle ones; the probe's calls are timed."""
    worker = w_idle_managerd if t.system == "managerd" else w_idle_stock
    print(f"    {clients} idle clients on {t.name} (server pid {t.pid})", flush=True)
    gang = Gang()
    release = CTX.Event()
    rss_empty = vmrss_mb(t.pid)
    gang.spawn(w_probe, t, max(plan.seconds, 0.25), plan.max_ops)
    try:
        gang.wait_ready(1)
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        started = time.monotonic()
        for share in shares:
            gang.spawn(worker, t, share, release)
        gang.wait_ready(procs)
        connect_s = time.monotonic() - started
        time.sleep(0.5)  # let the daemon settle (freed buffers, heartbeats)
        rss_idle = vmrss_mb(t.pid)
        gang.go()
        _, probe = gang.result(plan.seconds + 120)
        rss_after = vmrss_mb(t.pid)
        release.set()
        crowd = [gang.result(GO_TIMEOUT_S)[1] for _ in range(procs)]
    finally:
        release.set()
        gang.join()
    return {
        "clients": clients,
        "processes": procs,
        "connected": sum(r["connected"] for r in crowd),
        "alive_at_end": sum(r["alive_at_end"] for r in crowd),
        "failures": sum(r["failures"] for r in crowd),
        "sessions_replaced": sum(r["sessions_replaced"] for r in crowd),
        "daemon_log": daemon_warnings(t.pid) if t.system == "managerd" else None,
        "first_failures": [f for r in crowd for f in r["first_failures"]][:3],
        "connect_all_s": round(connect_s, 2),
        "server_rss_mb_before": round(rss_empty, 1),
        "server_rss_mb": round(max(rss_idle, rss_after), 1),
        "server_open_files_limit": open_files_limit(t.pid),
        "client_open_files_soft": crowd[0]["nofile_soft"] if crowd else None,
        "probe": probe,
    }


def w_blocked_consumers(
    t: Target, name: str, indices: list[int], commands: Any, out: Any, ready_q: Any
) -> None:
    """Consumers ``indices`` (a connection each); ``("go", i)`` makes consumer i call get()."""
    raise_nofile(2 * len(indices) + 256)
    threading.stack_size(256 * 1024)
    events = {i: threading.Event() for i in indices}
    clients: list[Client] = []
    queues: dict[int, Any] = {}
    opened = threading.Event()

    def consume(i: int) -> None:
        q = queues[i]
        try:
            q.qsize()  # (stock: opens this thread's connection) before get() is timed
        except BaseException:
            ready_q.put(("error", traceback.format_exc()))
            return
        opened.set()
        if not events[i].wait(GO_TIMEOUT_S):
            return
        try:
            item = q.get(True, GO_TIMEOUT_S)
            out.put((i, item, time.monotonic()))
        except BaseException as exc:
            out.put((i, f"error: {type(exc).__name__}: {exc}", time.monotonic()))

    threads = []
    try:
        if t.system == "stock":
            c = Client(t)
            clients.append(c)
            shared = c.queue(name)
        for i in indices:
            if t.system == "managerd":
                c = Client(t)
                clients.append(c)
                queues[i] = c.queue(name)
            else:
                queues[i] = shared
            # One connection at a time (the stock listener's backlog is 16).
            opened.clear()
            th = threading.Thread(target=consume, args=(i,), daemon=True)
            th.start()
            threads.append(th)
            if not opened.wait(60):
                raise TimeoutError(f"consumer {i} did not connect within 60s")
    except BaseException:
        ready_q.put(("error", traceback.format_exc()))
        return
    ready_q.put(("ready", len(indices)))
    for _ in range(len(indices) + 1):
        if not commands.poll(GO_TIMEOUT_S):
            break
        command = commands.recv()
        if command[0] == "stop":
            break
        events[command[1]].set()
    for th in threads:
        th.join(1)
    for c in clients:
        c.close()


def run_blocked(t: Target, consumers: int, procs: int, plan: Plan) -> dict[str, Any]:
    """``consumers`` blocked in get(), in a known arrival order; one put wakes the next."""
    name = unique("blocked")
    out: Any = CTX.Queue()
    ready_q: Any = CTX.Queue()
    pipes = []
    workers = []
    owner = {}
    for p in range(procs):
        indices = list(range(p, consumers, procs))
        for i in indices:
            owner[i] = p
        receiver, sender = CTX.Pipe(duplex=False)
        proc = CTX.Process(
            target=w_blocked_consumers, args=(t, name, indices, receiver, out, ready_q), daemon=True
        )
        proc.start()
        pipes.append(sender)
        workers.append(proc)
    check = Client(t)
    q = check.queue(name)
    if t.system == "managerd":

        def waiters() -> int:
            return int(check.m.status()["objects"][name]["waiters"])
    else:
        waiters = q.waiters
    arrival_ok = fifo_ok = one_each = True
    wakes: list[float] = []
    errors: list[str] = []
    try:
        for _ in range(procs):
            what, info = ready_q.get(timeout=GO_TIMEOUT_S)
            if what != "ready":
                raise RuntimeError(f"a consumer process failed:\n{info}")
        # Arrival order: consumer i calls get() only once i-1 is seen parked.
        started = time.monotonic()
        for i in range(consumers):
            pipes[owner[i]].send(("go", i))
            deadline = time.monotonic() + 10
            delay = 0.0002
            while waiters() != i + 1 and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
            if waiters() != i + 1:
                arrival_ok = False
                errors.append(f"consumer {i} not seen waiting (waiters={waiters()})")
                break
        arrive_s = time.monotonic() - started
        # The parked count is checked every CHECK_EVERY puts (a managerd status()
        # with 1,000 sessions costs ~10 ms of daemon time); the wake right
        # after a check is left out of the latencies.
        after_check = False
        woken = 0
        for k in range(consumers if arrival_ok else 0):
            t_put = time.monotonic()
            q.put(k)
            index, item, t_recv = out.get(timeout=30)
            woken += 1
            if not after_check:
                wakes.append(t_recv - t_put)
            after_check = False
            if index != k or item != k:
                fifo_ok = False
                errors.append(f"put {k} woke consumer {index} with {item!r}")
            if k % CHECK_EVERY == CHECK_EVERY - 1 or k == consumers - 1:
                left = waiters()
                after_check = True
                if left != consumers - k - 1:
                    one_each = False
                    errors.append(f"after put {k}: {left} waiting, not {consumers - k - 1}")
        try:
            extra = out.get(timeout=0.2)
            one_each = False
            errors.append(f"an extra wake: {extra!r}")
        except queue.Empty:
            pass
    finally:
        for pipe in pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for proc in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        check.close()
    return {
        "consumers": consumers,
        "processes": procs,
        "arrivals_s": round(arrive_s, 2) if arrival_ok else None,
        "wake_p50_ms": pct(wakes, 0.5) * 1000,
        "wake_p99_ms": pct(wakes, 0.99) * 1000,
        "wake_max_ms": max(wakes, default=0.0) * 1000,
        "woken": woken,
        "wakes_timed": len(wakes),
        "fifo": fifo_ok and arrival_ok,
        "exactly_one_per_put": one_each,
        "ok": arrival_ok and fifo_ok and one_each and woken == consumers,
        "errors": errors[:5],
    }
