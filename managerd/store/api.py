"""The method-spec part of an object: what a client may call, and how its arguments convert.

``exposed`` marks a method callable by clients; ``MethodSpec`` says which
arguments and results are payloads (pickled bytes) so that the stock-client
adapter converts plain values at the edge; ``Call`` is who calls.

**Errors raised on purpose.** A method refuses what its caller asked with
an exception the invoker answers as the caller's (see
``service/invoker.py``): a ``ManagerdError``, a lookup or value error, an
empty/full queue... ``TypeError``, ``AttributeError``, ``RuntimeError`` and
``NotImplementedError`` are also what a bug in the daemon raises, so a
method raises those on purpose as :class:`BadArgument`, :class:`NoAttribute`,
:class:`BadState` and :class:`Unsupported` (subclasses of the builtins, so
clients see the builtin); the same builtins escaping otherwise are daemon
bugs, logged and answered as an internal error.
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


class Refusal(Exception):
    """A method refused the call on purpose: the caller's error (see the module docstring)."""


class BadArgument(Refusal, TypeError):
    """An argument of the wrong type or shape."""


class NoAttribute(Refusal, AttributeError):
    """No such method or attribute (a ``Namespace`` field, a ``Barrier`` property)."""


class BadState(Refusal, RuntimeError):
    """Not allowed in the object's state (releasing a lock not held...)."""


class Unsupported(Refusal, NotImplementedError):
    """A call the object does not support."""


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
        # Raised at import, a programming error: not a refusal of a call.
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
    #: The request's id (the client's, unique among its process's requests; 0: none).
    rid: int = 0
    #: What a payload this call removes must pass before it goes (raises if not): a
    #: stock client's decoder. A store that cannot say beforehand what a call hands
    #: out (``Store.would_hand_out``) checks it where it removes the payload.
    accept: Callable[[bytes], Any] | None = None


def methods_of(cls: type) -> dict[str, MethodSpec]:
    """The exposed methods of ``cls`` and its bases, by name."""
    methods: dict[str, MethodSpec] = {}
    for klass in reversed(cls.__mro__):
        for attr in vars(klass).values():
            spec = getattr(attr, "__managerd_spec__", None)
            if isinstance(spec, MethodSpec):
                methods[spec.name] = spec
    return methods
