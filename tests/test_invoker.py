"""The invoker's error classification, in process: whose error is it?

Over the wire a daemon bug cannot be provoked without test-only code in the
daemon, so this drives :class:`managerd.service.invoker.Invoker` directly
with a tiny exposed object; the wire side (a bad argument stays the
caller's ``TypeError``, for managerd and stock clients) is in
``test_metrics.py`` and ``test_bad_input.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest

from managerd.service.invoker import Invocation, Invoker, Outcome
from managerd.service.requests import RequestStats
from managerd.store.api import BadArgument, Call, MethodSpec, exposed, methods_of
from managerd.store.interface import TypeInfo
from managerd.store.memory.deadlock import Detector
from managerd.store.memory.store import MemoryStore
from managerd.store.memory.tokens import TokenSource
from managerd.store.sessions import Session, SessionKind
from managerd.wire.stock_dialect import stock_error
from managerd_client import InternalError, NoSuchObject
from managerd_client.errors import error_from_kind, error_kind


class Boom:
    """An object whose methods fail the ways daemon code can."""

    typeid: ClassVar[str] = "Boom"
    name: ClassVar[str] = "b"
    methods: ClassVar[dict[str, MethodSpec]]
    undo_methods: ClassVar[dict[str, str]] = {}
    builtin_type_errors: ClassVar[bool] = False

    @exposed()
    def divide(self, call: Call, a: int, b: int) -> float:
        return a / b  # b=0: a bug, not the caller's

    @exposed()
    def misuse(self, call: Call, value: Any) -> Any:
        return len(value)  # an int: a TypeError from inside, a bug

    @exposed()
    def refuse(self, call: Call, value: Any) -> Any:
        if not isinstance(value, str):
            raise BadArgument("value must be a str")  # on purpose: the caller's
        return value

    @exposed()
    def later(self, call: Call) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = call.loop.create_future()
        call.loop.call_soon(future.set_exception, ZeroDivisionError("in a parked call"))
        return future


Boom.methods = methods_of(Boom)


class OneObject(MemoryStore):
    """The in-memory store, with one more object: a Boom named ``b``."""

    types: Mapping[str, TypeInfo] = {"Boom": TypeInfo("Boom", Boom.methods, ())}

    def __init__(self, loop: asyncio.AbstractEventLoop, obj: Boom) -> None:
        super().__init__(loop, TokenSource(), Detector())
        self.obj = obj

    def get(self, name: str, typeid: str | None = None) -> Any:
        if name != "b":
            raise NoSuchObject(f"no object named {name!r}")
        return self.obj


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run(
    loop: asyncio.AbstractEventLoop, invoker: Invoker, method: str, *args: Any, **kwargs: Any
) -> Outcome:
    session = Session(SessionKind.MANAGERD, "test")
    outcomes: list[Outcome] = []
    invoker.run(Invocation(session, 1, "Boom", "b", method, args, kwargs), outcomes.append)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert len(outcomes) == 1
    return outcomes[0]


@pytest.fixture
def invoker(loop: asyncio.AbstractEventLoop) -> Invoker:
    return Invoker(OneObject(loop, Boom()), Boom(), loop, RequestStats())


def test_a_daemon_bug_is_logged_with_its_traceback_and_answered_as_internal(
    invoker: Invoker, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="managerd"):
        outcome = run(loop, invoker, "divide", 1, 0)
    assert isinstance(outcome.error, InternalError)
    assert "see its log" in str(outcome.error)
    assert outcome.kind == "Internal"
    (record,) = [r for r in caplog.records if "internal error in Boom.divide" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert invoker.stats.counts[("Boom.divide", "Internal")] == 1
    # The client raises InternalError; a stock client gets a builtin RuntimeError.
    assert isinstance(error_from_kind(error_kind(outcome.error), "x"), InternalError)
    converted = stock_error(outcome.error)
    assert type(converted) is RuntimeError and "see its log" in str(converted)


def test_a_type_error_from_inside_is_a_bug(
    invoker: Invoker, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="managerd"):
        outcome = run(loop, invoker, "misuse", 5)
    assert isinstance(outcome.error, InternalError)
    assert any(r.exc_info and r.exc_info[0] is TypeError for r in caplog.records)


def test_a_parked_call_failing_with_a_bug_is_internal(
    invoker: Invoker, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="managerd"):
        outcome = run(loop, invoker, "later")
    assert isinstance(outcome.error, InternalError)
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        ("divide", (1,), {}),  # too few
        ("divide", (1, 2, 3), {}),  # too many
        ("divide", (1, 2), {"c": 3}),  # unknown keyword
        ("refuse", (5,), {}),  # refused on purpose
    ],
)
def test_bad_arguments_are_the_callers_type_error(
    invoker: Invoker,
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    with caplog.at_level(logging.ERROR, logger="managerd"):
        outcome = run(loop, invoker, method, *args, **kwargs)
    assert isinstance(outcome.error, TypeError)
    assert not isinstance(outcome.error, InternalError)
    assert outcome.kind == "Type"
    assert not caplog.records


def test_unknown_method_and_object_are_the_callers(
    invoker: Invoker, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="managerd"):
        assert run(loop, invoker, "explode").kind == "Attribute"
        session = Session(SessionKind.MANAGERD, "test")
        outcomes: list[Outcome] = []
        invoker.run(Invocation(session, 1, "Boom", "nope", "divide", (1, 2)), outcomes.append)
    assert outcomes[0].kind == "NoSuchObject"
    assert not caplog.records
    # Counted, with unknown methods under one bounded label.
    assert invoker.stats.counts[("invalid", "Attribute")] == 1
    assert invoker.stats.counts[("Boom.divide", "NoSuchObject")] == 1


def test_a_good_call_is_ok(invoker: Invoker, loop: asyncio.AbstractEventLoop) -> None:
    outcome = run(loop, invoker, "divide", 1, 2)
    assert outcome.error is None and outcome.value == 0.5
    assert invoker.stats.counts[("Boom.divide", "ok")] == 1
