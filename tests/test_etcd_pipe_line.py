"""A pipe end's blocked reads on two gateways of one etcd cluster: one line.

Real ``managerd serve --store etcd://...`` processes on a real 3-node
cluster, readers in their own threads and connections: reads of one end
blocked in turn on gateway A, B, A, ... are answered in the order they
blocked, as the embedded store answers an end's readers; a ``poll`` ahead
of a ``recv`` in the line is ready when a message comes (even one taken at
once through the other gateway), and a ``poll`` behind it waits for the
next; a dead gateway's blocked reader is passed over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from test_etcd_gateways import gateways, wait_for_waiter

from conftest import Daemon, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster", "gateways"]  # the fixtures

#: How long a test's blocked read waits at most (a wrong line leaves one waiting).
READ_S = 20


def _blocked_read(
    gateway: Daemon,
    name: str,
    method: str,
    got: dict[str, Any],
    key: str,
    order: list[str] | None = None,
) -> threading.Thread:
    """A thread whose reader blocks in ``method`` (``recv`` or ``poll``) of ``name``'s
    end 1 on ``gateway``: ``got[key]`` its answer, or ``("failed", exception)``;
    ``key`` appended to ``order`` once answered."""

    def read() -> None:
        try:
            with gateway.connect() as m:
                _, end = m.Pipe(name)
                call: Callable[[float], Any] = getattr(end, method)
                got[key] = call(READ_S)
        except Exception as exc:
            got[key] = ("failed", exc)
        if order is not None:
            order.append(key)

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def _passed_over(*gateways: Daemon) -> list[str]:
    """The gateways' log lines of places passed over (a gateway seen silent for
    ``SILENT_PLACE_S``: under a heavy load, a live one too)."""
    return [line for g in gateways for line in g.lines if "passing over" in line]


def _places(cluster: EtcdCluster, name: str) -> int:
    """How many places the line of ``name``'s end 1 has in etcd (``j/`` keys; each
    test's pipe has a name of its own)."""
    done = cluster.etcdctl("get", "--prefix", "/", "--keys-only")
    assert done.returncode == 0, done.stderr
    return sum(f"/p/{name}/q/1/j/" in line for line in done.stdout.splitlines())


def _block_in_turn(
    cluster: EtcdCluster,
    gateways: list[Daemon],
    reads: list[str],
    name: str,
    got: dict[str, Any],
    order: list[str] | None = None,
) -> list[threading.Thread]:
    """Readers of ``name``'s end 1 blocked one after the other, the i-th in ``reads[i]``
    on ``gateways[i]``, each counted waiting on its gateway and in the line (its place
    in etcd) before the next starts; ``got[str(i)]`` the i-th's answer."""
    on: dict[str, int] = {}
    threads = []
    for i, (gateway, method) in enumerate(zip(gateways, reads, strict=True)):
        threads.append(_blocked_read(gateway, name, method, got, str(i), order))
        on[gateway.address] = on.get(gateway.address, 0) + 1
        assert wait_for_waiter(gateway, on[gateway.address], name)
        assert wait_until(lambda n=i + 1: _places(cluster, name) == n)
    return threads


def test_recvs_blocked_on_two_gateways_are_answered_in_the_order_they_blocked(
    cluster: EtcdCluster, gateways: tuple[Daemon, Daemon]
) -> None:
    """Readers of one end block in ``recv`` in turn on A, B, A, B, A; five messages
    sent one by one through B: the first to block gets the first, and so on."""
    a, b = gateways
    got: dict[str, Any] = {}
    threads = _block_in_turn(cluster, [a, b, a, b, a], ["recv"] * 5, "line", got)
    with b.connect() as sender:
        near, _ = sender.Pipe("line")
        for i in range(5):
            near.send(i)
        for thread in threads:
            thread.join(READ_S + 5)
        assert got == {str(i): i for i in range(5)}, _passed_over(a, b)
        assert sender.Pipe("line")[1].poll() is False  # every message taken once


def test_a_poll_ahead_of_a_recv_on_another_gateway_is_ready_one_behind_it_waits(
    cluster: EtcdCluster, gateways: tuple[Daemon, Daemon]
) -> None:
    """In line: a poll on B, a recv on A, a poll on B, a recv on A. A first message
    makes the first poll ready and goes to the first recv, while the second poll waits
    on (the message is gone); a second message makes it ready and goes to the second
    recv, as the embedded store's ``send`` serves an end's readers."""
    a, b = gateways
    got: dict[str, Any] = {}
    order: list[str] = []
    threads = _block_in_turn(
        cluster, [b, a, b, a], ["poll", "recv", "poll", "recv"], "ahead", got, order
    )
    with a.connect() as sender:
        near, _ = sender.Pipe("ahead")
        near.send("first")
        threads[0].join(READ_S + 5)
        threads[1].join(READ_S + 5)
        assert got["0"] is True
        assert got["1"] == "first"
        order.append("second sent")
        near.send("second")
        threads[2].join(READ_S + 5)
        threads[3].join(READ_S + 5)
    assert got == {"0": True, "1": "first", "2": True, "3": "second"}
    assert order.index("2") > order.index("second sent")  # not ready for the first


def test_a_dead_gateways_blocked_reader_is_passed_over(
    cluster: EtcdCluster, gateways: tuple[Daemon, Daemon]
) -> None:
    """A reader blocked on A, then one on B; A is killed: a message sent through B goes
    to B's reader (A's place is passed over once the message stands untaken), and the
    next message, too, to B's next reader."""
    a, b = gateways
    got: dict[str, Any] = {}
    first, second = _block_in_turn(cluster, [a, b], ["recv", "recv"], "passed", got)
    a.kill()
    with b.connect() as sender:
        near, far = sender.Pipe("passed")
        near.send("for the living")
        second.join(READ_S + 5)
        assert got.get("1") == "for the living"
        third = _blocked_read(b, "passed", "recv", got, "2")
        assert wait_for_waiter(b, 1, "passed")
        near.send("next")
        third.join(READ_S + 5)
        assert got["2"] == "next"
        assert far.poll() is False  # nothing left for the dead reader
    first.join(READ_S + 5)  # its gateway died: the call failed, nothing was taken for it
    assert got["0"][0] == "failed"


def test_a_poll_blocked_on_one_gateway_is_ready_for_a_message_taken_at_once_on_the_other(
    cluster: EtcdCluster, gateways: tuple[Daemon, Daemon]
) -> None:
    """A poll blocked on B; a message sent and taken at once (``recv(0)``) through A:
    the poll is ready (True), as the embedded store's ``send`` answers it before the
    message can be taken."""
    a, b = gateways
    got: dict[str, Any] = {}
    threads = _block_in_turn(cluster, [b], ["poll"], "taken", got)
    with a.connect() as m:
        near, far = m.Pipe("taken")
        near.send("m")
        assert far.recv(0) == "m"
        threads[0].join(READ_S + 5)
    assert got == {"0": True}
