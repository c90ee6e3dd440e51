"""Hostile timeouts: the exception type the stdlib object raises in the same state.

Every blocking call is tried with NaN, the infinities, huge and negative
numbers and values of the wrong type, on an object in a state where the
call would wait (an empty queue, a held lock...) and, where it differs, in
one where it would not. The store's outcome must be the stdlib object's:
the same value (a fencing token counts as True), or an error of the same
type. Deliberate differences (README "Checked against models"):

- a NaN wait is a ValueError (the stdlib spins for ever on some calls,
  returns at once on others);
- a timeout's type is checked even when no wait is needed (a semaphore
  with a permit free takes ``acquire(timeout="1")`` in the stdlib);
- ``-1`` waits for ever for semaphores too, as for locks (README "Errors":
  what older clients send for None; the managerd client sends 0 for a
  caller's -1), where ``threading.Semaphore`` does not wait.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest

from contract.harness import ETCD_WHOLE, DaemonBug, StoreHarness
from contract.outcomes import Outcome, outcome, same_outcome

HOSTILE = [
    float("nan"), float("inf"), -float("inf"), 10**30, -(10**30), 1e300, "1", b"x", [0.01],
    -1, -0.5, 0, 0.0, -0.0, False, 0.01,
]  # fmt: skip


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _full_queue() -> queue.Queue[int]:
    q: queue.Queue[int] = queue.Queue(1)
    q.put(0)
    return q


def _held_condition() -> threading.Condition:
    cond = threading.Condition()
    cond.acquire()
    return cond


#: name -> (the stdlib call, the store's object and call, whether the call must wait)
Case = tuple[Callable[[Any], Any], Callable[[StoreHarness, str, Any], Any], bool]


def _store_queue_get(s: StoreHarness, name: str, v: Any) -> Any:
    return s.call(s.open("Queue", name), "get", True, v)


def _store_queue_put(s: StoreHarness, name: str, v: Any) -> Any:
    q = s.open("Queue", name, maxsize=1)
    s.call(q, "put", 0)
    return s.call(q, "put", 1, True, v)


def _store_lock(held: bool) -> Callable[[StoreHarness, str, Any], Any]:
    def run(s: StoreHarness, name: str, v: Any) -> Any:
        lock = s.open("Lock", name)
        if held:
            s.call(lock, "acquire", client=s.new_client())
        return bool(s.call(lock, "acquire", True, v))

    return run


def _store_semaphore(value: int) -> Callable[[StoreHarness, str, Any], Any]:
    def run(s: StoreHarness, name: str, v: Any) -> Any:
        return bool(s.call(s.open("Semaphore", name, value=value), "acquire", True, v))

    return run


def _store_event(s: StoreHarness, name: str, v: Any) -> Any:
    return s.call(s.open("Event", name), "wait", v)


def _store_condition(s: StoreHarness, name: str, v: Any) -> Any:
    cond = s.open("Condition", name)
    s.call(cond, "acquire")
    return s.call(cond, "wait", v)


def _store_barrier(s: StoreHarness, name: str, v: Any) -> Any:
    return s.call(s.open("Barrier", name, parties=2), "wait", v)


def _stdlib_poll(ready: bool, v: Any) -> Any:
    """``Connection.poll(v)`` on a one-way stdlib pipe (an OS pipe, no socket)."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        if ready:
            writer.send("m")
        return reader.poll(v)
    finally:
        reader.close()
        writer.close()


def _store_poll(ready: bool) -> Callable[[StoreHarness, str, Any], Any]:
    def run(s: StoreHarness, name: str, v: Any) -> Any:
        pipe = s.open("Pipe", name)
        if ready:
            s.call(pipe, "send", 0, "m")
        return s.call(pipe, "poll", 1, v)

    return run


CASES: dict[str, Case] = {
    "queue-get-empty": (lambda v: queue.Queue().get(True, v), _store_queue_get, True),
    "queue-put-full": (lambda v: _full_queue().put(1, True, v), _store_queue_put, True),
    "lock-free": (lambda v: threading.Lock().acquire(True, v), _store_lock(False), False),
    "lock-held": (lambda v: _held_lock().acquire(True, v), _store_lock(True), True),
    "semaphore-0": (lambda v: threading.Semaphore(0).acquire(True, v), _store_semaphore(0), True),
    "semaphore-1": (lambda v: threading.Semaphore(1).acquire(True, v), _store_semaphore(1), False),
    "event-unset": (lambda v: threading.Event().wait(v), _store_event, True),
    "condition-wait": (lambda v: _held_condition().wait(v), _store_condition, True),
    "barrier-wait": (lambda v: threading.Barrier(2).wait(v), _store_barrier, True),
    "pipe-poll-empty": (lambda v: _stdlib_poll(False, v), _store_poll(False), True),
    "pipe-poll-ready": (lambda v: _stdlib_poll(True, v), _store_poll(True), False),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))


def expected(case: str, value: Any) -> Outcome:
    """What the stdlib does, with the deliberate differences of the module docstring."""
    stdlib, _, waits = CASES[case]
    if isinstance(value, float) and math.isnan(value):
        if case == "lock-free" or not waits:
            # threading's locks refuse NaN always; a free semaphore takes it.
            return outcome(lambda: stdlib(value))
        return Outcome(error=ValueError("NaN"))
    if value == -1 and case in ("lock-held", "semaphore-0"):
        raise AssertionError("-1 waits for ever: not a hostile value for a held lock")
    want = outcome(lambda: stdlib(value))
    if want.ok and not _is_number(value):
        return Outcome(error=TypeError(f"timeout {value!r}"))  # checked even with no wait
    return want


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_timeout(store: StoreHarness, case: str, value: Any) -> None:
    if value == -1 and case in ("lock-held", "semaphore-0"):
        value = -2  # -1 is "for ever" here: -2 is the hostile one
    want = expected(case, value)
    _, run, _ = CASES[case]
    got = outcome(lambda: run(store, "x", value))
    if isinstance(want.value, bool) or isinstance(got.value, bool):
        got = Outcome(value=bool(got.value)) if got.ok else got
    same_outcome(got, want, f"{case} with timeout {value!r}")
    # A refused call leaves nothing parked.
    for name, typeid in store.objects():
        assert store.waiters(store.open(typeid, name)) == 0, f"{typeid} {name} has a waiter"


def test_minus_one_waits_for_ever_for_a_semaphore(store: StoreHarness) -> None:
    sem = store.open("Semaphore", "s", value=0)
    waiting = store.start(sem, "acquire", True, -1)
    store.sleep(0.02)
    assert not waiting.done()
    store.call(sem, "release")
    assert waiting.result()


# (Not 10**30: threading.Semaphore.release notifies n times, for ever.)
@pytest.mark.parametrize("n", [1.5, "1", None, [1], -(10**30)])
def test_semaphore_release_of_a_bad_count(store: StoreHarness, n: Any) -> None:
    sem = store.open("Semaphore", "s", value=0)
    got = outcome(lambda: store.call(sem, "release", n))
    want = outcome(lambda: threading.Semaphore(0).release(n))
    if want.ok:  # a float count: the stdlib adds it, permits here are whole
        assert isinstance(got.error, TypeError), got
    else:
        same_outcome(got, want, f"release({n!r})")
    assert store.call(sem, "get_value") == 0


@pytest.mark.parametrize(
    ("blocking", "timeout"),
    [(False, 1), (False, 0), (False, 0.5), (False, None), (False, float("nan")),
     (True, -2), (True, None), (0, -1), (2, -1), ("", -1), (None, -1), (1.0, 0.01),
     (None, "x"), ([], float("nan"))],
)  # fmt: skip
def test_lock_acquire_blocking_and_timeout_together(
    store: StoreHarness, blocking: Any, timeout: Any
) -> None:
    lock = store.open("Lock", "l")
    got = outcome(lambda: bool(store.call(lock, "acquire", blocking, timeout)))
    same_outcome(got, outcome(lambda: threading.Lock().acquire(blocking, timeout)))


#: Builtin values of every kind a request may carry, hostile ones included.
ANY_ARGUMENT = [
    None, True, -1, 0, 2, 10**30, -(2**63), 2**63, 1.5, float("nan"), float("inf"), "x", b"x",
    [1], (1, 2), {"a": 1}, slice(0, 2),
]  # fmt: skip
ALL_TYPES = [
    "Queue", "JoinableQueue", "Pipe", "dict", "list", "Namespace", "Value", "Array",
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event", "Condition", "Barrier",
]  # fmt: skip
#: A little state, so that methods reach past their emptiness checks.
SETUP: dict[str, tuple[str, tuple[Any, ...]]] = {
    "Queue": ("put", (1,)),
    "JoinableQueue": ("put", (1,)),
    "Pipe": ("send", (0, "m")),
    "dict": ("__setitem__", ("a", 1)),
    "list": ("append", (1,)),
    "Lock": ("acquire", ()),
    "RLock": ("acquire", ()),
    "Condition": ("acquire", ()),
}


#: Calls tried at once, each on an object of its own (a store that answers by round
#: trips, etcd's, answers them together).
_AT_ONCE = 64
#: Of the calls above, the share the default run makes on etcd (one in this many).
_ETCD_STRIDE = 4


@pytest.mark.parametrize(
    ("typeid", "method"),
    [("Queue", m) for m in ("put", "put_nowait", "put_many", "get_many", "reserve")]
    + [("JoinableQueue", "get_many"), ("Lock", "acquire"), ("RLock", "acquire")],
)
def test_arguments_that_do_not_fit_are_the_callers_error(
    store: StoreHarness, typeid: str, method: str
) -> None:
    """Too few or too many arguments: the caller's TypeError, never the daemon's bug
    (methods a store wraps, to count their answers, keep the method's signature)."""
    obj = store.open(typeid, "x")
    for args in [(), (1, 2, 3, 4, 5)]:
        if method in ("acquire", "reserve") and not args:
            continue  # these take none (and wait)
        if method in ("put", "put_nowait") and args:
            continue  # (1, ...) pickled: a put of 1, with bad block/timeout values
        with pytest.raises(TypeError) as raised:
            store.start(obj, method, *args).result()
        assert not isinstance(raised.value, DaemonBug)


@pytest.mark.parametrize("typeid", ALL_TYPES)
def test_no_argument_makes_a_daemon_bug(store: StoreHarness, typeid: str) -> None:
    """Every method with up to two arguments of any builtin kind: a result, a parked
    call, or the caller's error; never an exception the daemon would answer as its
    own bug (the harness raises ``DaemonBug`` for one). Each call is made on a fresh
    object in the ``SETUP`` state, and waited for until it is answered or parked."""
    methods = sorted(store.methods(typeid))
    assert methods
    calls = [
        (method, args)
        for method in methods
        for count in range(3)
        for args in itertools.product(ANY_ARGUMENT, repeat=count)
    ]
    if store.kind == "etcd" and not ETCD_WHOLE:
        # Round trips to etcd: the default run tries every fourth call (each method,
        # each kind of value still tried); MANAGERD_CONTRACT_ETCD=1 tries them all.
        calls = calls[::_ETCD_STRIDE]
    for first in range(0, len(calls), _AT_ONCE):
        batch = calls[first : first + _AT_ONCE]
        names = [f"x{i}" for i in range(len(batch))]
        objs = [store.open(typeid, name) for name in names]
        if typeid in SETUP:
            method, args = SETUP[typeid]
            for ready in [store.start(obj, method, *args) for obj in objs]:
                ready.result()
        made = []
        for obj, (method, args) in zip(objs, batch, strict=True):
            try:
                made.append(store.start(obj, method, *args))
            except DaemonBug:
                raise
            except Exception:
                continue  # the caller's error
        store.settle()  # each answered or parked
        for pending in made:
            if not pending.done():
                store.cancel(pending)
            elif not pending.future.cancelled() and pending.future.exception() is not None:
                outcome(pending.result)  # a DaemonBug, if any, is raised
        for name in names:
            store.delete(name)
