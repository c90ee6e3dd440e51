"""A real etcd cluster for the etcd store's tests: 3 members on free loopback ports.

``running_cluster(tmp)`` starts Debian's ``etcd`` (3.4) as ``size`` processes in
``tmp``, waits until a write through ``etcdctl`` is committed (never a sleep),
and on exit stops every member, waiting for each PID to exit before its data
directory is removed (a directory removed under a live member fails the next
start with "member ... has already been bootstrapped").

Given ``extra_host`` (a local address, e.g. the root end of a veth), the
members also serve clients there, for a gateway in a network namespace.

A test can ``kill(i)`` a member (SIGKILL: a crash), ``restart(i)`` it on its
data directory and ports, and ask which member ``leader()`` is. Heartbeat 100
ms and election timeout 1 s make a failover take about 2 s, as measured in
shared/NOTES.md.

``EtcdRelay`` (in process, asyncio) stands between one etcd client and a
member to lose or delay one request's bytes on demand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.store import EtcdStore

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
ETCDCTL_TIMEOUT_S = 1.0


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel had free (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(frozen=True)
class Tls:
    """Client TLS for a cluster: the members serve ``cert``/``key`` (signed by ``ca``)
    and ask every client for a certificate signed by ``ca`` (etcdctl uses ``client_*``)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@dataclass
class EtcdCluster:
    """``size`` etcd members in ``tmp``; see the module docstring."""

    tmp: Path
    size: int = 3
    #: Another local address every member also serves clients on (the root end of
    #: a veth, for a gateway in a network namespace); see :meth:`endpoints_on`.
    extra_host: str | None = None
    members: list[Member] = field(default_factory=list)
    tls: Tls | None = None

    def __post_init__(self) -> None:
        ports = _free_ports(2 * self.size)
        self.token = f"managerd-test-{os.getpid()}-{ports[0]}"
        for i in range(self.size):
            name = f"n{i}"
            self.members.append(
                Member(
                    name=name,
                    data_dir=self.tmp / name,
                    client_port=ports[2 * i],
                    peer_port=ports[2 * i + 1],
                    log=self.tmp / f"{name}.log",
                )
            )

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def endpoints_on(self, host: str) -> list[str]:
        """The members' client endpoints at ``host`` (127.0.0.1 or ``extra_host``)."""
        return [f"{host}:{m.client_port}" for m in self.members]

    def _spawn(self, m: Member) -> None:
        initial = ",".join(f"{o.name}=http://127.0.0.1:{o.peer_port}" for o in self.members)
        scheme = "https" if self.tls else "http"
        client_url = f"{scheme}://{m.endpoint}"
        listen_urls = client_url
        if self.extra_host is not None:
            listen_urls += f",{scheme}://{self.extra_host}:{m.client_port}"
        peer_url = f"http://127.0.0.1:{m.peer_port}"
        cmd = [
            "etcd",
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", listen_urls,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",  # ignored once the data dir is bootstrapped
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "10000",
            "--logger", "zap",
            "--log-outputs", str(m.log),
        ]  # fmt: skip
        if self.tls is not None:
            cmd += [
                "--cert-file", str(self.tls.cert),
                "--key-file", str(self.tls.key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        m.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def etcdctl(
        self, *args: str, endpoints: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "etcdctl",
                f"--endpoints={','.join(endpoints or self.endpoints)}",
                f"--command-timeout={ETCDCTL_TIMEOUT_S}s",
                f"--dial-timeout={ETCDCTL_TIMEOUT_S}s",
                *(
                    []
                    if self.tls is None
                    else [
                        f"--cacert={self.tls.ca}",
                        f"--cert={self.tls.client_cert}",
                        f"--key={self.tls.client_key}",
                    ]
                ),
                *args,
            ],
            env={**os.environ, "ETCDCTL_API": "3"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ETCDCTL_TIMEOUT_S * 5,
            check=False,
        )

    def _wait_until(self, what: str, probe: list[str], endpoints: list[str] | None = None) -> None:
        """Until ``etcdctl PROBE`` succeeds (a member that exits meanwhile fails at once)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            dead = [m.name for m in self.members if m.proc is not None and not m.alive]
            if dead:
                raise RuntimeError(f"etcd {dead} exited while {what}:\n{self.logs()}")
            if self.etcdctl(*probe, endpoints=endpoints).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd not ready after {START_TIMEOUT_S} s ({what}):\n{self.logs()}")

    def start(self) -> EtcdCluster:
        self.tmp.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            self._spawn(m)
        # A committed write means a leader and a quorum.
        self._wait_until("starting", ["put", "/managerd-test/ready", "1"])
        return self

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (a crash) and wait for its PID to exit."""
        m = self.members[i]
        if m.alive:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(STOP_TIMEOUT_S)

    def restart(self, i: int) -> None:
        """Start member ``i`` again on its data directory; return once it serves reads."""
        m = self.members[i]
        assert not m.alive, f"{m.name} is running"
        self._spawn(m)
        # A linearizable read through this member needs it to have rejoined the quorum.
        self._wait_until(f"restarting {m.name}", ["get", "/managerd-test/ready"], [m.endpoint])

    def leader(self) -> int:
        """The index of the member that leads (asked of every live member; they must agree)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            live = [m for m in self.members if m.alive]
            done = self.etcdctl(
                "endpoint", "status", "-w", "json", endpoints=[m.endpoint for m in live]
            )
            if done.returncode == 0:
                statuses = json.loads(done.stdout)
                leaders = {s["Status"]["leader"] for s in statuses}
                by_id = {s["Status"]["header"]["member_id"]: s["Endpoint"] for s in statuses}
                if len(leaders) == 1 and (leader := leaders.pop()) in by_id:
                    return self.endpoints.index(by_id[leader])
            time.sleep(0.05)
        raise RuntimeError(f"no agreed leader after {START_TIMEOUT_S} s:\n{self.logs()}")

    def watching(self) -> list[int]:
        """The indexes of the live members serving at least one watch (from their /metrics)."""
        found = []
        for i, m in enumerate(self.members):
            if not m.alive:
                continue
            with urllib.request.urlopen(f"http://{m.endpoint}/metrics", timeout=5) as r:
                metrics = r.read().decode()
            gauge = re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", metrics, re.M)
            if gauge and float(gauge.group(1)) > 0:
                found.append(i)
        return found

    def stop(self) -> None:
        """SIGKILL every member, wait for each PID, then remove the data directories.

        SIGKILL, not SIGTERM: a terminated leader first tries to hand over
        leadership to members that are stopping too, which took 7 s here;
        the data is thrown away anyway.
        """
        for i in range(len(self.members)):
            self.kill(i)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)

    def logs(self, tail_lines: int = 20) -> str:
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                lines = m.log.read_text(errors="replace").splitlines()[-tail_lines:]
                out.append(f"--- {m.name} ({m.endpoint})\n" + "\n".join(lines))
        return "\n".join(out)


@contextlib.contextmanager
def running_cluster(
    tmp: Path, size: int = 3, extra_host: str | None = None, tls: Tls | None = None
) -> Iterator[EtcdCluster]:
    """A started cluster, stopped (every PID waited for) and removed on exit."""
    cluster = EtcdCluster(tmp, size, extra_host, tls=tls)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-node cluster for one test module (import it with the module's tests)."""
    with running_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


# -- a gateway host: a network namespace that reaches the cluster over a veth ------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _nft(script: str, ns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    done = subprocess.run(
        [*prefix, "nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"nft: {done.stderr.strip()}\n{script}")


@dataclass
class GatewayHost:
    """A network namespace joined to this one by a veth pair (needs root, ``ip``, ``nft``).

    ``root_addr`` is the veth's end here (the cluster also serves clients
    there: ``EtcdCluster(extra_host=root_addr)``), ``addr`` the end inside,
    where a gateway started with ``prefix`` listens. ``cut(ports)`` drops,
    silently at both ends (nftables on ingress), the TCP packets between the
    namespace and those ports, and only those: clients still reach the
    gateway, the gateway no longer reaches etcd. ``heal()`` undoes it. The
    subnet is one of 10.213.100-199.0/24 that no local address uses.
    """

    ns: str
    veth_root: str
    veth_ns: str
    root_addr: str
    addr: str
    is_cut: bool = False

    @classmethod
    def create(cls) -> GatewayHost:
        used = _ip("-4", "-o", "addr").stdout
        free = [n for n in range(100, 200) if f" 10.213.{n}." not in used]
        subnet = free[(os.getpid() + time.monotonic_ns()) % len(free)]
        tag = f"{os.getpid() % 100000:05d}{subnet:03d}"
        host = cls(
            ns=f"mdgw{tag}",
            veth_root=f"mdg{tag}r",  # at most 15 characters, as Linux wants
            veth_ns=f"mdg{tag}n",
            root_addr=f"10.213.{subnet}.1",
            addr=f"10.213.{subnet}.2",
        )
        try:
            _ip("netns", "add", host.ns)
            _ip("link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_ns)
            _ip("link", "set", host.veth_ns, "netns", host.ns)
            _ip("addr", "add", f"{host.root_addr}/24", "dev", host.veth_root)
            _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.veth_ns)
            _ip("link", "set", host.veth_root, "up")
            _ip("-n", host.ns, "link", "set", host.veth_ns, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
        except BaseException:
            host.destroy()
            raise
        return host

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program in the namespace."""
        return ["ip", "netns", "exec", self.ns]

    @property
    def _table(self) -> str:
        return f"cut{self.ns}"

    def cut(self, ports: list[int]) -> None:
        """Drop the TCP packets between the namespace and ``ports`` (etcd's), both ways."""
        ps = ", ".join(str(p) for p in ports)
        rule = (
            "table netdev {t} {{\n chain in {{\n"
            "  type filter hook ingress device {d} priority 0\n"
            "  tcp {w} {{ {ps} }} drop\n }}\n}}\n"
        )
        _nft(rule.format(t=self._table, d=self.veth_root, w="dport", ps=ps))
        _nft(rule.format(t=self._table, d=self.veth_ns, w="sport", ps=ps), self.ns)
        self.is_cut = True

    def heal(self) -> None:
        """Undo :meth:`cut` (a no-op when not cut)."""
        for ns in (None, self.ns):
            prefix = ["ip", "netns", "exec", ns] if ns else []
            subprocess.run(
                [*prefix, "nft", "delete", "table", "netdev", self._table],
                capture_output=True,
                timeout=30,
                check=False,
            )
        self.is_cut = False

    def destroy(self) -> None:
        """Heal, then delete the namespace and the veth pair. Idempotent."""
        self.heal()
        _ip("netns", "del", self.ns, check=False)
        _ip("link", "del", self.veth_root, check=False)


@contextlib.contextmanager
def gateway_host() -> Iterator[GatewayHost]:
    """:meth:`GatewayHost.create` on entry, :meth:`GatewayHost.destroy` on exit."""
    host = GatewayHost.create()
    try:
        yield host
    finally:
        host.destroy()


class EtcdRelay:
    """A TCP relay to one etcd member, in this event loop, for an etcd client's bytes.

    ``cut_after(marker)``: the next request holding ``marker`` goes through, then the
    connection is cut before etcd's answer comes back (applied, answer lost: as when
    a leader dies at that moment). ``hold_from(marker)``: from the request holding
    ``marker`` on, nothing goes to etcd (the connection stays open, as in a cut
    network) until ``let_through()`` sends it all, in order. ``refusing``: a new
    connection is closed at once (etcd unreachable), until it is False again.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cuts = 0
        self.held = asyncio.Event()  # set once a request was held
        self._cut_marker: bytes | None = None
        self._hold_marker: bytes | None = None
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.refusing = False

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def cut_after(self, marker: bytes) -> None:
        self._cut_marker = marker

    def hold_from(self, marker: bytes) -> None:
        self._hold_marker = marker

    def let_through(self) -> None:
        self._released.set()

    def drop_connections(self) -> None:
        """Cut every connection relayed so far (a client reconnects: see ``refusing``)."""
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await self._server.wait_closed()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        cut = asyncio.Event()

        async def upstream() -> None:
            holding = False
            while data := await reader.read(65536):
                if self._hold_marker is not None and self._hold_marker in data:
                    self._hold_marker = None
                    holding = True
                    self.held.set()
                if holding:
                    await self._released.wait()
                up_writer.write(data)
                await up_writer.drain()
                if self._cut_marker is not None and self._cut_marker in data:
                    self._cut_marker = None
                    cut.set()
                    return

        async def downstream() -> None:
            while not cut.is_set() and (data := await up_reader.read(65536)):
                if cut.is_set():
                    return  # the answer to the marked request: lost
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(pumps, return_when="FIRST_COMPLETED")
        except asyncio.CancelledError:  # the relay closed
            pass
        if cut.is_set():
            await asyncio.sleep(0.5)  # etcd applies it; its answer is dropped meanwhile
            self.cuts += 1
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            w.transport.abort()


def relayed_and_direct(
    cluster: EtcdCluster,
    body: Callable[[EtcdRelay, EtcdStore, EtcdStore], Awaitable[None]],
    *,
    root: bytes,
    session_ttl_s: int,
    rpc_timeout_s: float = 0.5,
    retry_budget_s: float = 1.5,
) -> None:
    """``body(relay, a, b)`` in a new event loop: store A reaches ``cluster`` through
    ``relay`` (with these deadlines: by default it gives up in 1.5 s), store B
    directly; both under ``root``. Afterwards the relay lets everything through
    and the stores and the relay are closed."""

    async def main() -> None:
        relay = EtcdRelay(cluster.endpoints[0])
        via = await relay.start()
        async with (
            EtcdClient([via], rpc_timeout_s=rpc_timeout_s, retry_budget_s=retry_budget_s) as ca,
            EtcdClient(cluster.endpoints) as cb,
        ):
            a = await EtcdStore.open(ca, root=root, session_ttl_s=session_ttl_s)
            b = await EtcdStore.open(cb, root=root, session_ttl_s=session_ttl_s)
            try:
                await body(relay, a, b)
            finally:
                relay.refusing = False
                relay.let_through()
                for store in (a, b):
                    await asyncio.wait_for(store.close(), 30)
        await relay.close()

    asyncio.run(main())


class RelayThread:
    """An ``EtcdRelay`` run by an event loop of its own in a thread: for a gateway
    process (``--store etcd://<address>``) whose etcd bytes a synchronous test holds."""

    def __init__(self, target: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.relay = EtcdRelay(target)
        self.address: str = self._run(self.relay.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def hold_from(self, marker: bytes) -> None:
        """``EtcdRelay.hold_from``, in force once this returns."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def hold() -> None:
            self.relay.hold_from(marker)
            done.set_result(None)

        self.loop.call_soon_threadsafe(hold)
        done.result(30)

    def holds(self) -> bool:
        """Whether a request with the marker came, and is held."""
        return self.relay.held.is_set()

    def held(self, timeout_s: float) -> bool:
        """Whether a request with the marker comes (and is held) within ``timeout_s``."""

        async def wait() -> None:
            await self.relay.held.wait()

        try:
            self._run(asyncio.wait_for(wait(), timeout_s))
        except TimeoutError:
            return False
        return True

    def let_through(self) -> None:
        self.loop.call_soon_threadsafe(self.relay.let_through)

    def close(self) -> None:
        self.let_through()
        self._run(self.relay.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
