"""Decode requests without ever running code from the wire.

Every frame the daemon receives after authentication is decoded here. The
unpickler resolves only the globals on an allow-list of builtin data types
(plus those an operator names in ``allowed_classes``); any other global — and
so any ``os.system`` or import — is refused before anything is called.
Decoded values are then checked for nesting depth, because hashing or
comparing a tuple nested a million deep would exhaust the C stack.

Payloads from the managerd client are opaque bytes inside these requests and
are never decoded here, except by the few operations that must compare
values (``list.index``, ``list.sort``, ...), which use the same unpickler.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any, Final

from managerd_client.errors import ForbiddenPayload

#: Globals a stock client's pickles of builtin data may name.
SAFE_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "range"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),  # how protocols 0-2 spell bytes
        ("array", "array"),
        ("array", "_array_reconstructor"),
    }
)

MAX_DEPTH: Final = 100


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves allow-listed globals only."""

    def __init__(self, data: bytes | memoryview, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise ForbiddenPayload(
            f"refused to decode {module}.{name}: the daemon accepts builtin data types only"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPayload("persistent ids are not accepted")


class SafeDecoder:
    """Decodes frames with the allow-list, configured once per daemon."""

    def __init__(self, allowed_classes: Iterable[str] = ()) -> None:
        extra = set()
        for dotted in allowed_classes:
            module, _, name = dotted.rpartition(".")
            if module:
                extra.add((module, name))
        self.allowed = SAFE_GLOBALS | frozenset(extra)

    def loads(self, data: bytes | memoryview) -> Any:
        try:
            value = RestrictedUnpickler(data, self.allowed).load()
        except ForbiddenPayload:
            raise
        except RecursionError as exc:
            raise ForbiddenPayload("the request is nested too deeply") from exc
        except Exception as exc:
            raise ForbiddenPayload(f"the request is not a valid pickle: {exc}") from exc
        check_depth(value)
        return value


_SCALARS: Final = frozenset({bytes, str, int, float, bool, type(None), slice})


def _shallow(value: Any) -> bool:
    """A tuple of scalars and flat tuples/lists: what almost every request is."""
    if type(value) is not tuple:
        return False
    for child in value:
        kind = type(child)
        if kind in _SCALARS:
            continue
        if kind is not tuple and kind is not list:
            return False
        for grandchild in child:
            if type(grandchild) not in _SCALARS:
                return False
    return True


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse containers nested more than ``limit`` deep (iteratively, no recursion)."""
    if not isinstance(value, (tuple, list, dict, set, frozenset)) or _shallow(value):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ForbiddenPayload(f"the request is nested more than {limit} levels deep")
        if id(item) in seen:
            continue
        seen.add(id(item))
        children: Iterable[Any]
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (tuple, list, dict, set, frozenset)):
                stack.append((child, depth + 1))
