"""A first end-to-end check: a real daemon, a real client, every type reachable."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from conftest import Daemon


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_queue_round_trip_on_each_event_loop(tmp_path: Path, event_loop: str) -> None:
    d = Daemon(tmp_path, env={"MANAGERD_EVENT_LOOP": event_loop}).start()
    try:
        with d.connect() as m:
            q = m.Queue("jobs")
            q.put({"id": 1})
            assert q.get(timeout=1) == {"id": 1}
            with m.Lock("l"):
                assert m.status()["objects"]["l"]["held"]
    finally:
        d.stop()


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
