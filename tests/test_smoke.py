"""A first end-to-end check: a real daemon, a real client, every type reachable."""

from __future__ import annotations

import queue

import pytest

from conftest import Daemon


def test_queue_round_trip(daemon: Daemon) -> None:
    with daemon.connect() as m:
        q = m.Queue("jobs")
        q.put({"id": 1})
        assert q.qsize() == 1
        assert q.get(timeout=1) == {"id": 1}
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)


def test_objects_listing_and_delete(daemon: Daemon) -> None:
    with daemon.connect() as m:
        m.Queue("a")
        m.dict("b")
        assert ("a", "Queue") in m.objects()
        assert m.delete("a") is True
        assert m.delete("a") is False
        assert ("a", "Queue") not in m.objects()
