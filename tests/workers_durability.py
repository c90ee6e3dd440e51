"""Client programs for the crash tests, run as subprocesses while the daemon is killed.

Each writes one line per acknowledged operation to its output file (flushed
at once), so the test knows exactly what the daemon acknowledged before it
died. They stop at the first connection error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from managerd_client import ManagerdError, connect


def produce(address: str, queue: str, tag: str, out: Path) -> None:
    with out.open("a", buffering=1) as log:
        try:
            m = connect(address, connect_timeout_s=0.2)
            q = m.Queue(queue)
            i = 0
            while True:
                item = f"{tag}:{i:06d}"
                q.put(item)
                log.write(f"put {item}\n")
                i += 1
        except (ManagerdError, OSError):
            return


def consume(address: str, queue: str, out: Path) -> None:
    """reserve/ack; log what was seen, then what was acknowledged as taken.

    A plain get() whose answer is lost in a crash is gone (at most once, as
    with any queue without acknowledgements): reserve() is the way not to
    lose it, so that is what this consumer uses.
    """
    with out.open("a", buffering=1) as log:
        try:
            m = connect(address, connect_timeout_s=0.2)
            q = m.Queue(queue)
            while True:
                msg = q.reserve(timeout=5)
                log.write(f"seen {msg.value}\n")
                msg.ack()
                log.write(f"took {msg.value}\n")
        except (ManagerdError, OSError):
            return


def mutate(address: str, out: Path, start: int) -> None:
    """Update a dict, list, Namespace, Value and Array; log each acknowledged step."""
    with out.open("a", buffering=1) as log:
        try:
            m = connect(address, connect_timeout_s=0.2)
            d, lst, ns = m.dict("d"), m.list("l"), m.Namespace("ns")
            v, a = m.Value("v", "q", 0), m.Array("a", "q", 4)
            for i in range(start, start + 10**6):
                d[f"k{i}"] = i
                log.write(f"dict {i}\n")
                lst.append(i)
                log.write(f"list {i}\n")
                ns.last = i
                log.write(f"ns {i}\n")
                log.write(f"value {v.add(1)}\n")
                a[i % 4] = i
                log.write(f"array {i % 4} {i}\n")
        except (ManagerdError, OSError):
            return


if __name__ == "__main__":
    role, address, *rest = sys.argv[1:]
    if role == "produce":
        produce(address, rest[0], rest[1], Path(rest[2]))
    elif role == "consume":
        consume(address, rest[0], Path(rest[1]))
    elif role == "mutate":
        mutate(address, Path(rest[0]), int(rest[1]))
