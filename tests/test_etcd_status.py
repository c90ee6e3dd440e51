"""Status across gateways: objects used through gateway A show their figures at gateway B.

Two real ``managerd serve --store etcd://...`` processes on one real 3-node
etcd cluster; clients are real processes (this one and its threads) on A.
B's ``managerd status --json``, ``/status.json`` and ``/metrics`` must show
the cluster's figures, read from etcd (``managerd/store/etcd/stats.py``):
a queue's depth, reservations and the consumer waiting on A; a lock's
holder as host:pid:thread with its fencing token and the waiter on A; a
semaphore's holder; an event, a barrier, a pipe's buffered message, the
sizes of a dict, a list and a Value's number.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from fractions import Fraction
from multiprocessing.managers import BaseManager, DictProxy, ListProxy
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, free_port, metric, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def two_gateways(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, int]]:
    """Gateways A and B on one prefix; B's metrics port is the third value."""
    prefix = "/st" + secrets.token_hex(4) + "/"
    args = ["--store", "etcd://" + ",".join(cluster.endpoints), "--store-prefix", prefix]
    web = free_port()
    a = Daemon(tmp_path / "a", args=args)
    b = Daemon(tmp_path / "b", args=[*args, "--metrics-port", str(web)])
    b.authkey = a.authkey
    started = []
    try:
        started.append(a.start())
        started.append(b.start())
        yield a, b, web
    finally:
        for d in started:
            d.stop()


def status_cli(d: Daemon) -> dict[str, Any]:
    env = dict(os.environ, MANAGERD_AUTHKEY=d.authkey.decode())
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "status", "--port", str(d.port), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def status_json(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


def test_objects_used_through_a_show_their_figures_at_b(
    two_gateways: tuple[Daemon, Daemon, int],
) -> None:
    a, b, web = two_gateways
    with a.connect() as m, a.connect() as waiter:
        jobs = m.Queue("jobs")
        jobs.put_many([1, 2, 3])
        jobs.reserve()
        db = m.Lock("db")
        assert db.acquire()
        token = db.fencing_token
        holder_thread = threading.get_ident()
        assert m.Semaphore("pool", 3).acquire()
        m.Event("go").set()
        m.dict("results").update({"a": 1, "b": 2})
        m.list("log").extend([1, 2, 3, 4])
        m.Value("counter", "i", 7)
        m.Barrier("meet", 3)
        end, _ = m.Pipe("chat")
        end.send("hello")
        got: list[Any] = []
        blocked = [
            threading.Thread(target=lambda: got.append(waiter.Lock("db").acquire(timeout=30))),
            threading.Thread(target=lambda: got.append(waiter.Queue("idle").get(timeout=30))),
        ]
        for t in blocked:
            t.start()

        def report() -> dict[str, Any]:
            with b.connect() as at_b:  # the daemon's own status document, as B reads it
                doc: dict[str, Any] = at_b.status()["objects"]
                return doc

        def settled() -> bool:
            objects = report()
            waiters = [objects.get(name, {}).get("waiters") for name in ("db", "idle")]
            return waiters == [1, 1]

        assert wait_until(settled, timeout_s=30)
        objects = report()
        assert objects["jobs"]["depth"] == 2 and objects["jobs"]["reserved"] == 1
        lock = objects["db"]
        assert lock["held"] and lock["token"] == token
        assert lock["holder"]["pid"] == os.getpid()
        assert lock["holder"]["host"] == socket.gethostname()
        assert lock["holder"]["thread"] == holder_thread
        assert lock["held_for_s"] is not None and lock["held_for_s"] >= 0
        assert [w["pid"] for w in lock["waiting"]] == [os.getpid()]
        pool = objects["pool"]
        assert pool["value"] == 2 and [h["permits"] for h in pool["holders"]] == [1]
        assert pool["holders"][0]["pid"] == os.getpid()
        assert objects["go"]["set"] is True
        assert objects["results"]["len"] == 2 and objects["log"]["len"] == 4
        assert objects["counter"]["value"] == 7
        assert objects["meet"]["broken"] is False
        assert objects["chat"]["buffered"] == [0, 1]

        # The same figures in B's /status.json, `managerd status --json` and metrics.
        for summary in (status_json(web), status_cli(b)):
            queues = {q["name"]: q for q in summary["queues"]}
            assert (queues["jobs"]["depth"], queues["jobs"]["reserved"]) == (2, 1)
            assert queues["idle"]["waiters"] == 1
            locks = {lk["name"]: lk for lk in summary["locks"]}
            assert locks["db"]["token"] == token and locks["db"]["waiters"] == 1
            (holder,) = locks["db"]["holders"]
            assert (holder["pid"], holder["thread"]) == (os.getpid(), holder_thread)
            data = {d["name"]: d for d in summary["data"]}
            assert (data["results"]["size"], data["log"]["size"]) == (2, 4)
        assert metric(web, "managerd_queue_depth", queue="jobs") == 2

        m.Queue("idle").put("wake")
        db.release()
        for t in blocked:
            t.join(30)
    assert sorted(map(repr, got)) == sorted([repr(True), repr("wake")])
    # Once the waits ended: no waiter left, at B either.
    with b.connect() as at_b:
        assert wait_until(lambda: at_b.status()["objects"]["idle"]["waiters"] == 0, timeout_s=30)


class StockManager(BaseManager):
    """A stock client of dicts and lists."""


StockManager.register("dict", proxytype=DictProxy)
StockManager.register("list", proxytype=ListProxy)


def stock_client(gateway: Daemon) -> Any:
    stock = StockManager(address=("127.0.0.1", gateway.port), authkey=gateway.authkey)
    stock.connect()
    return stock


def test_whole_values_are_read_through_either_gateway(
    two_gateways: tuple[Daemon, Daemon, int],
) -> None:
    """A stock client's ``_getvalue()`` and ``managerd get`` through B copy what A's
    clients stored (read from etcd when asked), taking nothing."""
    a, b, _ = two_gateways
    with a.connect() as m:
        m.dict("d").update({"k": [1, 2], 3: "three"})
        m.list("l").extend(["x", None])
        m.Queue("jobs").put_many(["first", "second"])
        m.Value("v", "i", 7)
        stock = stock_client(b)
        assert stock.dict("d")._getvalue() == {"k": [1, 2], 3: "three"}
        assert stock.list("l")._getvalue() == ["x", None]

        env = dict(os.environ, MANAGERD_AUTHKEY=b.authkey.decode())

        def get(name: str) -> Any:
            done = subprocess.run(
                [sys.executable, "-m", "managerd", "get", name, "--port", str(b.port)],
                env=env, capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            return json.loads(done.stdout)

        assert get("jobs") == ["first", "second"]
        assert get("v") == 7
        assert get("d") == {"k": [1, 2], "3": "three"}  # (JSON's keys)
        assert m.Queue("jobs").qsize() == 2  # nothing taken


def test_a_stock_client_never_takes_what_it_cannot_decode(
    two_gateways: tuple[Daemon, Daemon, int],
) -> None:
    """A dict's or list's value a managerd client stored as a class the stock dialect
    refuses: a stock client's pop/popitem through B is refused and the value stays
    (checked where etcd removes it: the gateway cannot say beforehand)."""
    a, b, _ = two_gateways
    with a.connect() as m:
        m.dict("fractions")["k"] = Fraction(1, 3)
        m.list("halves").append(Fraction(1, 2))
        stock = stock_client(b)
        d = stock.dict("fractions")
        lst = stock.list("halves")
        for take in (lambda: d.pop("k"), d.popitem, lst.pop):
            with pytest.raises(Exception, match="Fraction"):
                take()
        assert m.dict("fractions")["k"] == Fraction(1, 3)
        assert m.list("halves")[:] == [Fraction(1, 2)]
