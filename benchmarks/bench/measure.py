"""Measuring: the timed loop, CPU and memory from /proc, children and gangs of workers.

Every worker function is module-level, so a forked (or spawned) child can
run it.
"""

from __future__ import annotations

import os
import platform
import queue
import resource
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.plan import CTX, GO_TIMEOUT_S

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> tuple[float, float, int]:
    """(utime, stime, minor page faults) of process ``pid`` (all its threads); seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7])


def vmrss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class CpuWindow:
    """CPU that a server process, and the whole machine, spent between start and stop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server0 = proc_cpu_s(pid)
        self.machine0 = _machine_ticks()
        self.wall0 = time.monotonic()

    def stop(self, messages: int) -> dict[str, float]:
        server1, machine1 = proc_cpu_s(self.pid), _machine_ticks()
        wall = time.monotonic() - self.wall0
        cpu = (server1[0] - self.server0[0]) + (server1[1] - self.server0[1])
        busy = (machine1[0] - self.machine0[0]) / CLK_TCK
        total = (machine1[1] - self.machine0[1]) / CLK_TCK
        return {
            "server_cpu_us_per_msg": cpu / messages * 1e6 if messages else 0.0,
            "server_cores_busy": cpu / wall if wall > 0 else 0.0,
            "machine_busy_fraction": busy / total if total > 0 else 0.0,
            "machine_cpu_us_per_msg": busy / messages * 1e6 if messages else 0.0,
        }


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def open_files_limit(pid: int) -> list[int | str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return [
                    int(soft) if soft.isdigit() else soft,
                    int(hard) if hard.isdigit() else hard,
                ]
    return []


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# -- the timed loop -------------------------------------------------------------------------------


def measure(
    ops: list[Callable[[], Any]], seconds: float, max_iters: int, server_pid: int, warmup: int = 20
) -> dict[str, Any]:
    """Run ``ops`` in turn until ``seconds`` or ``max_iters``; every call is timed.

    Returns iterations per second, p50/p99 of an iteration and of each op
    (µs), and the CPU that the client and the server process spent per
    iteration (µs; /proc utime+stime, 10 ms ticks, so only meaningful over
    a second or more).
    """
    warm_until = time.perf_counter() + seconds / 10
    for _ in range(warmup):  # bounded in time too: a stalled op (stock 32 KB) takes 88 ms
        for op in ops:
            op()
        if time.perf_counter() > warm_until:
            break
    per_op: list[list[float]] = [[] for _ in ops]
    iters: list[float] = []
    pc = time.perf_counter
    server0, client0 = proc_cpu_s(server_pid), os.times()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = pc()
    end = start + seconds
    n = 0
    t = start
    while n < max_iters:
        t = t0 = pc()
        for op, bucket in zip(ops, per_op, strict=True):
            op()
            t1 = pc()
            bucket.append(t1 - t)
            t = t1
        iters.append(t - t0)
        n += 1
        if t >= end:
            break
    elapsed = t - start
    server1, client1 = proc_cpu_s(server_pid), os.times()
    server_user, server_sys = server1[0] - server0[0], server1[1] - server0[1]
    client_user, client_sys = client1.user - client0.user, client1.system - client0.system
    server_faults = server1[2] - server0[2]
    client_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    us = 1e6
    return {
        "iterations": n,
        "elapsed_s": round(elapsed, 4),
        "rate": n / elapsed if elapsed > 0 else 0.0,
        "p50_us": pct(iters, 0.5) * us,
        "p99_us": pct(iters, 0.99) * us,
        "per_op_p50_us": [pct(b, 0.5) * us for b in per_op],
        "per_op_p99_us": [pct(b, 0.99) * us for b in per_op],
        "server_cpu_us_per_iter": (server_user + server_sys) / n * us if n else 0.0,
        "server_user_us_per_iter": server_user / n * us if n else 0.0,
        "server_sys_us_per_iter": server_sys / n * us if n else 0.0,
        "client_cpu_us_per_iter": (client_user + client_sys) / n * us if n else 0.0,
        "client_user_us_per_iter": client_user / n * us if n else 0.0,
        "client_sys_us_per_iter": client_sys / n * us if n else 0.0,
        "server_page_faults_per_iter": server_faults / n if n else 0.0,
        "client_page_faults_per_iter": client_faults / n if n else 0.0,
    }


def mean_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one measurement as one: numbers averaged, flags all-true, the rest listed."""
    if len(rounds) == 1:
        return {**rounds[0], "rate_per_round": [rounds[0].get("rate")]}
    out: dict[str, Any] = {}
    for key, first in rounds[0].items():
        values: list[Any] = [r.get(key) for r in rounds]
        if isinstance(first, bool):
            out[key] = all(values)
        elif isinstance(first, (int, float)):
            out[key] = sum(values) / len(values)
        elif isinstance(first, list) and all(isinstance(x, (int, float)) for x in first):
            out[key] = [sum(column) / len(column) for column in zip(*values, strict=True)]
        else:
            out[key] = values if any(v != first for v in values) else first
    out["rate_per_round"] = [r.get("rate") for r in rounds]
    return out


# -- running in children --------------------------------------------------------------------------


def _child_main(out: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        out.send((True, fn(*args)))
    except BaseException:
        out.send((False, traceback.format_exc()))


def in_child(fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0) -> Any:
    """``fn(*args)`` in a forked child process; its result (or its traceback as an error)."""
    receiver, sender = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_child_main, args=(sender, fn, args), daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout_s:.0f}s")
        ok, value = receiver.recv()
    except EOFError:
        ok, value = False, f"the child running {fn.__name__} died (exit {proc.exitcode})"
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        receiver.close()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in a child process:\n{value}")
    return value


class Gang:
    """Forked workers that connect, wait for one start signal, run and report.

    A worker is ``fn(ready, *args)``; it calls ``ready()`` when connected,
    which blocks until every worker is ready and returns the shared start
    instant (``time.monotonic()``, the same clock in every process).
    """

    def __init__(self) -> None:
        self.ready_q: Any = CTX.Queue()
        self.out_q: Any = CTX.Queue()
        self.go_event = CTX.Event()
        self.t_go = CTX.Value("d", 0.0, lock=False)
        self.procs: list[Any] = []
        self.early: list[tuple[int, Any]] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> int:
        index = len(self.procs)
        proc = CTX.Process(target=_gang_main, args=(self, index, fn, args), daemon=True)
        proc.start()
        self.procs.append(proc)
        return index

    def wait_ready(self, count: int, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {seen} of {count} workers got ready")
            try:
                self.ready_q.get(timeout=0.1)
                seen += 1
            except queue.Empty:
                self._check_failures()

    def _check_failures(self) -> None:
        while True:
            try:
                index, ok, value = self.out_q.get_nowait()
            except queue.Empty:
                return
            if not ok:
                raise RuntimeError(f"worker {index} failed:\n{value}")
            self.early.append((index, value))

    def go(self) -> float:
        t_go = time.monotonic() + 0.005
        self.t_go.value = t_go
        self.go_event.set()
        return t_go

    def result(self, timeout_s: float) -> tuple[int, Any]:
        if self.early:
            return self.early.pop(0)
        index, ok, value = self.out_q.get(timeout=timeout_s)
        if not ok:
            raise RuntimeError(f"worker {index} failed:\n{value}")
        return index, value

    def kill(self) -> None:
        """Kill the workers still running (hung in a call), at once."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        self.join()

    def join(self) -> None:
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)


def run_gang(
    pid: int, procs: int, counted: str, timeout_s: float, fn: Callable[..., Any], *args: Any
) -> tuple[list[dict[str, Any]], dict[str, float], float]:
    """``procs`` workers ``fn(ready, *args)`` started together, each returning
    ``{counted: n, "end": t}``: their results, the server's CPU over the run
    (``CpuWindow`` of ``pid``, per counted operation), and the seconds from the start
    signal to the last worker's end."""
    gang = Gang()
    for _ in range(procs):
        gang.spawn(fn, *args)
    try:
        gang.wait_ready(procs)
        cpu = CpuWindow(pid)
        t_go = gang.go()
        results = [gang.result(timeout_s)[1] for _ in range(procs)]
        usage = cpu.stop(sum(r[counted] for r in results))
    finally:
        gang.join()
    return results, usage, max(r["end"] for r in results) - t_go


def _gang_main(gang: Gang, index: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    def ready() -> float:
        gang.ready_q.put(index)
        if not gang.go_event.wait(GO_TIMEOUT_S):
            raise TimeoutError("no start signal")
        return float(gang.t_go.value)

    try:
        gang.out_q.put((index, True, fn(ready, *args)))
    except BaseException:
        gang.out_q.put((index, False, traceback.format_exc()))


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        import uvloop

        uvloop_version: str | None = getattr(uvloop, "__version__", None)
    except ImportError:
        uvloop_version = None
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "uvloop": uvloop_version,
        "open_files_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }
