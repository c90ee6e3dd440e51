"""A client process for the stateful tests: it takes something, says so, and waits to die.

    python stateful_worker.py ROLE TYPEID NAME [ARG]

with ``MANAGERD_ADDRESS`` and ``MANAGERD_AUTHKEY`` in the environment. It
prints one line — ``HELD <what>`` once it holds something, or ``NOTHING``
when it could not take anything at once — then blocks reading stdin until
the test SIGKILLs it (or closes stdin).
"""

from __future__ import annotations

import os
import queue
import sys

from managerd_client import connect


def main() -> None:
    role, typeid, name, *rest = sys.argv[1:]
    m = connect(os.environ["MANAGERD_ADDRESS"])
    said = "NOTHING"
    if role == "acquire":  # Lock, RLock, Semaphore, BoundedSemaphore
        args = [int(rest[0])] if rest and typeid.endswith("Semaphore") else []
        lock = getattr(m, typeid)(name, *args)
        if lock.acquire(blocking=False):
            said = f"HELD {lock.fencing_token}"
    elif role == "reserve":  # Queue, JoinableQueue
        q = getattr(m, typeid)(name)
        try:
            msg = q.reserve(timeout=0)
        except queue.Empty:
            pass
        else:
            said = f"HELD {msg.delivery_id} {msg.deliveries}"
    elif role == "wait":  # Event.wait / Barrier.wait parked until the kill
        obj = getattr(m, typeid)(name)
        print("HELD waiting", flush=True)
        obj.wait()
        return
    print(said, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
