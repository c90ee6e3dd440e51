"""A history check of the etcd store: record every operation under faults, then check them.

Two gateways (``managerd serve --store etcd://...``) serve one 3-member etcd
cluster: ``g1`` here, ``g2`` in a network namespace that reaches etcd over a
veth. Client processes, each connected to ``"g1,g2"``, do for ``--seconds``:

- **read-modify-write under a Lock**: acquire ``hist.lock`` (fencing token
  ``t``), read the Value ``hist.counter`` (``count << 32 | token of its last
  writer``), and unless a larger token wrote it (fenced) write
  ``count + 1`` with ``t``, then release;
- **queue transfers** on ``hist.jobs``: put items with unique ids; get them,
  or reserve and ack them.

Meanwhile a nemesis, in turn: kill -9 an etcd member (sometimes the
leader) and restart it; kill -9 a gateway and restart it; cut ``g2`` from
etcd (nftables drop, both ways) for longer than the session TTL, then heal.

Each operation is recorded by its client (a line when invoked, a line when
it returned: ``ok``, ``fail`` — it certainly did not happen — or ``info``:
indeterminate, it may have happened; an operation still open when its
client ended is ``info`` too). Errors of a client whose gateway died
(``SessionExpired``, a new session) fail or leave indeterminate the
operation they hit: they are not violations. At the end the faults are
healed, the queue is drained, the counter read, and :func:`check` looks for:

- **lost**: an acknowledged put never delivered (by an ok get or an ok ack)
  nor left in the queue — beyond the indeterminate gets, which may have
  taken an item nobody saw;
- **duplicate**: an item consumed twice (two ok gets/acks), or delivered
  (reserved or got) again after an ok ack or get returned, or left in the
  queue after one; an item delivered that was never put, or whose put
  certainly failed;
- **lock overlap**: holdings known to be held (from the return of an ok
  acquire to the invocation of an ok release) that overlap in time, or
  whose order contradicts their fencing tokens; one token given twice;
- **counter**: two ok writes from the same read (a lost update); a read
  older than a write that had returned before it began; a final count
  below the ok writes or above the ok and indeterminate ones together.

Usage (root; ``ip``, ``nft`` and Debian's ``etcd``)::

    timeout 600 uv run python scripts/etcd_history.py --seconds 300

prints the counts of operations, faults and violations (``--json``: one
JSON object) and exits 1 when a violation is found.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

LOCK = "hist.lock"
COUNTER = "hist.counter"
QUEUE = "hist.jobs"
SESSION_TTL_S = 3
VISIBILITY_S = 8.0
TOKEN_BITS = 32
TOKEN_MASK = (1 << TOKEN_BITS) - 1
#: How long a client may take to finish its last operation once its time is up.
CLIENT_GRACE_S = 30.0


# -- the record of one run ---------------------------------------------------------------


@dataclass
class Op:
    """One operation: its client, kind, times (``end`` None if it never returned),
    result (``ok``, ``fail``, ``info``), argument and value."""

    client: int
    kind: str
    start: float
    end: float | None
    result: str
    arg: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    error: str = ""
    gateway: str = ""


def read_history(lines: Iterator[str]) -> list[Op]:
    """Pair invocation and return lines; an invocation with no return is ``info``."""
    open_ops: dict[tuple[int, int], Op] = {}
    ops: list[Op] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short
        key = (rec["c"], rec["i"])
        if "f" in rec:
            op = Op(
                rec["c"],
                rec["f"],
                rec["t"],
                None,
                "info",
                rec.get("a", {}),
                gateway=rec.get("g", ""),
            )
            open_ops[key] = op
            ops.append(op)
        elif key in open_ops:
            op = open_ops.pop(key)
            op.end, op.result = rec["t"], rec["r"]
            op.value, op.error = rec.get("v"), rec.get("e", "")
    return ops


@dataclass
class Violation:
    kind: str
    detail: str


def check(ops: list[Op], leftover: list[str], final_counter: int | None) -> list[Violation]:
    """Every violation the history shows (see the module docstring)."""
    return [*_check_queue(ops, leftover), *_check_locks(ops), *_check_counter(ops, final_counter)]


def _check_queue(ops: list[Op], leftover: list[str]) -> list[Violation]:
    found: list[Violation] = []
    puts = {"ok": set(), "fail": set(), "info": set()}  # type: dict[str, set[str]]
    for op in ops:
        if op.kind == "put":
            puts[op.result].add(op.arg["item"])
    consumed: dict[str, list[Op]] = defaultdict(list)  # ok gets and ok acks
    delivered: dict[str, list[Op]] = defaultdict(list)  # ok gets and ok reserves
    maybe_consumed: set[str] = set()  # indeterminate acks
    info_gets = 0
    for op in ops:
        if op.kind == "get" and op.result == "ok":
            consumed[op.value].append(op)
            delivered[op.value].append(op)
        elif op.kind == "get" and op.result == "info":
            info_gets += 1
        elif op.kind == "reserve" and op.result == "ok":
            delivered[op.value[0]].append(op)
        elif op.kind == "ack" and op.result == "ok":
            consumed[op.arg["item"]].append(op)
        elif op.kind == "ack" and op.result == "info":
            maybe_consumed.add(op.arg["item"])
    everything_put = puts["ok"] | puts["info"]
    for item, took in consumed.items():
        if len(took) > 1:
            found.append(Violation("duplicate", f"{item} consumed {len(took)} times: {took}"))
    left = Counter(leftover)
    for item, n in left.items():
        if n > 1:
            found.append(Violation("duplicate", f"{item} left {n} times in the queue"))
        if item in consumed:
            found.append(Violation("duplicate", f"{item} left in the queue after {consumed[item]}"))
    for item, took in consumed.items():
        first_end = min(t.end for t in took if t.end is not None)
        for d in delivered[item]:
            if d.start > first_end:
                found.append(
                    Violation("duplicate", f"{item} delivered by {d} after it was consumed")
                )
    for item in set(delivered) | set(left):
        if item not in everything_put:
            why = "whose put failed" if item in puts["fail"] else "never put"
            found.append(Violation("duplicate", f"{item} delivered, {why}"))
    lost = puts["ok"] - set(consumed) - maybe_consumed - set(left)
    if len(lost) > info_gets:
        found.append(
            Violation(
                "lost",
                f"{len(lost)} acknowledged puts never delivered nor left in the queue, "
                f"{info_gets} indeterminate gets to explain them: {sorted(lost)[:10]}",
            )
        )
    return found


@dataclass
class Holding:
    client: int
    token: int
    acquired: float  # the ok acquire returned
    releasing: float  # the ok release was invoked


def holdings(ops: list[Op]) -> list[Holding]:
    """The holdings known to be held: an ok acquire and an ok release of one token."""
    acquired: dict[tuple[int, int], float] = {}
    found = []
    for op in sorted(ops, key=lambda o: o.start):
        if op.kind == "acquire" and op.result == "ok" and op.end is not None:
            acquired[(op.client, op.value)] = op.end
        elif op.kind == "release" and op.result == "ok":
            start = acquired.pop((op.client, op.arg["token"]), None)
            if start is not None:
                found.append(Holding(op.client, op.arg["token"], start, op.start))
    return found


def _check_locks(ops: list[Op]) -> list[Violation]:
    found: list[Violation] = []
    granted = Counter(op.value for op in ops if op.kind == "acquire" and op.result == "ok")
    for token, n in granted.items():
        if n > 1:
            found.append(Violation("lock overlap", f"token {token} granted {n} times"))
    # For tokens a < b, a's holding must end before b's begins: b's known start
    # is after the latest known end of every smaller token.
    latest: Holding | None = None
    for h in sorted(holdings(ops), key=lambda h: h.token):
        if latest is not None and h.acquired < latest.releasing and h.token != latest.token:
            found.append(Violation("lock overlap", f"{h} held before {latest} ended"))
        if latest is None or h.releasing > latest.releasing:
            latest = h
    return found


def _check_counter(ops: list[Op], final_counter: int | None) -> list[Violation]:
    found: list[Violation] = []
    writes = [op for op in ops if op.kind == "write"]
    ok = [w for w in writes if w.result == "ok"]
    info = [w for w in writes if w.result == "info"]
    same_read = Counter(w.arg["read"] for w in ok)
    for count, n in same_read.items():
        if n > 1:
            found.append(Violation("counter", f"{n} ok writes from the same read {count}"))
    done = sorted((w.end, w.arg["read"] + 1) for w in ok if w.end is not None)
    best, i = 0, 0
    for read in sorted((op for op in ops if op.kind == "read" and op.result == "ok"),
                       key=lambda op: op.start):  # fmt: skip
        while i < len(done) and done[i][0] < read.start:
            best = max(best, done[i][1])
            i += 1
        if (read.value >> TOKEN_BITS) < best:
            found.append(Violation("counter", f"{read} read less than {best}, written before"))
    if final_counter is not None:
        count = final_counter >> TOKEN_BITS
        if not len(ok) <= count <= len(ok) + len(info):
            found.append(
                Violation(
                    "counter",
                    f"final count {count}; {len(ok)} ok and {len(info)} indeterminate writes",
                )
            )
    return found


# -- a client (run as: etcd_history.py --role client ...) --------------------------------


class _Failed(Exception):
    """The operation just recorded did not succeed."""


class Recorder:
    def __init__(self, path: Path, client: int) -> None:
        self.file = path.open("a", buffering=1)
        self.client = client
        self.n = 0
        #: Where the client's calls go now (the gateway's address), for the record.
        self.where: Callable[[], str] = lambda: ""

    def _write(self, rec: dict[str, Any]) -> None:
        self.file.write(json.dumps(rec) + "\n")

    def op(self, kind: str, fn: Callable[[], Any], **arg: Any) -> Any:
        """Run ``fn`` as the operation ``kind``; raise _Failed unless it succeeded."""
        from managerd_client import ConnectFailed, LockLost

        self.n += 1
        key = {"c": self.client, "i": self.n}
        self._write({**key, "f": kind, "t": time.monotonic(), "a": arg, "g": self.where()})
        try:
            value = fn()
        except (queue.Empty, ConnectFailed, LockLost) as exc:
            # Never sent (no gateway answered, or the proxy knew its lock was gone),
            # or refused for certain.
            self._write({**key, "t": time.monotonic(), "r": "fail", "e": repr(exc)})
            raise _Failed from exc
        except Exception as exc:  # may or may not have happened
            self._write({**key, "t": time.monotonic(), "r": "info", "e": repr(exc)})
            raise _Failed from exc
        if value is _NOT_DONE:
            self._write({**key, "t": time.monotonic(), "r": "fail"})
            raise _Failed
        self._write({**key, "t": time.monotonic(), "r": "ok", "v": value})
        return value


_NOT_DONE = object()


def role_client(client: int, addresses: str, until: float, out: Path, seed: int) -> None:
    """Operations until ``until``; every few seconds a new session, the gateways in a
    random order (so that each gateway has clients when the nemesis hits it)."""
    from managerd_client import ManagerdError, connect

    rng = random.Random(seed)
    rec = Recorder(out, client)
    gateways = addresses.split(",")
    n_items = 0
    while time.monotonic() < until:
        rng.shuffle(gateways)
        try:
            m = connect(",".join(gateways), connect_timeout_s=5)
        except ManagerdError:
            time.sleep(0.2)
            continue
        rec.where = functools.partial(_where, m)
        session_end = time.monotonic() + rng.uniform(3.0, 10.0)
        try:
            lock, counter = m.Lock(LOCK), m.Value(COUNTER, "q", 0)
            q = m.Queue(QUEUE, visibility_timeout_s=VISIBILITY_S)
            while time.monotonic() < min(until, session_end):
                roll = rng.random()
                try:
                    if roll < 0.4:
                        _read_modify_write(rec, lock, counter, rng)
                    elif roll < 0.7:
                        n_items += 1
                        item = f"{client}-{n_items}"
                        rec.op("put", functools.partial(q.put, item), item=item)
                    elif roll < 0.9:
                        msg = rec.op("reserve", functools.partial(_reserved, q))
                        rec.op("ack", functools.partial(_acked, msg), item=msg[0], delivery=msg[1])
                    else:
                        rec.op("get", functools.partial(q.get, timeout=1))
                except _Failed as failed:
                    if failed.__cause__ is not None and not isinstance(
                        failed.__cause__, queue.Empty
                    ):
                        # As a client would: not at once again (a session the gateway
                        # lost fails every call until the gateway closes it).
                        time.sleep(0.05)
        except ManagerdError:
            time.sleep(0.2)  # making the proxies failed
        finally:
            with contextlib.suppress(ManagerdError):
                m.close()


_messages: dict[int, Any] = {}


def _where(m: Any) -> str:
    host, port = m.address
    return f"{host}:{port}"


def _reserved(q: Any) -> tuple[str, int]:
    msg = q.reserve(timeout=1)
    _messages[msg.delivery_id] = msg
    return msg.value, msg.delivery_id


def _acked(reserved: tuple[str, int]) -> None:
    _messages.pop(reserved[1]).ack()


def _read_modify_write(rec: Recorder, lock: Any, counter: Any, rng: random.Random) -> None:
    token = rec.op("acquire", lambda: lock.fencing_token if lock.acquire(timeout=2) else _NOT_DONE)
    try:
        value = rec.op("read", counter.get, token=token)
        count, writer = value >> TOKEN_BITS, value & TOKEN_MASK
        if writer > token:
            rec.op("fenced", lambda: writer, token=token)
        else:
            time.sleep(rng.uniform(0, 0.01))
            new = ((count + 1) << TOKEN_BITS) | token
            rec.op("write", lambda: counter.set(new), token=token, read=count)
    finally:
        with contextlib.suppress(_Failed):
            rec.op("release", lock.release, token=token)


def role_drain(address: str) -> None:
    """Take every item left (waiting out the reservations of dead sessions); read the counter."""
    from managerd_client import connect

    with connect(address, connect_timeout_s=30) as m:
        q = m.Queue(QUEUE, visibility_timeout_s=VISIBILITY_S)
        left: list[str] = []
        for wait_s in (2.0, VISIBILITY_S + SESSION_TTL_S + 4):
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    left.append(q.get(timeout=0.5))
                    deadline = time.monotonic() + wait_s
                except queue.Empty:
                    pass
        counter = m.Value(COUNTER, "q", 0).get()
        print(json.dumps({"leftover": left, "counter": counter}))


# -- the orchestrator and the nemesis ----------------------------------------------------


@dataclass
class Faults:
    etcd_kills: int = 0
    leader_kills: int = 0
    gateway_kills: int = 0
    partitions: int = 0
    #: (time.monotonic(), what) of each fault and heal
    log: list[tuple[float, str]] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.log.append((time.monotonic(), what))

    @property
    def total(self) -> int:
        return self.etcd_kills + self.gateway_kills + self.partitions


def orchestrate(seconds: float, n_clients: int, seed: int, keep: Path | None) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import Daemon
    from etcd_support import gateway_host, running_cluster

    rng = random.Random(seed)
    with (
        tempfile.TemporaryDirectory(prefix="etcd-history-") as tmp_dir,
        gateway_host() as host,
        running_cluster(Path(tmp_dir), extra_host=host.root_addr) as cluster,
    ):
        tmp = Path(tmp_dir)
        prefix = "/h" + secrets.token_hex(4) + "/"
        env = {"MANAGERD_SESSION_TTL_S": str(SESSION_TTL_S)}

        def gateway(name: str, endpoints: list[str], host_addr: str) -> Daemon:
            args = ["--store", "etcd://" + ",".join(endpoints), "--store-prefix", prefix]
            d = Daemon(tmp / name, env=env, args=args)
            d.host = host_addr
            return d

        g1 = gateway("g1", cluster.endpoints, "127.0.0.1")
        g2 = gateway("g2", cluster.endpoints_on(host.root_addr), host.addr)
        g2.authkey = g1.authkey
        g1.start()
        g2.start(prefix=host.prefix)
        starts = {
            "g1": lambda: g1.start(port=g1.port),
            "g2": lambda: g2.start(port=g2.port, prefix=host.prefix),
        }
        gateways = {"g1": g1, "g2": g2}
        clients: list[subprocess.Popen[bytes]] = []
        faults = Faults()
        try:
            until = time.monotonic() + seconds
            addresses = f"{g1.address},{g2.address}"
            for c in range(n_clients):
                cmd = [
                    sys.executable, __file__, "--role", "client", "--client", str(c),
                    "--addresses", addresses, "--until", repr(until),
                    "--out", str(tmp / f"client{c}.jsonl"), "--seed", str(seed * 1000 + c),
                ]  # fmt: skip
                clients.append(
                    subprocess.Popen(
                        cmd,
                        env={**os.environ, "MANAGERD_AUTHKEY": g1.authkey.decode()},
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                    )
                )
            _nemesis(rng, until, cluster, gateways, starts, host, faults)
            for proc in clients:
                try:
                    proc.wait(max(1.0, until + CLIENT_GRACE_S - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            host.heal()
            drain = subprocess.run(
                [sys.executable, __file__, "--role", "drain", "--addresses", g1.address],
                env={**os.environ, "MANAGERD_AUTHKEY": g1.authkey.decode()},
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if drain.returncode != 0:
                raise RuntimeError(f"the drain failed:\n{drain.stderr}")
            final = json.loads(drain.stdout)
        finally:
            for proc in clients:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for d in (g1, g2):
                d.stop()
        (tmp / "final.json").write_text(json.dumps(final))
        (tmp / "faults.json").write_text(json.dumps(faults.log))
        (tmp / "gateways.log").write_text(f"--- g1\n{g1.log}\n--- g2\n{g2.log}\n")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for path in [*tmp.glob("client*.jsonl"), *tmp.glob("*.json"), tmp / "gateways.log"]:
                shutil.copy(path, keep / path.name)
        return recheck(tmp, faults, seconds, n_clients)


def recheck(
    directory: Path, faults: Faults | None = None, seconds: float = 0, n_clients: int = 0
) -> dict[str, Any]:
    """Check the histories and final state kept in ``directory``."""
    ops: list[Op] = []
    for path in sorted(directory.glob("client*.jsonl")):
        with path.open() as f:
            ops += read_history(f)
    final = json.loads((directory / "final.json").read_text())
    violations = check(ops, final["leftover"], final["counter"])
    return _summary(ops, faults or Faults(), final, violations, seconds, n_clients)


def _nemesis(
    rng: random.Random,
    until: float,
    cluster: Any,
    gateways: dict[str, Any],
    starts: dict[str, Callable[[], Any]],
    host: Any,
    faults: Faults,
) -> None:
    """Faults in turn (each kind once per round, in a random order) until ``until``."""
    ports = [m.client_port for m in cluster.members]
    while True:
        kinds = ["etcd", "gateway", "partition"]
        rng.shuffle(kinds)
        for kind in kinds:
            if time.monotonic() + 2 > until:
                return
            time.sleep(rng.uniform(0.5, 2.0))
            if kind == "etcd":
                leader = rng.random() < 0.5
                victim = cluster.leader() if leader else rng.randrange(len(cluster.members))
                cluster.kill(victim)
                faults.note(f"killed etcd n{victim}{' (leader)' if leader else ''}")
                faults.etcd_kills += 1
                faults.leader_kills += leader
                time.sleep(rng.uniform(1.0, 4.0))
                cluster.restart(victim)
                faults.note(f"restarted etcd n{victim}")
            elif kind == "gateway":
                name = rng.choice(sorted(gateways))
                gateways[name].kill()
                faults.note(f"killed {name}")
                faults.gateway_kills += 1
                time.sleep(rng.uniform(0.2, 2.0))
                starts[name]()
                faults.note(f"restarted {name}")
            else:
                host.cut(ports)
                faults.note("cut g2 from etcd")
                faults.partitions += 1
                time.sleep(rng.uniform(SESSION_TTL_S + 1, SESSION_TTL_S + 4))
                host.heal()
                faults.note("healed g2")


def _summary(
    ops: list[Op],
    faults: Faults,
    final: dict[str, Any],
    violations: list[Violation],
    seconds: float,
    n_clients: int,
) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: {"ok": 0, "fail": 0, "info": 0})
    for op in ops:
        by_kind[op.kind][op.result] += 1
    return {
        "seconds": seconds,
        "clients": n_clients,
        "operations": len(ops),
        "ok": sum(1 for op in ops if op.result == "ok"),
        "fail": sum(1 for op in ops if op.result == "fail"),
        "info": sum(1 for op in ops if op.result == "info"),
        "by_kind": dict(by_kind),
        "holdings_checked": len(holdings(ops)),
        "faults": {
            "total": faults.total,
            "etcd_kills": faults.etcd_kills,
            "leader_kills": faults.leader_kills,
            "gateway_kills": faults.gateway_kills,
            "partitions": faults.partitions,
        },
        "final_count": final["counter"] >> TOKEN_BITS,
        "leftover": len(final["leftover"]),
        "violations": [f"{v.kind}: {v.detail}" for v in violations],
    }


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "etcd", "etcdctl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="copy the histories to this directory")
    parser.add_argument("--recheck", type=Path, help="only check the histories kept there")
    parser.add_argument("--role", choices=["client", "drain"])
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--addresses")
    parser.add_argument("--until", type=float)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.role == "client":
        role_client(args.client, args.addresses, args.until, args.out, args.seed)
        return
    if args.role == "drain":
        role_drain(args.addresses)
        return
    if args.recheck is not None:
        summary = recheck(args.recheck)
    else:
        reason = unavailable_reason()
        if reason:
            sys.exit(f"etcd_history: {reason}")
        summary = orchestrate(args.seconds, args.clients, args.seed, args.keep)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key != "violations":
                print(f"{key:<17} {value}")
        print(f"{'violations':<17} {len(summary['violations'])}")
        for v in summary["violations"][:20]:
            print("  " + v)
    sys.exit(1 if summary["violations"] else 0)


if __name__ == "__main__":
    main()
