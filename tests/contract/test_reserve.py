"""Acknowledged delivery: reserve, ack, nack, extend, visibility timeout, dead letters.

README "Nothing lost, nothing stuck": ``reserve`` takes the next item until
it is acked; an unacked item comes back to the *front* on ``nack``, after
the visibility timeout, or when its consumer's session ends; ``extend``
keeps it longer; one delivered ``max_deliveries`` times without an ack
moves to ``"<name>.dead"``, and counts as done for ``join``.
"""

from __future__ import annotations

import queue

import pytest

from contract.harness import StoreHarness

#: Short enough for a test step, long enough that the test's own calls come first.
VISIBILITY_S = 0.05


def test_reserve_takes_the_item_until_ack(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b"])
    did, value, deliveries = store.call(q, "reserve")
    assert (value, deliveries) == ("a", 1)
    assert store.call(q, "qsize") == 1
    assert store.call(q, "reserved_count") == 1
    store.call(q, "ack", did)
    assert store.call(q, "reserved_count") == 0
    with pytest.raises(ValueError):
        store.call(q, "ack", did)  # settled already
    assert store.call(q, "get") == "b"


def test_nack_puts_it_back_first_and_counts_the_delivery(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b"])
    did, _, _ = store.call(q, "reserve")
    store.call(q, "nack", did)
    assert store.call(q, "qsize") == 2
    did2, value, deliveries = store.call(q, "reserve")
    assert (value, deliveries) == ("a", 2)
    assert did2 != did
    with pytest.raises(ValueError):
        store.call(q, "nack", did)  # the old delivery is gone


def test_only_the_reserving_session_settles_a_delivery(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    did, _, _ = store.call(q, "reserve")
    other = store.new_client()
    for method in ("ack", "nack"):
        with pytest.raises(ValueError):
            store.call(q, method, did, client=other)
    with pytest.raises(ValueError):
        store.call(q, "extend", did, 1.0, client=other)
    with pytest.raises(ValueError):
        store.call(q, "ack", 10**9)  # never existed
    store.call(q, "ack", did)


@pytest.mark.parametrize("did", ["1", [1], {"a": 1}, None, 1.0])
@pytest.mark.parametrize("method", ["ack", "nack", "extend"])
def test_a_delivery_id_is_an_int(store: StoreHarness, method: str, did: object) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    store.call(q, "reserve")
    args = (did, 1.0) if method == "extend" else (did,)
    with pytest.raises(TypeError):
        store.call(q, method, *args)
    assert store.call(q, "reserved_count") == 1


def test_visibility_timeout_redelivers_at_the_front(store: StoreHarness) -> None:
    q = store.open("Queue", "q", visibility_timeout_s=VISIBILITY_S)
    store.call(q, "put_many", ["a", "b"])
    did, _, _ = store.call(q, "reserve")
    store.sleep(VISIBILITY_S * 3)
    assert store.call(q, "reserved_count") == 0
    with pytest.raises(ValueError):
        store.call(q, "ack", did)  # timed out: no longer this session's
    assert store.call(q, "get_many", 5) == ["a", "b"]


def test_a_redelivered_item_goes_to_a_parked_consumer(store: StoreHarness) -> None:
    # Long enough for the consumer to park first: on etcd, parking takes round trips
    # (50 ms had run out before them on a loaded machine).
    q = store.open("Queue", "q", visibility_timeout_s=1.0)
    store.call(q, "put", "a")
    store.call(q, "reserve")
    waiting = store.start(q, "reserve", client=store.new_client())
    assert not waiting.done()
    _, value, deliveries = waiting.result()  # after the visibility timeout
    assert (value, deliveries) == ("a", 2)


def test_extend_keeps_the_reservation(store: StoreHarness) -> None:
    q = store.open("Queue", "q", visibility_timeout_s=VISIBILITY_S)
    store.call(q, "put", "a")
    did, _, _ = store.call(q, "reserve")
    store.call(q, "extend", did, 60.0)
    store.sleep(VISIBILITY_S * 3)
    assert store.call(q, "reserved_count") == 1
    assert store.call(q, "qsize") == 0
    store.call(q, "ack", did)


@pytest.mark.parametrize(
    ("seconds", "error"),
    [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), OverflowError),
     (1e300, OverflowError), ("5", TypeError), (None, TypeError)],
)  # fmt: skip
def test_extend_refuses_a_bad_duration(
    store: StoreHarness, seconds: object, error: type[Exception]
) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    did, _, _ = store.call(q, "reserve")
    with pytest.raises(error):
        store.call(q, "extend", did, seconds)
    store.call(q, "ack", did)  # still reserved, still this session's


def test_max_deliveries_moves_the_item_to_the_dead_letter_queue(store: StoreHarness) -> None:
    q = store.open("Queue", "q", max_deliveries=2)
    store.call(q, "put_many", ["a", "b"])
    for expected in (1, 2):
        did, value, deliveries = store.call(q, "reserve")
        assert (value, deliveries) == ("a", expected)
        store.call(q, "nack", did)
    assert store.call(q, "get") == "b"
    assert ("q.dead", "Queue") in store.objects()
    dead = store.open("Queue", "q.dead")
    assert store.call(dead, "get", False) == "a"


def test_nack_without_requeue_dead_letters_at_once(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    did, _, _ = store.call(q, "reserve")
    store.call(q, "nack", did, False)
    assert store.call(q, "qsize") == 0
    assert store.call(store.open("Queue", "q.dead"), "get_many", 5) == ["a"]


def test_a_dead_letter_counts_as_done(store: StoreHarness) -> None:
    q = store.open("JoinableQueue", "q", max_deliveries=1)
    store.call(q, "put_many", ["a", "b"])
    did, _, _ = store.call(q, "reserve")
    joined = store.start(q, "join")
    store.call(q, "nack", did)  # its one delivery: dead, and done
    did_b, _, _ = store.call(q, "reserve")
    store.call(q, "ack", did_b)
    assert not joined.done()
    store.call(q, "task_done")  # after the ack, as README says
    assert joined.result() is None


def test_a_dead_letter_queue_never_dead_letters(store: StoreHarness) -> None:
    q = store.open("Queue", "q", max_deliveries=1)
    store.call(q, "put", "a")
    store.call(q, "nack", store.call(q, "reserve")[0])
    dead = store.open("Queue", "q.dead")
    did, value, _ = store.call(dead, "reserve")
    assert value == "a"
    store.call(dead, "nack", did)
    assert store.call(dead, "get", False) == "a"
    assert "q.dead.dead" not in dict(store.objects())


def test_a_name_taken_by_another_type_keeps_the_item(store: StoreHarness) -> None:
    """The dead-letter name is a dict: the item is never dropped, it stays first in line."""
    q = store.open("Queue", "q", max_deliveries=1)
    store.open("dict", "q.dead")
    store.call(q, "put_many", ["a", "b"])
    store.call(q, "nack", store.call(q, "reserve")[0])
    assert store.call(q, "get_many", 5) == ["a", "b"]


def test_reserve_timeout_and_a_parked_reserve(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    with pytest.raises(queue.Empty):
        store.call(q, "reserve", 0.01)
    assert store.waiters(q) == 0
    waiting = store.start(q, "reserve")
    store.call(q, "put", "x")
    did, value, deliveries = waiting.result()
    assert (value, deliveries) == ("x", 1)
    assert store.call(q, "reserved_count") == 1
    store.call(q, "ack", did)


def test_reservations_of_an_ended_session_come_back_first_in_order(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b", "c", "d"])
    consumer = store.new_client()
    store.call(q, "reserve", client=consumer)
    store.call(q, "reserve", client=consumer)
    mine, _, _ = store.call(q, "reserve")  # "c", reserved by another session
    store.end_session(consumer)
    assert store.call(q, "reserved_count") == 1
    assert store.call(q, "get_many", 10) == ["a", "b", "d"]
    store.call(q, "ack", mine)


def test_an_ended_sessions_reservations_go_to_parked_calls_the_last_delivered_first(
    store: StoreHarness,
) -> None:
    """As ``nack`` one after another, the last delivered first: each to the oldest parked
    get or reserve, the rest to the front in the order they were delivered."""
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b", "c", "d"])
    consumer = store.new_client()
    for _ in range(4):
        store.call(q, "reserve", client=consumer)
    first = store.start(q, "get", client=store.new_client())
    second = store.start(q, "reserve", client=store.new_client())
    assert not first.done() and not second.done()
    store.end_session(consumer)
    assert first.result() == "d"
    _, value, deliveries = second.result()
    assert (value, deliveries) == ("c", 2)
    assert store.call(q, "reserved_count") == 1
    assert store.call(q, "get_many", 5) == ["a", "b"]
    assert store.waiters(q) == 0


def test_each_nack_puts_its_item_first(store: StoreHarness) -> None:
    """Back to the front, the latest returned first, as ``appendleft`` (not back to the
    place it was put at: that is behind an item nacked after it)."""
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b", "c"])
    did_a, _, _ = store.call(q, "reserve")
    did_b, _, _ = store.call(q, "reserve")
    store.call(q, "nack", did_a)
    store.call(q, "nack", did_b)
    assert store.call(q, "get_many", 5) == ["b", "a", "c"]


def test_sessions_ended_one_after_another_put_the_later_first(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b", "c"])
    first, second = store.new_client(), store.new_client()
    store.call(q, "reserve", client=first)
    store.call(q, "reserve", client=second)
    store.end_session(first)
    store.end_session(second)
    assert store.call(q, "get_many", 5) == ["b", "a", "c"]


def test_an_item_nacked_then_dead_lettered_counts_as_done(store: StoreHarness) -> None:
    q = store.open("JoinableQueue", "q", max_deliveries=2)
    store.call(q, "put", "a")
    for _ in range(2):  # back first, then dead
        store.call(q, "nack", store.call(q, "reserve")[0])
    assert store.call(q, "qsize") == 0
    store.call(q, "join", 0)  # nothing unfinished: the dead letter is done
    assert store.call(store.open("Queue", "q.dead"), "get_many", 5) == ["a"]


def test_a_dead_letter_after_a_task_done_of_another_item_counts_as_done(
    store: StoreHarness,
) -> None:
    """``task_done`` names no item: the count goes down however the two come."""
    q = store.open("JoinableQueue", "q", max_deliveries=1)
    store.call(q, "put_many", ["a", "b"])
    did, _, _ = store.call(q, "reserve")
    assert store.call(q, "get") == "b"
    store.call(q, "task_done")  # for "b"
    store.call(q, "nack", did)  # "a": its one delivery, dead, and done
    store.call(q, "join", 0)


def test_expired_reservations_go_to_parked_calls_the_first_expired_first(
    store: StoreHarness,
) -> None:
    """As their timers fire one after another, by deadline: each to the oldest parked
    get or reserve, the rest first, the last expired first (``appendleft``)."""
    q = store.open("Queue", "q", visibility_timeout_s=1.0)
    store.call(q, "put_many", ["a", "b", "c", "d"])
    consumer = store.new_client()
    for _ in range(4):
        store.call(q, "reserve", client=consumer)
    first = store.start(q, "get", client=store.new_client())
    reserver = store.new_client()
    second = store.start(q, "reserve", client=reserver)
    assert not first.done() and not second.done()
    assert first.result() == "a"  # after the visibility timeout
    did, value, deliveries = second.result()
    assert (value, deliveries) == ("b", 2)
    store.call(q, "ack", did, client=reserver)
    store.sleep(2.5)  # on etcd, a requeuer pass each second: its passes may part them
    assert store.call(q, "reserved_count") == 0
    assert store.call(q, "get_many", 5) == ["d", "c"]
    assert store.waiters(q) == 0
