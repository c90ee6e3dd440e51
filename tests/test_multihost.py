"""Two hosts: the daemon in one network namespace, clients in another.

The daemon listens on ``10.213.0.1`` (host 1); every client is a separate
process on ``10.213.0.2`` (host 2), started with ``ip netns exec``. The test
process itself is on neither host, so all it knows comes from the clients'
output. The client roles are module-level functions run as
``python -c "import test_multihost; ..." ROLE ARGS``.

Needs root (CI is root, and there these tests must run: under ``CI`` a
missing capability is a failure, not a skip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from managerd_client import Manager, connect

import netns
from conftest import Daemon, wait_until

pytestmark = pytest.mark.multihost

TESTS = Path(__file__).resolve().parent
CLIENT_TIMEOUT_S = 60.0
DONE = "__done__"


# -- client roles: run on host 2 --------------------------------------------------------


def _manager() -> Manager:
    return connect(os.environ["MANAGERD_ADDRESS"])  # authkey from MANAGERD_AUTHKEY


def produce(name: str, producer: str, count: str) -> None:
    with _manager() as m:
        q = m.Queue(name)
        for i in range(int(count)):
            q.put([producer, i])


def produce_stock(name: str, producer: str, count: str) -> None:
    """A producer that is a stock stdlib client: no managerd code."""
    from multiprocessing.managers import BaseManager

    class Stock(BaseManager):
        pass

    Stock.register("Queue")
    host, port = os.environ["MANAGERD_ADDRESS"].rsplit(":", 1)
    m: Any = Stock(address=(host, int(port)), authkey=os.environ["MANAGERD_AUTHKEY"].encode())
    m.connect()
    q = m.Queue(name)
    for i in range(int(count)):
        q.put([producer, i])


def consume(name: str) -> None:
    """Take items until the sentinel; print them as JSON."""
    got = []
    with _manager() as m:
        q = m.Queue(name)
        while True:
            item = q.get(timeout=CLIENT_TIMEOUT_S)
            if item == DONE:
                break
            got.append(item)
    print(json.dumps(got))


def fill_dict(name: str, worker: str, count: str) -> None:
    with _manager() as m:
        d = m.dict(name)
        for i in range(int(count)):
            d[f"{worker}-{i}"] = [worker, i]


def dump_dict(name: str) -> None:
    with _manager() as m:
        print(json.dumps(sorted(m.dict(name).items())))


def produce_sentinels(name: str, count: str) -> None:
    with _manager() as m:
        q = m.Queue(name)
        for _ in range(int(count)):
            q.put(DONE)


def increment_under_lock(name: str, count: str) -> None:
    """Read-modify-write a shared counter, each step under a named Lock."""
    with _manager() as m:
        counter = m.dict(name)
        lock = m.Lock(name + "-lock")
        for _ in range(int(count)):
            with lock:
                counter["n"] = counter.get("n", 0) + 1


def main(argv: Sequence[str]) -> None:
    role, *args = argv
    globals()[role](*args)


# -- the test side ----------------------------------------------------------------------


def _require_namespaces() -> None:
    """Skip (fail under CI) unless this machine can make network namespaces."""
    reason = netns.unavailable_reason()
    if reason is None:
        try:
            netns.destroy(netns.create())
        except netns.NetnsError as exc:
            reason = f"cannot make network namespaces: {exc}"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"multihost tests must run in CI, but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.TwoHosts]:
    _require_namespaces()
    with netns.two_hosts() as h:
        yield h


@pytest.fixture(scope="module")
def remote_daemon(
    hosts: netns.TwoHosts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """A daemon on host 1, listening on host 1's address only."""
    d = Daemon(tmp_path_factory.mktemp("multihost"))
    d.host = hosts.addr1
    d.start(prefix=hosts.prefix(1))
    try:
        yield d
    finally:
        d.stop()  # before the namespaces go: fixtures tear down in reverse


class Clients:
    """Client processes on host 2; any still running at teardown is killed."""

    def __init__(self, hosts: netns.TwoHosts, daemon: Daemon) -> None:
        self.hosts = hosts
        self.daemon = daemon
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *argv: str) -> subprocess.Popen[str]:
        """Start ``main(argv)`` of this module on host 2."""
        env = self.daemon.client_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        code = "import sys, test_multihost; test_multihost.main(sys.argv[1:])"
        proc = self.hosts.popen(
            2,
            [sys.executable, "-c", code, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[str]) -> str:
        """Wait for a client; its stdout, or a failure with its stderr."""
        try:
            out, err = proc.communicate(timeout=CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"client {proc.args!r} did not finish:\n{err}")
        assert proc.returncode == 0, f"client {proc.args!r} failed:\n{err}"
        return out

    def run(self, *argv: str) -> str:
        return self.finish(self.start(*argv))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def clients(hosts: netns.TwoHosts, remote_daemon: Daemon) -> Iterator[Clients]:
    c = Clients(hosts, remote_daemon)
    try:
        yield c
    finally:
        c.close()


def test_daemon_is_only_on_host_1(hosts: netns.TwoHosts, remote_daemon: Daemon) -> None:
    assert remote_daemon.host == "10.213.0.1"
    assert "serving on 10.213.0.1:" in remote_daemon.log
    # Host 2 reaches it over the link, from its own address.
    probe = (
        "import socket, sys; "
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); "
        "print(s.getsockname()[0])"
    )
    done = hosts.run(2, [sys.executable, "-c", probe, hosts.addr1, str(remote_daemon.port)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hosts.addr2


def test_queue_producers_and_consumers_across_hosts(clients: Clients) -> None:
    name, count = "mh-jobs", 150
    consumers = [clients.start("consume", name) for _ in range(2)]
    producers = [
        clients.start("produce", name, "p1", str(count)),
        clients.start("produce", name, "p2", str(count)),
        clients.start("produce_stock", name, "stock", str(count)),
    ]
    for p in producers:
        clients.finish(p)
    # One sentinel per consumer, after every item (the queue is FIFO).
    clients.run("produce_sentinels", name, "2")

    got = [tuple(item) for c in consumers for item in json.loads(clients.finish(c))]
    expected = {(p, i) for p in ("p1", "p2", "stock") for i in range(count)}
    assert len(got) == len(expected)  # nothing delivered twice
    assert set(got) == expected  # nothing lost


def test_dict_filled_by_workers_on_another_host(clients: Clients) -> None:
    name, count = "mh-results", 60
    workers = [clients.start("fill_dict", name, f"w{n}", str(count)) for n in range(3)]
    for w in workers:
        clients.finish(w)
    items = json.loads(clients.run("dump_dict", name))
    assert len(items) == 3 * count
    assert dict(items) == {f"w{n}-{i}": [f"w{n}", i] for n in range(3) for i in range(count)}


def test_lock_gives_mutual_exclusion_across_hosts(clients: Clients) -> None:
    name, count, workers = "mh-counter", 100, 3
    procs = [clients.start("increment_under_lock", name, str(count)) for _ in range(workers)]
    for p in procs:
        clients.finish(p)
    items = json.loads(clients.run("dump_dict", name))
    assert items == [["n", workers * count]]  # no lost update


def test_two_hosts_partition_and_cleanup() -> None:
    _require_namespaces()

    def link(h: netns.TwoHosts, n: int) -> str:
        return netns.ip("-n", h.ns(n), "link", "show", h.veth(n)).stdout

    with netns.two_hosts() as h:
        assert netns.exists(h.ns1)
        assert netns.exists(h.ns2)
        assert "LOWER_UP" in link(h, 2)
        h.link_down(1)
        assert "NO-CARRIER" in link(h, 2)  # host 2 sees the cut
        h.link_up(1)
        assert wait_until(lambda: "LOWER_UP" in link(h, 2))
    assert not netns.exists(h.ns1)
    assert not netns.exists(h.ns2)
    assert netns.ip("link", "show", h.veth1, check=False).returncode != 0
