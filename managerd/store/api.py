"""The method-spec part of an object: what a client may call, and how its arguments convert.

``exposed`` marks a method callable by clients; ``MethodSpec`` says which
arguments and results are payloads (pickled bytes) so that the stock-client
adapter converts plain values at the edge; ``Call`` is who calls.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from managerd.store.sessions import Session

F = TypeVar("F", bound=Callable[..., Any])


class Conv(enum.Enum):
    """How the stock-client adapter converts an argument or a result."""

    PLAIN = "plain"  # builtin data, passed as is
    PAYLOAD = "payload"  # one value <-> pickled bytes
    PAYLOADS = "payloads"  # a sequence of values <-> list of pickled bytes
    PAIRS = "pairs"  # (key, value) pairs <-> list of (key, pickled bytes)
    ITEM_OR_ITEMS = "item_or_items"  # list.__setitem__: one value, or many for a slice
    ACQUIRED = "acquired"  # a fencing token (or False) <-> True/False
    PAIR = "pair"  # one (key, value) pair <-> (key, pickled bytes)
    MAPPING = "mapping"  # a dict of values <-> dict of pickled bytes


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One exposed method: the function and how its values travel."""

    name: str
    fn: Callable[..., Any]
    args: dict[str, Conv] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    result: Conv = Conv.PLAIN
    mutates: bool = False


def exposed(
    name: str | None = None,
    *,
    result: Conv = Conv.PLAIN,
    mutates: bool = False,
    **args: Conv,
) -> Callable[[F], F]:
    """Mark an object method as callable by clients under ``name``."""

    def mark(fn: F) -> F:
        params = tuple(inspect.signature(fn).parameters)[2:]  # skip self, call
        unknown = set(args) - set(params)
        if unknown:
            raise TypeError(f"{fn.__qualname__}: no parameters {sorted(unknown)}")
        fn.__managerd_spec__ = MethodSpec(  # type: ignore[attr-defined]
            name or fn.__name__, fn, dict(args), params, result, mutates
        )
        return fn

    return mark


@dataclass(slots=True)
class Call:
    """The context of one request: who asks, from which client thread."""

    session: Session
    thread: int
    loop: asyncio.AbstractEventLoop
