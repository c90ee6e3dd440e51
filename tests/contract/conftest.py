"""The contract suite: every primitive's semantics, in process, for every store.

Each test gets a ``store``: a :class:`~contract.harness.StoreHarness` on a
fresh data directory, one per store kind (``STORE_KINDS``). Tests talk only
to the harness, never to a store's classes, so that every store runs the
same tests. Where the standard library has the object, a test compares the
store's outcome with the stdlib object's in the same state.

No sockets and no subprocesses: the wire, sessions across processes,
``kill -9`` and deployment are the subprocess suite's (``tests/test_*.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.harness import STORE_KINDS, StoreHarness


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHarness]:
    harness = StoreHarness(request.param, tmp_path / "data")
    try:
        yield harness
    finally:
        harness.close()
