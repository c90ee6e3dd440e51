"""A chaos run users can repeat: kill -9 clients and flap the link, then count.

Two namespace hosts (needs root, ``ip`` and ``nft``); the daemon on host 1.
Producers, reserve/ack consumers and lock users run on both hosts while
random clients are killed with SIGKILL and host 2's link goes down and up.
Afterwards the queue is drained and the run prints:

- produced: puts the daemon acknowledged;
- acked: messages whose ack returned;
- lost: produced, never acked nor seen by a consumer, not left in the queue
  (must be 0);
- duplicates after ack: a message acked twice (must be 0);
- lock overlap violations: two holdings whose release succeeded (so neither
  was fenced) overlapping in time, or tokens not increasing (must be 0);
- stuck waiters: waiters left on the daemon once every client is gone
  (must be 0).

Usage: ``sudo uv run python scripts/chaos.py --duration-s 300``. Exit code 0
when every must-be-0 figure is 0. Bounded: every loop ends by itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd_client import ManagerdError, connect  # noqa: E402

import netns  # noqa: E402

TTL_S = 2.0
QUEUE = "chaos.jobs"
LOCK = "chaos.lock"
STOP = "chaos.stop"


# -- roles (run on the hosts as: python chaos.py --role ROLE --address A) -------------


def _say(*words: object) -> None:
    print(*words, flush=True)


def role_produce(address: str, tag: str) -> None:
    i = 0
    while True:
        try:
            with connect(address, connect_timeout_s=5) as m:
                q, stop = m.Queue(QUEUE), m.Event(STOP)
                while not stop.is_set():
                    item = f"{tag}-{i}"
                    q.put(item)
                    _say("put", item)  # only once the daemon acknowledged it
                    i += 1
                return
        except ManagerdError:
            i += 1  # that put's fate is unknown: never reuse its id
            time.sleep(0.1)


def role_consume(address: str) -> None:
    while True:
        try:
            with connect(address, connect_timeout_s=5) as m:
                q, stop = m.Queue(QUEUE, visibility_timeout_s=5.0), m.Event(STOP)
                while True:
                    try:
                        msg = q.reserve(timeout=0.5)
                    except queue.Empty:
                        if stop.is_set():
                            return
                        continue
                    _say("ack?", msg.value)
                    msg.ack()
                    _say("acked", msg.value)
        except (ManagerdError, ValueError):
            time.sleep(0.1)


def role_lock(address: str) -> None:
    while True:
        try:
            with connect(address, connect_timeout_s=5) as m:
                lock, stop = m.Lock(LOCK), m.Event(STOP)
                while not stop.is_set():
                    if not lock.acquire(timeout=1):
                        continue
                    token = lock.fencing_token
                    start = time.monotonic()
                    time.sleep(random.uniform(0.001, 0.02))
                    end = time.monotonic()
                    lock.release()
                    _say("held", token, start, end)
                return
        except ManagerdError:
            time.sleep(0.1)


# -- the orchestrator --------------------------------------------------------------------


@dataclass
class Client:
    role: str
    host: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)


class Run:
    def __init__(self, hosts: netns.TwoHosts, address: str, env: dict[str, str]) -> None:
        self.hosts = hosts
        self.address = address
        self.env = env
        self.clients: list[Client] = []
        self.finished: list[Client] = []
        self.kills = 0
        self.flaps = 0

    def start(self, role: str, host: int) -> None:
        cmd = [sys.executable, __file__, "--role", role, "--address", self.address]
        if role == "produce":
            cmd += ["--tag", secrets.token_hex(4)]
        proc = self.hosts.popen(
            host, cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        client = Client(role, host, proc)
        threading.Thread(target=_pump, args=(client,), daemon=True).start()
        self.clients.append(client)

    def kill_one(self) -> None:
        victim = random.choice(self.clients)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(30)
        self.clients.remove(victim)
        self.finished.append(victim)
        self.kills += 1
        self.start(victim.role, victim.host)

    def stop_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for c in self.clients:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(10)
        self.finished.extend(self.clients)
        self.clients = []


def _pump(client: Client) -> None:
    assert client.proc.stdout is not None
    for line in client.proc.stdout:
        client.lines.append(line.rstrip("\n"))


def _count(run: Run, leftover: list[Any], waiters: int) -> dict[str, Any]:
    produced: set[str] = set()
    seen: set[str] = set()
    acked: list[str] = []
    holdings: list[tuple[int, float, float]] = []
    for c in run.finished:
        for line in list(c.lines):
            word, *rest = line.split() or [""]
            if len(rest) != {"put": 1, "ack?": 1, "acked": 1, "held": 3}.get(word, -1):
                continue  # a line cut short by SIGKILL
            if word == "put":
                produced.add(rest[0])
            elif word == "ack?":
                seen.add(rest[0])
            elif word == "acked":
                acked.append(rest[0])
            elif word == "held":
                holdings.append((int(rest[0]), float(rest[1]), float(rest[2])))
    holdings.sort(key=lambda h: h[1])
    violations = 0
    for (tok_a, _, end_a), (tok_b, start_b, _) in itertools.pairwise(holdings):
        if start_b < end_a or tok_b <= tok_a:
            violations += 1
    return {
        "kills": run.kills,
        "link_flaps": run.flaps,
        "produced": len(produced),
        "acked": len(acked),
        "lost": len(produced - seen - set(leftover)),
        "duplicates_after_ack": len(acked) - len(set(acked)),
        "lock_holdings": len(holdings),
        "lock_overlap_violations": violations,
        "stuck_waiters": waiters,
    }


def orchestrate(duration_s: float, seed: int) -> dict[str, Any]:
    random.seed(seed)
    authkey = secrets.token_hex(16)
    with netns.two_hosts() as hosts:
        address = f"{hosts.addr1}:50000"
        env = dict(os.environ, MANAGERD_AUTHKEY=authkey, MANAGERD_SESSION_TTL_S=str(TTL_S))
        daemon = hosts.popen(
            1,
            [sys.executable, "-m", "managerd", "serve", "--host", hosts.addr1, "--port", "50000"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert daemon.stderr is not None
            for line in daemon.stderr:
                if "managerd serving on" in line:
                    break
            threading.Thread(target=daemon.stderr.read, daemon=True).start()
            run = Run(hosts, address, env)
            for host in (1, 2):
                for role in ("produce", "consume", "consume", "lock", "lock"):
                    run.start(role, host)
            end = time.monotonic() + duration_s
            next_flap = time.monotonic() + random.uniform(2, 5)
            while time.monotonic() < end:
                time.sleep(random.uniform(0.2, 1.0))
                run.kill_one()
                if time.monotonic() >= next_flap:
                    hosts.link_down(2)
                    time.sleep(random.uniform(TTL_S + 1, TTL_S + 3))  # long enough to expire
                    hosts.link_up(2)
                    run.flaps += 1
                    next_flap = time.monotonic() + random.uniform(3, 8)
            return _finish(run, hosts, address, authkey)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _finish(run: Run, hosts: netns.TwoHosts, address: str, authkey: str) -> dict[str, Any]:
    """Stop producing, let consumers drain, then read what is left on host 1."""
    check = [
        sys.executable,
        __file__,
        "--role",
        "finish",
        "--address",
        address,
    ]
    env = dict(os.environ, MANAGERD_AUTHKEY=authkey)
    out = hosts.run(1, [*check, "--phase", "stop"], env=env, timeout_s=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    run.stop_all(timeout_s=TTL_S * 10 + 30)
    out = hosts.run(1, [*check, "--phase", "drain"], env=env, timeout_s=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    result = json.loads(out.stdout)
    return _count(run, result["leftover"], result["waiters"])


def role_finish(address: str, phase: str) -> None:
    with connect(address, connect_timeout_s=10) as m:
        if phase == "stop":
            m.Event(STOP).set()
            return
        q = m.Queue(QUEUE)
        deadline = time.monotonic() + 60
        # Reserved messages of clients partitioned at the end come back
        # after their session's TTL (or the visibility timeout).
        while time.monotonic() < deadline:
            status = m.status()["objects"][QUEUE]
            if status["reserved"] == 0:
                break
            time.sleep(0.2)
        leftover = [q.get() for _ in range(q.qsize())]
        me = m.session_id
        status = m.status()
        waiters = sum(int(o.get("waiters") or 0) for o in status["objects"].values())
        others = [s for s in status["sessions"] if s["id"] != me]
        print(json.dumps({"leftover": leftover, "waiters": waiters, "sessions": len(others)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--role", choices=["produce", "consume", "lock", "finish"])
    parser.add_argument("--address")
    parser.add_argument("--tag", default="p")
    parser.add_argument("--phase", default="drain")
    args = parser.parse_args()
    if args.role == "produce":
        role_produce(args.address, args.tag)
    elif args.role == "consume":
        role_consume(args.address)
    elif args.role == "lock":
        role_lock(args.address)
    elif args.role == "finish":
        role_finish(args.address, args.phase)
    else:
        reason = netns.unavailable_reason()
        if reason:
            sys.exit(f"chaos: {reason}")
        figures = orchestrate(args.duration_s, args.seed)
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
        bad = [
            k
            for k in ("lost", "duplicates_after_ack", "lock_overlap_violations", "stuck_waiters")
            if figures[k]
        ]
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
