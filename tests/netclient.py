"""Client programs for fault tests, run on namespace hosts (``ip netns exec``).

Each subcommand talks to the daemon at ``--address`` with the authkey from
``MANAGERD_AUTHKEY`` and reports on stdout, one line per event, so the test
(which lives in the root namespace and cannot reach the hosts' addresses)
reads what happened from the pipe.

- ``lock``: acquire a lock, print ``acquired <token>``, then obey commands
  read from stdin (``release``, ``acquire``, ``quit``), printing the result or
  the exception's class name.
- ``produce``: put ``--count`` numbered messages (``--start`` offset).
- ``get``: block in ``get()`` with no timeout; print how it ended.
- ``consume``: reserve/ack until ``--count`` messages were acked overall
  (counted on the daemon), printing ``acked <value>`` for each ack.
"""

from __future__ import annotations

import argparse
import queue
import sys

from managerd_client import ManagerdError, connect


def _say(*words: object) -> None:
    print(*words, flush=True)


def lock(args: argparse.Namespace) -> None:
    m = connect(args.address, connect_timeout_s=args.connect_timeout_s)
    lk = m.Lock(args.name)
    lk.acquire()
    _say("acquired", lk.fencing_token)
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "release":
                lk.release()
                _say("released")
            elif command == "acquire":
                got = lk.acquire(timeout=args.timeout_s)
                _say("acquired" if got else "timeout", lk.fencing_token)
            elif command == "quit":
                break
        except (ManagerdError, OSError, RuntimeError) as exc:
            _say("error", type(exc).__name__)
    m.close()


def acquire(args: argparse.Namespace) -> None:
    with connect(args.address, connect_timeout_s=args.connect_timeout_s) as m:
        lk = m.Lock(args.name)
        if lk.acquire(timeout=args.timeout_s):
            _say("acquired", lk.fencing_token)
            lk.release()
        else:
            _say("timeout")


def produce(args: argparse.Namespace) -> None:
    with connect(args.address, connect_timeout_s=args.connect_timeout_s) as m:
        q = m.Queue(args.name)
        for i in range(args.start, args.start + args.count):
            q.put(i)
        _say("produced", args.count)


def consume(args: argparse.Namespace) -> None:
    with connect(args.address, connect_timeout_s=args.connect_timeout_s) as m:
        q = m.Queue(args.name)
        acked = m.Value(args.name + ".acked", "q", 0)
        while acked.value < args.count:
            try:
                msg = q.reserve(timeout=0.5)
            except queue.Empty:
                continue
            msg.ack()
            acked.add(1)
            _say("acked", msg.value)


def get(args: argparse.Namespace) -> None:
    """Block in get() with no timeout; report how it ended and after how long."""
    import time

    m = connect(args.address, connect_timeout_s=args.connect_timeout_s)
    q = m.Queue(args.name)
    _say("waiting")
    started = time.monotonic()
    try:
        _say("got", q.get())
    except ManagerdError as exc:
        _say("error", type(exc).__name__, round(time.monotonic() - started, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["lock", "acquire", "produce", "consume", "get"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--connect-timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    roles = {"lock": lock, "acquire": acquire, "produce": produce, "consume": consume, "get": get}
    roles[args.command](args)


if __name__ == "__main__":
    main()
