"""The client's payload pickling: the same bytes however they are made.

The daemon compares stored payloads as bytes (``list.index``, ``count``,
``remove``, ``in``), so a payload pickled by ``dump_one`` (single values, a
reusable buffer) must equal one pickled by ``dumps`` (batches).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from managerd_client.proxies import dump_one, dumps
from managerd_client.wire import PICKLE_PROTOCOL

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(max_size=200_000),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5)
    | st.tuples(inner, inner),
    max_leaves=10,
)  # fmt: skip


@settings(max_examples=200, deadline=None, derandomize=True)
@given(VALUES)
def test_dump_one_equals_dumps(value: Any) -> None:
    assert dump_one(value) == dumps(value) == pickle.dumps(value, PICKLE_PROTOCOL)


def test_large_values_and_the_buffer_shrinking_back() -> None:
    for size in (70_000, 1 << 20, 6 << 20, 100):
        value = {"blob": os.urandom(size), "n": size}
        assert dump_one(value) == dumps(value)
        assert pickle.loads(dump_one(value)) == value


class _Reentrant:
    """Pickling it pickles another value with dump_one, as a __reduce__ might."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __reduce__(self) -> tuple[Any, ...]:
        return (bytes, (dump_one(self.inner),))


def test_dump_one_from_inside_dump_one() -> None:
    reentrant = _Reentrant(["x", os.urandom(80_000)])
    outer = [os.urandom(100_000), reentrant]
    decoded = pickle.loads(dump_one(outer))
    assert decoded[0] == outer[0]
    assert pickle.loads(decoded[1]) == reentrant.inner
    assert dump_one("after") == dumps("after")


def test_a_failed_dump_leaves_nothing_behind() -> None:
    class Unpicklable:
        def __reduce__(self) -> tuple[Any, ...]:
            raise TypeError("no")

    try:
        dump_one([os.urandom(100_000), Unpicklable()])
    except TypeError:
        pass
    assert dump_one({"k": 1}) == dumps({"k": 1})
