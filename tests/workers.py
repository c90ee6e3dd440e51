"""Module-level client functions that tests run in separate processes.

Each takes ``(address, authkey, name, ...)``, connects with its own
``managerd_client.connect()`` and works on the named objects of a real
daemon. A worker reports failure by raising, so its exit code is non-zero;
the test joins it and asserts the code is 0. The helpers at the bottom
start and join processes (spawn by default; ``fork`` where a test asks).
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterable
from multiprocessing.process import BaseProcess
from typing import Any

import managerd_client
from managerd_client import Manager

JOIN_TIMEOUT_S = 60.0
WAIT_S = 30.0  # how long a worker waits for the test to do its part


def _connect(address: str, authkey: bytes) -> Manager:
    return managerd_client.connect(address, authkey=authkey)


# -- queues ---------------------------------------------------------------------------


def produce(address: str, authkey: bytes, name: str, items: list[Any]) -> None:
    with _connect(address, authkey) as m:
        q = m.Queue(name)
        for item in items:
            q.put(item)


def consume(address: str, authkey: bytes, name: str, out: str) -> None:
    """Get until a None sentinel; then report everything received at once."""
    with _connect(address, authkey) as m:
        q = m.Queue(name)
        got = []
        while True:
            item = q.get(timeout=WAIT_S)
            if item is None:
                break
            got.append(item)
        m.list(out).extend(got)


def joinable_worker(address: str, authkey: bytes, name: str, out: str) -> None:
    """Square each item into the dict ``out``; task_done after each (and the sentinel)."""
    with _connect(address, authkey) as m:
        q = m.JoinableQueue(name)
        results = m.dict(out)
        while True:
            item = q.get(timeout=WAIT_S)
            try:
                if item is None:
                    return
                results[item] = item * item
            finally:
                q.task_done()


def task_done_worker(address: str, authkey: bytes, name: str, out: str) -> None:
    """A plain Queue's consumer: record each item in ``out``, then task_done (to None)."""
    with _connect(address, authkey) as m:
        q = m.Queue(name)
        results = m.dict(out)
        while True:
            item = q.get(timeout=WAIT_S)
            if item is not None:
                results[item] = item * 2
            q.task_done()
            if item is None:
                return


def put_when_full(address: str, authkey: bytes, name: str, item: Any, ready: str) -> None:
    """A blocking put on a full queue: it completes once the test makes room."""
    with _connect(address, authkey) as m:
        q = m.Queue(name)
        m.Event(ready).set()
        q.put(item, timeout=WAIT_S)


def put_many_until(
    address: str, authkey: bytes, name: str, items: list[Any], timeout_s: float
) -> None:
    """A put_many that must end in queue.Full after ``timeout_s`` (or be killed first)."""
    with _connect(address, authkey) as m:
        try:
            m.Queue(name).put_many(items, timeout=timeout_s)
        except queue.Full:
            return
        raise AssertionError("put_many did not time out")


def reserve_and_exit(address: str, authkey: bytes, name: str, out: str) -> None:
    """Reserve one message, report it, and end the session without acking."""
    with _connect(address, authkey) as m:
        msg = m.Queue(name).reserve(timeout=WAIT_S)
        m.Queue(out).put(msg.value)


def relay_proxy(address: str, authkey: bytes, name: str) -> None:
    """Receive a proxy through a managerd queue and use it from here."""
    with _connect(address, authkey) as m:
        proxy, key, value = m.Queue(name).get(timeout=WAIT_S)
        proxy[key] = value


# -- pipes --------------------------------------------------------------------------------


def pipe_echo(address: str, authkey: bytes, name: str) -> None:
    """Answer each message on end 1 with (message, 'echo') until None, then close."""
    with _connect(address, authkey) as m:
        _, end = m.Pipe(name)
        while (msg := end.recv(timeout=WAIT_S)) is not None:
            end.send((msg, "echo"))
        end.close()


def pipe_expect_eof(address: str, authkey: bytes, name: str) -> None:
    """Block in recv() on end 1 until the test closes end 0: EOFError, nothing else."""
    with _connect(address, authkey) as m:
        _, end = m.Pipe(name)
        try:
            msg = end.recv(timeout=WAIT_S)
        except EOFError:
            return
        raise AssertionError(f"recv() returned {msg!r} instead of raising EOFError")


def pipe_write(address: str, authkey: bytes, name: str, items: list[Any]) -> None:
    """Write ``items`` on the write-only end of a one-way pipe, then close it."""
    with _connect(address, authkey) as m:
        _, writer = m.Pipe(name, duplex=False)
        for item in items:
            writer.send(item)
        writer.close()


def answer_on_end(end: Any) -> None:
    """A pipe end that arrived as a Process argument: answer what is waiting."""
    end.send((end.recv(timeout=WAIT_S), "pong"))


# -- mappings -------------------------------------------------------------------------------


def fill_dict_and_list(
    address: str, authkey: bytes, dict_name: str, list_name: str, tag: str, n: int
) -> None:
    with _connect(address, authkey) as m:
        d, lst = m.dict(dict_name), m.list(list_name)
        for i in range(n):
            d[f"{tag}-{i}"] = (tag, i)
            lst.append((tag, i))


def increment_value(address: str, authkey: bytes, name: str, n: int) -> None:
    """Read-modify-write under get_lock(): two round trips that must not interleave."""
    with _connect(address, authkey) as m:
        v = m.Value(name, "i")
        lock = v.get_lock()
        for _ in range(n):
            with lock:
                v.value += 1


def increment_array(address: str, authkey: bytes, name: str, index: int, n: int) -> None:
    with _connect(address, authkey) as m:
        a = m.Array(name, "i", 4)
        lock = a.get_lock()
        for _ in range(n):
            with lock:
                a[index] += 1


def set_namespace(address: str, authkey: bytes, name: str, attrs: dict[str, Any]) -> None:
    with _connect(address, authkey) as m:
        ns = m.Namespace(name)
        for key, value in attrs.items():
            setattr(ns, key, value)


# -- locks ------------------------------------------------------------------------------


def _critical_section(m: Manager, events: str, tag: str) -> None:
    """Record entering and leaving, with round trips in between to widen the window."""
    log = m.list(events)
    log.append(("enter", tag))
    scratch = m.dict(events + ".scratch")
    for i in range(3):
        scratch[tag] = i
    log.append(("exit", tag))


def lock_worker(
    address: str, authkey: bytes, name: str, kind: str, events: str, tag: str, n: int
) -> None:
    with _connect(address, authkey) as m:
        lock = m.Lock(name) if kind == "Lock" else m.RLock(name)
        for _ in range(n):
            with lock:
                if kind == "RLock":
                    with lock:  # re-entrant in the same thread
                        _critical_section(m, events, tag)
                else:
                    _critical_section(m, events, tag)


def semaphore_worker(
    address: str, authkey: bytes, name: str, counter: str, peaks: str, n: int
) -> None:
    """Count holders on the daemon while holding a permit; log each count seen."""
    with _connect(address, authkey) as m:
        sem = m.Semaphore(name)
        current = m.Value(counter, "i")
        seen = m.list(peaks)
        for _ in range(n):
            with sem:
                seen.append(current.add(1))
                current.get()
                current.add(-1)


def hold_semaphore(address: str, authkey: bytes, name: str, barrier: str, done: str) -> None:
    """Hold a permit while meeting the others at ``barrier``; release on ``done``."""
    with _connect(address, authkey) as m:
        sem = m.Semaphore(name)
        if not sem.acquire(timeout=WAIT_S):
            raise AssertionError("could not get a permit")
        m.Barrier(barrier).wait(timeout=WAIT_S)
        if not m.Event(done).wait(timeout=WAIT_S):
            raise AssertionError("the test never set done")
        sem.release()


def hold_lock_until(address: str, authkey: bytes, name: str, held: str, done: str) -> None:
    """Take the Lock, say so, and release it when the test sets ``done``."""
    with _connect(address, authkey) as m:
        lock = m.Lock(name)
        lock.acquire()
        m.Event(held).set()
        if not m.Event(done).wait(timeout=WAIT_S):
            raise AssertionError("the test never set done")
        lock.release()


def release_lock(address: str, authkey: bytes, name: str) -> None:
    """A plain Lock may be released by a client that did not acquire it."""
    with _connect(address, authkey) as m:
        m.Lock(name).release()


# -- events, conditions, barriers ----------------------------------------------------------


def wait_event(address: str, authkey: bytes, name: str, out: str, tag: str) -> None:
    with _connect(address, authkey) as m:
        if not m.Event(name).wait(timeout=WAIT_S):
            raise AssertionError("the event was never set")
        m.list(out).append(tag)


def wait_condition(address: str, authkey: bytes, name: str, out: str, tag: str) -> None:
    """One ``wait()``; logs the tag and whether it still holds the lock on waking."""
    with _connect(address, authkey) as m:
        cond = m.Condition(name)
        with cond:
            woke = cond.wait(timeout=WAIT_S)
            # wait() returns holding the lock again: notify needs it.
            cond.notify(0)
            m.list(out).append((tag, woke))


def wait_for_flag(address: str, authkey: bytes, name: str, flag: str, out: str, tag: str) -> None:
    with _connect(address, authkey) as m:
        cond = m.Condition(name)
        ns = m.Namespace(flag)
        with cond:
            value = cond.wait_for(lambda: getattr(ns, "go", 0) >= 1, timeout=WAIT_S)
            m.list(out).append((tag, value))


def barrier_wait(address: str, authkey: bytes, name: str, out: str) -> None:
    with _connect(address, authkey) as m:
        index = m.Barrier(name).wait(timeout=WAIT_S)
        m.list(out).append(index)


def barrier_expect_broken(address: str, authkey: bytes, name: str, out: str, tag: str) -> None:
    with _connect(address, authkey) as m:
        try:
            m.Barrier(name).wait(timeout=WAIT_S)
        except threading.BrokenBarrierError:
            m.list(out).append(tag)
        else:
            raise AssertionError("the barrier did not break")


# -- proxies passed to children ---------------------------------------------------------------


def use_passed_proxies(q: Any, d: Any, lock: Any, value: Any) -> None:
    """Proxies that arrived as Process arguments (pickled for spawn, inherited by fork)."""
    with lock:
        d["child"] = q.get(timeout=WAIT_S)
        q.put(("reply", value))


# -- running processes -------------------------------------------------------------------------


def start(target: Callable[..., None], *args: Any, method: str = "spawn") -> BaseProcess:
    ctx: Any = multiprocessing.get_context(method)  # typeshed's BaseContext has no Process
    process: BaseProcess = ctx.Process(target=target, args=args)
    process.start()
    return process


def start_all(
    target: Callable[..., None], arg_lists: Iterable[tuple[Any, ...]], method: str = "spawn"
) -> list[BaseProcess]:
    return [start(target, *args, method=method) for args in arg_lists]


def join_all(processes: Iterable[BaseProcess], timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Join every process; kill stragglers; assert each exited with code 0."""
    processes = list(processes)
    for p in processes:
        p.join(timeout_s)
    codes = []
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)
        codes.append(p.exitcode)
    assert codes == [0] * len(processes), f"worker exit codes {codes}"
