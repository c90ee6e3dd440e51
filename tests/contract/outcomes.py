"""Comparing a store's outcome with the standard-library object's (no store code here).

An outcome is a value or an exception; two outcomes agree when both are
values that are equal, or both are exceptions of the same type (the
messages are the store's own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __repr__(self) -> str:
        return f"raised {self.error!r}" if self.error is not None else f"returned {self.value!r}"


def outcome(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(value=fn())
    except AssertionError:
        raise  # a failed check in the harness (a daemon bug, a hang) is never an outcome
    except Exception as exc:
        return Outcome(error=exc)


def same_outcome(got: Outcome, want: Outcome, what: str = "") -> None:
    """``got`` (the store's) agrees with ``want`` (the stdlib's)."""
    if want.error is not None:
        assert got.error is not None, f"{what}: {got}, the stdlib {want}"
        # A store's purposeful refusals subclass the builtin a client sees (BadArgument
        # is a TypeError), so a subclass agrees.
        assert isinstance(got.error, type(want.error)), f"{what}: {got}, the stdlib {want}"
    else:
        assert got.error is None, f"{what}: {got}, the stdlib {want}"
        assert got.value == want.value, f"{what}: {got}, the stdlib {want}"
