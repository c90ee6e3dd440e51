"""Shared machinery of the model-based stateful tests (tests/test_stateful_*.py).

Each primitive is driven by a hypothesis ``RuleBasedStateMachine`` whose
model is the standard-library object (``queue.Queue``, ``threading.Lock``,
``dict``...). One daemon serves a whole test (started once, with a data
directory and ``--fsync always``); each example works on fresh uuid names,
so examples do not see each other. Rules call from several clients (several
``managerd_client.connect()`` sessions) and from several threads of each
(an *actor* is one thread of one client; the model is called from the same
actor's thread, so thread-owned models such as ``threading.RLock`` see the
same owners).

Hostile values (NaN, +-inf, -0.0, huge ints, negative counts, wrong types,
huge strings, unhashable keys) are drawn as arguments; the outcome is
compared with the model's outcome for the same arguments: the same result,
or an exception of the same type.

NaN, +-inf and huge timeouts are drawn by every rule that takes a timeout
and checked against the rules of README "Errors": where the stdlib raises
(threading's locks; an infinite or huge wait) the model gives the error;
where the stdlib would spin for ever on a NaN wait, managerd's ValueError
is expected (``nan_wait``).

Scale with ``MANAGERD_STATEFUL_EXAMPLES`` (examples per test) and
``MANAGERD_STATEFUL_STEPS`` (steps per example), and set
``MANAGERD_STATEFUL_STORE=etcd`` to run them against a gateway on a real
3-node etcd cluster (``etcd_support``) instead of the embedded store (where
they differ, the machines ask ``ON_ETCD``: see ``settles`` and the restart
rules); set
``MANAGERD_STATEFUL_SHRINK=1`` to shrink a failure (slow: see ``SHRINK``);
``scripts/stateful_long.py`` runs them for minutes. With
``MANAGERD_STATEFUL_COUNTS`` set to a file, each example appends its
primitive's name there (the long run counts them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import multiprocessing
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import workers_interrupts as wi
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from managerd_client import Manager

from conftest import Daemon, wait_until

# -- settings ------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("MANAGERD_STATEFUL_EXAMPLES", "6"))
STEPS = int(os.environ.get("MANAGERD_STATEFUL_STEPS", "20"))
COUNTS_FILE = os.environ.get("MANAGERD_STATEFUL_COUNTS")
#: Daemon restarts per example (each costs ~1 s: the daemon's start-up).
RESTARTS = int(os.environ.get("MANAGERD_STATEFUL_RESTARTS", "1"))
#: The daemon's store: ``memory`` (the embedded one, durable with --data-dir) or ``etcd``
#: (the daemon is a gateway on a 3-node cluster started for the module).
STORE = os.environ.get("MANAGERD_STATEFUL_STORE", "memory")
ON_ETCD = STORE == "etcd"
#: Whether a restart rule's crash resets what the embedded store does not keep.
#: The embedded daemon's restart ends every session (holdings, reservations back)
#: and starts a Barrier, a Semaphore's permits and a Pipe afresh. On etcd the
#: daemon is a gateway and the objects live in etcd: its restart is not a
#: store's, and each client resumes its session through it (the same address,
#: within the session TTL), so nothing ends and nothing resets: a Lock or a
#: permit stays held, a reservation its session's, a Barrier broken, permits
#: released beyond a Semaphore's initial value stay, a Pipe keeps its messages
#: (README "An etcd cluster as the store").
RESTART_RESETS = not ON_ETCD
#: On etcd, ``status`` shows figures a gateway reads from etcd periodically
#: (README "Status and deadlocks across gateways": at most one interval plus
#: one refresh old, about a second here), not as of the last call: a check of
#: them is retried until it holds, for at most this long (``settles``).
SETTLE_S = 15.0

#: Shrinking a failure re-runs the machine hundreds of times, each run
#: starting clients and (with a restart rule) restarting the daemon (~1.5 s):
#: hypothesis's own limit on shrinking is 300 s, the module's timeout too,
#: so a failure showed as a hang ("state = ListMachine(); state.teardown()",
#: the shrinker trying the empty program). Off unless asked for; the
#: failure is then reported as found, with every step.
SHRINK = os.environ.get("MANAGERD_STATEFUL_SHRINK", "") not in ("", "0")

SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

#: A "short" blocking timeout: long enough to park a waiter, short for a step.
SHORT_S = 0.03
WORKER = str(Path(__file__).resolve().parent / "stateful_worker.py")


def settles(check: Callable[..., None]) -> Callable[..., None]:
    """A check that reads ``status``: on the embedded store made once (its figures are
    the state as of the last call); on etcd repeated until it holds (an
    ``AssertionError`` again after ``SETTLE_S`` fails), since a gateway's figures
    follow etcd by a refresh. What the check asserts is the same on both."""

    @functools.wraps(check)
    def settled(*args: Any, **kwargs: Any) -> None:
        if not ON_ETCD:
            check(*args, **kwargs)
            return
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                check(*args, **kwargs)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    return settled


def run_machine(machine: type[StatefulMachine], daemon: Daemon) -> None:
    machine.daemon = daemon
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)
    except BaseException as exc:
        # The daemon's side of a failure (a refusal, a session it ended...).
        exc.add_note("daemon log (last 40 lines):\n" + "\n".join(daemon.lines[-40:]))
        raise


@pytest.fixture(scope="module")
def sdaemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One durable daemon for a module's state machines (restart rules restart it): on a
    data directory, or a gateway on an etcd cluster of its own (``STORE``)."""
    tmp = tmp_path_factory.mktemp("stateful")
    with contextlib.ExitStack() as stack:
        if STORE == "etcd":
            from etcd_support import running_cluster

            (tmp / "etcd").mkdir()
            cluster = stack.enter_context(running_cluster(tmp / "etcd"))
            args = ["--store", "etcd://" + ",".join(cluster.endpoints)]
        else:
            args = ["--data-dir", str(tmp / "data"), "--fsync", "always"]
        d = Daemon(tmp, args=args).start()
        try:
            yield d
        finally:
            d.stop()


# -- values --------------------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")
HUGE_INT = 10**30

#: Timeouts that are always fine and short.
short_timeouts = st.sampled_from([0, 0.0, -0.0, 0.001, 0.01, SHORT_S, False, True and 0.02])
#: Timeouts of the wrong type or sign.
bad_timeouts = st.sampled_from(["1", b"x", [0.01], -1.5])
#: Timeouts that are not finite or too large.
nonfinite_timeouts = st.sampled_from([NAN, INF, -INF, HUGE_INT, -HUGE_INT, 1e300])


def timeouts(allow_none: bool = False) -> st.SearchStrategy[Any]:
    parts: list[st.SearchStrategy[Any]] = [
        short_timeouts,
        short_timeouts,
        bad_timeouts,
        nonfinite_timeouts,
    ]
    if allow_none:
        parts.append(st.none())
    return st.one_of(*parts)


def is_nan(timeout: Any) -> bool:
    return isinstance(timeout, float) and math.isnan(timeout)


def nan_wait(timeout: Any, waits: bool) -> bool:
    """A NaN timeout on a call that has to wait: managerd's ValueError.

    The stdlib's Python-level waits (queue.Queue, Semaphore, Event,
    Condition, Barrier) spin for ever on it (``Condition.wait`` takes NaN
    as "do not block" and the loop around it never ends), so the model
    cannot be asked; README "Errors" says managerd raises ValueError. Not
    waiting, a NaN is ignored (as the stdlib ignores it).
    """
    return is_nan(timeout) and waits


def expect_nan_refused(got: Outcome, what: str) -> None:
    assert not got.ok and type(got.exc) is ValueError, f"{what} (NaN, must wait): managerd {got}"


def too_long(timeout: Any) -> bool:
    """More than ``threading.TIMEOUT_MAX`` (inf, a huge int): OverflowError if it waits."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        return False
    return timeout > threading.TIMEOUT_MAX


#: Payloads: the hostile floats, huge ints and strings, nested containers.
payloads: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([2**200, -(2**64), 0, -1]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([NAN, INF, -INF, -0.0, 0.0]),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.sampled_from(["é" * 300]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=3),
    ),
    max_leaves=8,
)


class Big:
    """A huge string, drawn as this (so that failure reports stay short)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Big({self.n})"

    def value(self) -> str:
        return "x" * self.n


#: A top-level payload: maybe huge (a frame past the 64 KiB raw-reply path).
top_payloads: st.SearchStrategy[Any] = st.one_of(
    payloads, payloads, payloads, st.builds(Big, st.sampled_from([70_000, 1_100_000]))
)


def real(payload: Any) -> Any:
    """The value to send for a drawn top-level payload."""
    return payload.value() if isinstance(payload, Big) else payload


#: Keys: hashable builtin data, and unhashable values (TypeError, as dict does).
hashable_keys: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([0, 1, -0.0, 0.0, True, False, "a", "b", b"a", None, (1, "a"), 2**100]),
    st.integers(-3, 3),
    st.text(max_size=3),
    st.sampled_from([NAN, INF, -INF]),
    st.frozensets(st.integers(0, 2), max_size=2),
)
unhashable_keys: st.SearchStrategy[Any] = st.sampled_from([[1], {}, {1}, [], {"a": 1}, ([1],)])
keys: st.SearchStrategy[Any] = st.one_of(hashable_keys, hashable_keys, unhashable_keys)

#: Counts and indices: negative, zero, small, huge, wrong types.
ints_hostile: st.SearchStrategy[Any] = st.one_of(
    st.integers(-4, 4),
    st.sampled_from([2**31, -(2**31), 2**63, -(2**63) - 1, HUGE_INT, -HUGE_INT]),
)
wrong_types: st.SearchStrategy[Any] = st.sampled_from([1.5, "1", None, b"1", [1], NAN, INF])


def same(a: Any, b: Any) -> bool:
    """Equality for test values: NaN equals NaN, -0.0 is not 0.0, types must match."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        bi = list(b.items())
        return all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), bi, strict=True)
        )
    return bool(a == b)


def canon(value: Any) -> bytes:
    """A canonical identity for a test value (for multisets of delivered items)."""
    return pickle.dumps(value, 5)


# -- outcomes ---------------------------------------------------------------------------------


class Outcome:
    """A call's result or exception, comparable with the model's."""

    __slots__ = ("exc", "value")

    def __init__(self, value: Any = None, exc: BaseException | None = None) -> None:
        self.value = value
        self.exc = exc

    @property
    def ok(self) -> bool:
        return self.exc is None

    def __repr__(self) -> str:
        return f"raised {self.exc!r}" if self.exc is not None else f"returned {self.value!r}"


def outcome(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(fn())
    except Exception as exc:
        return Outcome(exc=exc)


def same_outcome(got: Outcome, want: Outcome, what: str, compare: bool = True) -> None:
    """The same exception type, or (when ``compare``) an equal result."""
    if want.exc is not None or got.exc is not None:
        assert want.exc is not None and got.exc is not None, f"{what}: managerd {got}, model {want}"
        assert type(got.exc) is type(want.exc), f"{what}: managerd {got}, model {want}"
        return
    if compare:
        assert same(got.value, want.value), f"{what}: managerd {got}, model {want}"


# -- actors: one thread of one client ------------------------------------------------------------


class Actor:
    """One thread of one client session; runs callables there."""

    def __init__(self, client: int, thread: int) -> None:
        self.client = client
        self.thread = thread
        self._pool = concurrent.futures.ThreadPoolExecutor(1, f"actor{client}.{thread}")

    def run(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        return self._pool.submit(fn).result(timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"actor{self.client}.{self.thread}"


# -- the base machine ------------------------------------------------------------------------------

CLIENTS = 2
THREADS = 2


class StatefulMachine(RuleBasedStateMachine):
    """Clients, actors, fresh names, daemon restarts; subclasses add the rules."""

    daemon: Daemon
    primitive = "?"

    def __init__(self) -> None:
        super().__init__()
        if COUNTS_FILE:
            with open(COUNTS_FILE, "a") as f:
                f.write(self.primitive + "\n")
        self.managers: list[Manager] = [self.daemon.connect() for _ in range(CLIENTS)]
        self.actors = [Actor(c, t) for c in range(CLIENTS) for t in range(THREADS)]
        self.prefix = f"{self.primitive}-{uuid.uuid4().hex[:12]}"
        self.children: list[subprocess.Popen[str]] = []
        self.restarts = 0

    def name(self, suffix: str = "") -> str:
        return self.prefix + suffix

    def call(
        self, actor: Actor, what: str, mine: Callable[[], Any], model: Callable[[], Any],
        compare: bool = True,
    ) -> Outcome:  # fmt: skip
        """``mine`` (the daemon's) from ``actor``'s thread and ``model``: the same outcome."""
        got: Outcome = actor.run(lambda: outcome(mine))
        same_outcome(got, outcome(model), f"{actor} {what}", compare)
        return got

    def manager(self, actor: Actor) -> Manager:
        return self.managers[actor.client]

    def status_of(self, name: str) -> dict[str, Any]:
        objects: dict[str, Any] = self.managers[0].status()["objects"]
        return dict(objects[name])

    def teardown(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            _close_pipes(child)
        for actor in self.actors:
            actor.close()
        try:
            m = self.managers[0]
            for name, _ in m.objects():
                if name.startswith(self.prefix):
                    m.delete(name)
        finally:
            for m in self.managers:
                m.close()

    # -- processes that hold things, then die ----------------------------------------------
    @contextlib.contextmanager
    def interrupted_child(self, kind: str) -> Iterator[Connection]:
        """A spawned client blocked in ``kind``'s call on this machine's object gets
        SIGINT: KeyboardInterrupt there, it stays alive, and its wait is gone from
        the daemon. Yields the pipe to it: send "go" for its call again, then read
        ``("again", result)``; it is told "done" and reaped on exit."""
        ctx = multiprocessing.get_context("spawn")
        conn, theirs = ctx.Pipe()
        d = self.daemon
        proc = ctx.Process(
            target=wi.blocked_child, args=(d.address, d.authkey, kind, self.name(), theirs)
        )
        proc.start()
        theirs.close()

        def waiters(n: int) -> bool:
            return bool(self.status_of(self.name()).get("waiters", 0) == n)

        try:
            assert conn.poll(30) and conn.recv() == "ready"
            assert wait_until(lambda: waiters(1), 10), f"the child's {kind} was not parked"
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGINT)
            assert conn.poll(30) and conn.recv() == ("interrupted", "KeyboardInterrupt")
            assert proc.is_alive(), "the interrupted child died"
            assert wait_until(lambda: waiters(0), 10), f"the abandoned {kind} is still parked"
            yield conn
            conn.send("done")
            proc.join(10)
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            conn.close()

    def spawn_holder(self, *args: str) -> subprocess.Popen[str]:
        """A client process that takes something, says ``HELD ...``, and waits to be killed."""
        child = subprocess.Popen(
            [sys.executable, WORKER, *args],
            env=self.daemon.client_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line.startswith(("HELD", "NOTHING")), f"holder said {line!r}"
        child.held = line  # type: ignore[attr-defined]
        return child

    def kill_child(self, child: subprocess.Popen[str]) -> None:
        child.send_signal(signal.SIGKILL)
        _close_pipes(child)

    def restart_daemon(self) -> None:
        """A crash (SIGKILL) and a restart on the same port and data directory (on etcd:
        of the gateway, on the same cluster; see ``RESTART_RESETS``)."""
        self.restarts += 1
        self.daemon.kill()
        self.daemon.start(port=self.daemon.port)

    def may_restart(self) -> bool:
        return self.restarts < RESTARTS

    def sessions_alive(self, name: str) -> bool:
        """Every holder listed for ``name`` is a live session (none of the killed children)."""
        status = self.managers[0].status()
        pids = {s.get("pid") for s in status["sessions"]}
        dead = {c.pid for c in self.children if c.poll() is not None}
        return not (pids & dead)

    def wait_children_gone(self) -> None:
        """The daemon noticed every killed child (their sessions ended)."""
        assert wait_until(self.sessions_alive_all, timeout_s=10), "a killed client's session lives"

    def sessions_alive_all(self) -> bool:
        return self.sessions_alive("")


def _close_pipes(child: subprocess.Popen[str]) -> None:
    child.wait(10)
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()


@settles
def expect_empty_waiters(machine: StatefulMachine, name: str) -> None:
    """No waiter is left parked once every call has returned."""
    info = machine.status_of(name)
    assert info.get("waiters", 0) == 0, f"{name}: waiters left {info}"


__all__ = [
    "ON_ETCD",
    "RESTART_RESETS",
    "SETTINGS",
    "Actor",
    "Outcome",
    "StatefulMachine",
    "canon",
    "outcome",
    "queue",
    "same",
    "same_outcome",
    "settles",
    "threading",
]
