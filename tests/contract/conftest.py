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

from contract.harness import ETCD_OPT_IN, ETCD_WHOLE, STORE_KINDS, StoreHarness


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``MANAGERD_CONTRACT_ETCD=1``, the etcd kind of ``ETCD_OPT_IN`` is deselected."""
    if ETCD_WHOLE:
        return
    here = Path(__file__).parent
    kept, dropped = [], []
    for item in items:
        _, _, params = item.nodeid.partition("[")  # e.g. [etcd-Queue], [QueueMachine-etcd]
        etcd = "etcd" in params.rstrip("]").split("-") and item.path.parent == here
        if etcd and any(part in item.nodeid for part in ETCD_OPT_IN):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHarness]:
    harness = StoreHarness(request.param, tmp_path / "data")
    try:
        yield harness
    finally:
        harness.close()
