"""Pipe: ``multiprocessing.Pipe``'s two ends under one name.

What end 0 sends, end 1 receives, and back; ``duplex=False`` makes end 0
the reader and end 1 the writer, as ``Pipe(duplex=False)`` returns
``(reader, writer)``. A closed end: the other end reads what was buffered,
then EOFError; sending to it is a BrokenPipeError; using a closed end
itself is an OSError. managerd adds ``recv(timeout)`` (TimeoutError).
"""

from __future__ import annotations

import pytest

from contract.harness import StoreHarness

SHORT_S = 0.02


def test_duplex_both_ways_in_order(store: StoreHarness) -> None:
    p = store.open("Pipe", "p")
    for i in range(3):
        store.call(p, "send", 0, ("to1", i))
        store.call(p, "send", 1, ("to0", i))
    assert [store.call(p, "recv", 1) for _ in range(3)] == [("to1", i) for i in range(3)]
    assert [store.call(p, "recv", 0) for _ in range(3)] == [("to0", i) for i in range(3)]


def test_poll_and_a_parked_recv(store: StoreHarness) -> None:
    p = store.open("Pipe", "p")
    assert store.call(p, "poll", 1) is False
    assert store.call(p, "poll", 1, SHORT_S) is False
    polling = store.start(p, "poll", 1, None, client=store.new_client())
    reading = store.start(p, "recv", 1, client=store.new_client())
    assert not polling.done() and not reading.done()
    store.call(p, "send", 0, "m")
    assert polling.result() is True
    assert reading.result() == "m"
    assert store.waiters(p) == 0


def test_recv_timeout(store: StoreHarness) -> None:
    p = store.open("Pipe", "p")
    with pytest.raises(TimeoutError):
        store.call(p, "recv", 0, SHORT_S)
    assert store.waiters(p) == 0
    store.call(p, "send", 1, "late")
    assert store.call(p, "recv", 0) == "late"


def test_one_way_pipe(store: StoreHarness) -> None:
    p = store.open("Pipe", "p", duplex=False)
    with pytest.raises(OSError):
        store.call(p, "send", 0, "x")  # the reader end
    with pytest.raises(OSError):
        store.call(p, "recv", 1)  # the writer end
    store.call(p, "send", 1, "x")
    assert store.call(p, "recv", 0) == "x"


def test_close(store: StoreHarness) -> None:
    p = store.open("Pipe", "p")
    store.call(p, "send", 0, "buffered")
    reader = store.start(p, "recv", 0, client=store.new_client())
    store.call(p, "close", 0)
    store.call(p, "close", 0)  # closing twice is fine, as Connection.close
    with pytest.raises(OSError):
        reader.result()  # its own end closed under it
    with pytest.raises(OSError):
        store.call(p, "send", 0, "x")
    with pytest.raises(OSError):
        store.call(p, "recv", 0)
    with pytest.raises(BrokenPipeError):
        store.call(p, "send", 1, "x")
    assert store.call(p, "poll", 1) is True
    assert store.call(p, "recv", 1) == "buffered"
    assert store.call(p, "poll", 1) is True  # EOF is "ready"
    with pytest.raises(EOFError):
        store.call(p, "recv", 1)


def test_close_wakes_a_reader_of_the_other_end_with_eof(store: StoreHarness) -> None:
    p = store.open("Pipe", "p")
    reader = store.start(p, "recv", 1, client=store.new_client())
    poller = store.start(p, "poll", 1, None, client=store.new_client())
    store.call(p, "close", 0)
    with pytest.raises(EOFError):
        reader.result()
    assert poller.result() is True


@pytest.mark.parametrize("end", [2, -1, "0", None])
def test_a_pipe_has_two_ends(store: StoreHarness, end: object) -> None:
    p = store.open("Pipe", "p")
    with pytest.raises(ValueError):
        store.call(p, "send", end, "x")
    with pytest.raises(ValueError):
        store.call(p, "recv", end)


def test_a_poll_behind_a_recv_waits_for_the_next_message(store: StoreHarness) -> None:
    """An end's blocked reads are served in arrival order, as ``send`` hands a message
    to the first blocked ``recv``: a ``poll`` before that ``recv`` learns of the
    message (True), one after it does not (the message is gone) and waits on."""
    p = store.open("Pipe", "p")
    first = store.start(p, "poll", 0, None, client=store.new_client())
    reading = store.start(p, "recv", 0, client=store.new_client())
    later = [store.start(p, "poll", 0, None, client=store.new_client()) for _ in range(2)]
    assert store.waiters(p) == 4
    store.call(p, "send", 1, "m")
    assert first.result() is True
    assert reading.result() == "m"
    assert not any(poll.done() for poll in later)
    assert store.waiters(p) == 2
    assert store.stats(p).buffered == (0, 0)  # type: ignore[attr-defined]
    store.call(p, "send", 1, "n")
    assert [poll.result() for poll in later] == [True, True]
    assert store.waiters(p) == 0
    assert store.call(p, "recv", 0) == "n"
