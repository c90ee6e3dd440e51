"""Hostile timeouts: every timeout parameter of every primitive, on a real daemon.

For each (primitive, timeout parameter) a table of hostile values — NaN, the
infinities, negatives, -0.0, values beyond ``threading.TIMEOUT_MAX``, an int
too large for a float, a str, a list, a bool — is sent to the daemon (run on
uvloop and on asyncio's loop), and the outcome is compared with what the
standard-library object does in the same state, computed here by running it.
After every call the test checks that nothing was left behind: no waiter on
the object, the next item still in the queue, the lock free for another
client, the semaphore's value unchanged.

Where the stdlib has no error to give, managerd refuses rather than copies:

- NaN is a ValueError wherever the call would wait (``queue.Queue.get``,
  ``Semaphore.acquire``, ``Barrier.wait`` and ``Condition.wait_for`` spin
  for ever on it; ``Event.wait`` and ``Condition.wait`` return False).
- A non-number is a TypeError even when the call would not wait.
- ``Semaphore.acquire(timeout=-1)`` waits for ever (the client's None).
- Creation and ``extend`` durations are checked when given, not at first use.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from typing import Any

import pytest

from managerd_client import Manager

from conftest import Daemon, wait_until

NAN = float("nan")
INF = float("inf")
TIMEOUT_MAX = threading.TIMEOUT_MAX

#: (id, value): what the tables are made of.
HOSTILE: list[tuple[str, Any]] = [
    ("nan", NAN),
    ("inf", INF),
    ("-inf", -INF),
    ("-1", -1),
    ("-0.0", -0.0),
    ("1e300", 1e300),
    ("10**400", 10**400),
    ("TIMEOUT_MAX*2", TIMEOUT_MAX * 2),
    ("str", "1"),
    ("list", [1]),
    ("True", True),
]
IDS = [name for name, _ in HOSTILE]
VALUES = [value for _, value in HOSTILE]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# -- the daemon, on each event loop -------------------------------------------------------


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def loop_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("timeouts"), env={"MANAGERD_EVENT_LOOP": request.param})
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def m(loop_daemon: Daemon) -> Iterator[Manager]:
    with loop_daemon.connect() as manager:
        yield manager


@pytest.fixture
def other(loop_daemon: Daemon) -> Iterator[Manager]:
    """A second client: another session."""
    with loop_daemon.connect() as manager:
        yield manager


def waiters(m: Manager, name: str) -> int:
    described: dict[str, Any] = m.status()["objects"][name]
    count: int = described["waiters"] if "waiters" in described else described["n_waiting"]
    return count


# -- the model: the stdlib object in the same state ---------------------------------------

_STDLIB_WAIT_S = 5.0


def outcome(fn: Callable[[], Any]) -> Any:
    """What ``fn()`` returns, or the type of what it raises."""
    try:
        return fn()
    except Exception as exc:
        return type(exc)


def stdlib(fn: Callable[[Any], Any], value: Any, *, nan: bool = False) -> Any:
    """The stdlib's outcome of ``fn(value)``; ``nan``: take the stdlib's for NaN too.

    Without ``nan``, NaN is a call that would wait: the stdlib spins for
    ever or returns False on it, managerd refuses it with a ValueError (see
    the module docstring).
    """
    if _is_nan(value) and not nan:
        return ValueError
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(outcome(lambda: fn(value))), daemon=True)
    thread.start()
    thread.join(_STDLIB_WAIT_S)
    assert box, f"the stdlib blocked on {value!r}: not a row for this table"
    return box[0]


def check(got: Any, expected: Any) -> None:
    if isinstance(expected, type):
        assert got is expected or (isinstance(got, type) and issubclass(got, expected)), (
            f"expected {expected.__name__}, got {got!r}"
        )
    else:
        assert got == expected


def _std_queue_get(v: Any) -> Any:
    return queue.Queue().get(timeout=v)


def _std_queue_put(v: Any) -> Any:
    q: queue.Queue[int] = queue.Queue(1)
    q.put(1)
    return q.put(2, timeout=v)


def _std_queue_get_ready(v: Any) -> Any:
    q: queue.Queue[str] = queue.Queue()
    q.put("ready")
    return q.get(timeout=v)


def _std_lock_held(v: Any, factory: Callable[[], Any] = threading.Lock) -> Any:
    lock = factory()
    holder = threading.Thread(target=lock.acquire)
    holder.start()
    holder.join()
    return lock.acquire(timeout=v)


def _std_lock_free(v: Any) -> Any:
    return threading.Lock().acquire(timeout=v)


def _std_lock_nonblocking(v: Any) -> Any:
    return threading.Lock().acquire(False, v)


def _std_condition_wait(v: Any) -> Any:
    cond = threading.Condition()
    with cond:
        return cond.wait(v)


def _std_condition_wait_for(v: Any) -> Any:
    cond = threading.Condition()
    with cond:
        return cond.wait_for(lambda: False, v)


def _std_poll(v: Any) -> Any:
    reader, writer = multiprocessing.Pipe()
    try:
        return reader.poll(v)
    finally:
        reader.close()
        writer.close()


def _std_poll_ready(v: Any) -> Any:
    reader, writer = multiprocessing.Pipe()
    try:
        writer.send(1)
        return reader.poll(v)
    finally:
        reader.close()
        writer.close()


# -- queues -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", VALUES, ids=IDS)
@pytest.mark.parametrize("method", ["get", "get_many", "reserve"])
def test_queue_getters(m: Manager, uniq: str, method: str, value: Any) -> None:
    q = m.Queue(uniq)
    call = {
        "get": lambda: q.get(timeout=value),
        "get_many": lambda: q.get_many(1, timeout=value),
        "reserve": lambda: q.reserve(timeout=value),
    }[method]
    check(outcome(call), stdlib(_std_queue_get, value))
    assert waiters(m, uniq) == 0
    q.put("precious")
    assert q.qsize() == 1
    assert q.get_nowait() == "precious"
    assert m.status()["objects"][uniq]["reserved"] == 0


@pytest.mark.parametrize("value", VALUES, ids=IDS)
@pytest.mark.parametrize("method", ["put", "put_many"])
def test_queue_putters(m: Manager, uniq: str, method: str, value: Any) -> None:
    q = m.Queue(uniq, maxsize=1)
    q.put("first")
    call = {
        "put": lambda: q.put("second", timeout=value),
        "put_many": lambda: q.put_many(["second"], timeout=value),
    }[method]
    check(outcome(call), stdlib(_std_queue_put, value))
    assert waiters(m, uniq) == 0
    assert q.get_nowait() == "first"
    assert q.qsize() == 0  # no putter left to slip its item in
    q.put_nowait("third")
    assert q.get_nowait() == "third"


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_queue_get_ready_as_the_stdlib(m: Manager, uniq: str, value: Any) -> None:
    """An item is there: the stdlib checks the type, the sign and the int's size only."""
    q = m.Queue(uniq)
    q.put("ready")
    check(outcome(lambda: q.get(timeout=value)), stdlib(_std_queue_get_ready, value, nan=True))


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_nonblocking_queue_calls_ignore_the_timeout(m: Manager, uniq: str, value: Any) -> None:
    q = m.Queue(uniq)
    with pytest.raises(queue.Empty):
        q.get(False, value)
    check(outcome(lambda: queue.Queue().get(False, value)), queue.Empty)


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_joinable_queue_join(m: Manager, uniq: str, value: Any) -> None:
    q = m.JoinableQueue(uniq)
    q.put("task")
    expected = stdlib(_std_queue_get, value)  # join(timeout) follows get's rules
    check(
        outcome(lambda: q.join(timeout=value)),
        TimeoutError if expected is queue.Empty else expected,
    )
    assert waiters(m, uniq) == 0
    assert q.get_nowait() == "task"
    q.task_done()
    q.join(timeout=1)


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_queue_visibility_timeout_and_extend(m: Manager, uniq: str, value: Any) -> None:
    """Durations with no stdlib model: a positive number up to TIMEOUT_MAX."""
    expected: Any
    if isinstance(value, (str, list)):
        expected = TypeError
    elif _is_nan(value) or value <= 0:
        expected = ValueError
    elif value > TIMEOUT_MAX:
        expected = OverflowError
    else:
        expected = None
    created = outcome(lambda: m.Queue(uniq, visibility_timeout_s=value))
    if expected is None:
        assert not isinstance(created, type)
    else:
        check(created, expected)
        assert uniq not in m.status()["objects"]
    q = m.Queue(uniq + ".x")
    q.put("item")
    msg = q.reserve(timeout=1)
    check(outcome(lambda: msg.extend(value)), expected)
    msg.nack()  # still this session's reservation: the failed extend changed nothing
    assert q.get_nowait() == "item"


# -- pipes --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_pipe_recv(m: Manager, uniq: str, value: Any) -> None:
    near, far = m.Pipe(uniq)
    expected = stdlib(_std_queue_get, value)  # recv(timeout) follows get's rules
    check(
        outcome(lambda: near.recv(timeout=value)),
        TimeoutError if expected is queue.Empty else expected,
    )
    assert waiters(m, uniq) == 0
    far.send("precious")
    assert near.recv(timeout=1) == "precious"


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_pipe_poll(m: Manager, uniq: str, value: Any) -> None:
    near, far = m.Pipe(uniq)
    check(outcome(lambda: near.poll(value)), stdlib(_std_poll, value))
    assert waiters(m, uniq) == 0
    far.send("precious")
    assert near.recv(timeout=1) == "precious"


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_pipe_poll_ready_as_the_stdlib(m: Manager, uniq: str, value: Any) -> None:
    near, far = m.Pipe(uniq)
    far.send("ready")
    check(outcome(lambda: near.poll(value)), stdlib(_std_poll_ready, value, nan=True))
    assert near.recv(timeout=1) == "ready"


# -- locks --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [*VALUES, None], ids=[*IDS, "None"])
@pytest.mark.parametrize("typeid", ["Lock", "RLock"])
def test_lock_acquire_free(m: Manager, other: Manager, uniq: str, typeid: str, value: Any) -> None:
    """threading's locks check the timeout even when free: so does the daemon."""
    lock = getattr(m, typeid)(uniq)
    got = outcome(lambda: lock.acquire(timeout=value))
    check(got, stdlib(_std_lock_free, value, nan=True))
    if got is True:
        lock.release()
    assert not lock.locked()
    theirs = getattr(other, typeid)(uniq)
    assert theirs.acquire(timeout=1) is True
    theirs.release()


@pytest.mark.parametrize(
    "value", [v for v in VALUES if v != -1] + [None], ids=[*(i for i in IDS if i != "-1"), "None"]
)
@pytest.mark.parametrize("typeid", ["Lock", "RLock"])
def test_lock_acquire_held(m: Manager, other: Manager, uniq: str, typeid: str, value: Any) -> None:
    """Held by another client (-1 is "for ever", not a row)."""
    theirs = getattr(other, typeid)(uniq)
    assert theirs.acquire(timeout=1)
    lock = getattr(m, typeid)(uniq)
    factory = threading.Lock if typeid == "Lock" else threading.RLock
    check(
        outcome(lambda: lock.acquire(timeout=value)),
        stdlib(lambda v: _std_lock_held(v, factory), value, nan=True),
    )
    assert waiters(m, uniq) == 0
    token = theirs.fencing_token
    theirs.release()
    assert not lock.locked()  # no parked waiter of ours took it
    assert theirs.acquire(timeout=1) is True
    assert theirs.fencing_token > (token or 0)  # tokens follow the clock (tokens.py)
    theirs.release()


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_lock_acquire_nonblocking(m: Manager, uniq: str, value: Any) -> None:
    lock = m.Lock(uniq)
    got = outcome(lambda: lock.acquire(False, value))
    check(got, stdlib(_std_lock_nonblocking, value, nan=True))
    if got is True:
        lock.release()
    assert not lock.locked()


@pytest.mark.parametrize("value", [v for v in VALUES if v != -1], ids=[i for i in IDS if i != "-1"])
@pytest.mark.parametrize("typeid", ["Semaphore", "BoundedSemaphore"])
def test_semaphore_acquire(m: Manager, other: Manager, uniq: str, typeid: str, value: Any) -> None:
    """No permit left: the call would wait. (-1 waits for ever: the client's None.)"""
    sem = getattr(m, typeid)(uniq, 1)
    theirs = getattr(other, typeid)(uniq, 1)
    assert theirs.acquire(timeout=1)
    check(
        outcome(lambda: sem.acquire(timeout=value)),
        stdlib(lambda v: getattr(threading, typeid)(0).acquire(timeout=v), value),
    )
    assert waiters(m, uniq) == 0
    assert sem.get_value() == 0
    theirs.release()
    assert sem.get_value() == 1  # no parked waiter of ours took the permit
    assert theirs.acquire(timeout=1) is True
    theirs.release()


# -- events, conditions, barriers ---------------------------------------------------------


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_event_wait(m: Manager, uniq: str, value: Any) -> None:
    event = m.Event(uniq)
    check(
        outcome(lambda: event.wait(value)),
        stdlib(lambda v: threading.Event().wait(v), value),
    )
    assert waiters(m, uniq) == 0


@pytest.mark.parametrize("value", VALUES, ids=IDS)
@pytest.mark.parametrize("method", ["wait", "wait_for"])
def test_condition_wait(m: Manager, other: Manager, uniq: str, method: str, value: Any) -> None:
    cond = m.Condition(uniq)
    assert cond.acquire(timeout=1)
    if method == "wait":
        got = outcome(lambda: cond.wait(value))
        expected = stdlib(_std_condition_wait, value)
    else:
        got = outcome(lambda: cond.wait_for(lambda: False, value))
        expected = stdlib(_std_condition_wait_for, value)
    check(got, expected)
    assert waiters(m, uniq) == 0
    # Still ours (a wait that could not start did not let it go), at depth 1.
    assert other.Condition(uniq).acquire(timeout=0.05) is False
    cond.release()
    assert other.Condition(uniq).acquire(timeout=1) is True
    other.Condition(uniq).release()


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_barrier_wait(m: Manager, uniq: str, value: Any) -> None:
    barrier = m.Barrier(uniq, 2)
    expected = stdlib(lambda v: threading.Barrier(2).wait(v), value)
    check(outcome(lambda: barrier.wait(value)), expected)
    assert waiters(m, uniq) == 0
    # Refused before it waited: not broken; timed out (negative): broken, as the stdlib.
    assert barrier.broken is (expected is threading.BrokenBarrierError)


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_barrier_default_timeout(m: Manager, uniq: str, value: Any) -> None:
    """Checked at creation: what every wait() would fail on is refused at once."""
    expected: Any
    if isinstance(value, (str, list)):
        expected = TypeError
    elif _is_nan(value) or value < 0:
        expected = ValueError
    elif value > TIMEOUT_MAX:
        expected = OverflowError
    else:
        expected = None
    created = outcome(lambda: m.Barrier(uniq, 2, timeout=value))
    if expected is None:
        # Accepted: the one waiter's wait() uses it, and breaks when it passes.
        check(outcome(lambda: created.wait()), threading.BrokenBarrierError)
    else:
        check(created, expected)
        assert uniq not in m.status()["objects"]
        # The stdlib accepts it and fails each wait() with the same kind of error.
        if expected is not ValueError:
            check(outcome(lambda: threading.Barrier(2, timeout=value).wait()), expected)


# -- the longest wait allowed --------------------------------------------------------------


def test_timeout_max_itself_parks_and_completes(
    loop_daemon: Daemon, m: Manager, other: Manager, uniq: str
) -> None:
    """TIMEOUT_MAX is accepted (uvloop caps its timers at ~100 years; asyncio does not
    mind): the call waits, and completes when the item or the lock comes."""
    q = m.Queue(uniq)
    got: list[Any] = []
    getter = threading.Thread(target=lambda: got.append(q.get(timeout=TIMEOUT_MAX)))
    getter.start()
    assert wait_until(lambda: waiters(other, uniq) == 1)
    other.Queue(uniq).put("late")
    getter.join(10)
    assert got == ["late"]

    theirs = other.Lock(uniq + ".lock")
    assert theirs.acquire(timeout=1)
    acquired: list[bool] = []
    with loop_daemon.connect() as third:
        lock = third.Lock(uniq + ".lock")
        waiter = threading.Thread(target=lambda: acquired.append(lock.acquire(timeout=TIMEOUT_MAX)))
        waiter.start()
        assert wait_until(lambda: waiters(other, uniq + ".lock") == 1)
        theirs.release()
        waiter.join(10)
        assert acquired == [True]
        lock.release()


# -- the two reproductions ----------------------------------------------------------


def test_nan_get_does_not_lose_the_next_item(m: Manager, uniq: str) -> None:
    q = m.Queue(uniq)
    with pytest.raises(ValueError):
        q.get(timeout=float("nan"))
    q.put("precious")
    assert q.qsize() == 1
    assert q.get_nowait() == "precious"


def test_nan_acquire_does_not_leave_the_lock_held(m: Manager, other: Manager, uniq: str) -> None:
    lock = m.Lock(uniq)
    with pytest.raises(ValueError):
        lock.acquire(timeout=float("nan"))
    assert other.Lock(uniq).acquire(timeout=1) is True
    other.Lock(uniq).release()


# -- a stock stdlib client ----------------------------------------------------------------


class Stock(BaseManager):
    """A stock stdlib client of managerd."""


Stock.register("Queue")
Stock.register("Lock")


def test_stock_client_nan_leaves_nothing_behind(loop_daemon: Daemon, uniq: str, m: Manager) -> None:
    stock = Stock(address=("127.0.0.1", loop_daemon.port), authkey=loop_daemon.authkey)
    stock.connect()
    q = stock.Queue(uniq)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        q.get(timeout=float("nan"))
    with pytest.raises(OverflowError):
        q.get(timeout=float("inf"))
    q.put("precious")
    assert q.qsize() == 1
    assert q.get_nowait() == "precious"
    lock = stock.Lock(uniq + ".lock")  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        lock.acquire(timeout=float("nan"))
    with pytest.raises(OverflowError):
        lock.acquire(timeout=1e300)
    assert waiters(m, uniq) == 0
    assert m.Lock(uniq + ".lock").acquire(timeout=1) is True
    m.Lock(uniq + ".lock").release()
