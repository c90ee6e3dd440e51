"""Lock, Semaphore, Event and Condition coordinating worker processes.

- An **Event** is the starting gun: every worker waits on it, and the main
  process sets it once it has started all of them.
- A **Semaphore** of 2 lets at most two workers into a section at once.
- A **Lock** protects the read-modify-write of the shared counters that
  record how many workers are inside that section.
- A **Condition** tells the main process when a worker finishes; it waits
  for all of them with ``wait_for``.

A lock or permit held by a worker that dies is released by the daemon.

    export MANAGERD_AUTHKEY=...        # or MANAGERD_AUTHKEY_FILE=path
    python sync_primitives.py --address 127.0.0.1:50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import uuid

from managerd_client import connect

N_WORKERS = 4
SLOTS = 2
TIMEOUT_S = 30.0


def worker(address: str, run: str) -> None:
    with connect(address) as m:  # the authkey comes from MANAGERD_AUTHKEY
        start = m.Event(f"example-start-{run}")
        slots = m.Semaphore(f"example-slots-{run}", SLOTS)
        lock = m.Lock(f"example-lock-{run}")
        finished = m.Condition(f"example-finished-{run}")
        state = m.Namespace(f"example-state-{run}")

        if not start.wait(timeout=TIMEOUT_S):
            sys.exit("never started")
        with slots:  # at most SLOTS workers in here at once
            with lock:
                state.inside += 1
                state.most_inside = max(state.most_inside, state.inside)
            time.sleep(0.05)  # use the limited resource for a while
            with lock:
                state.inside -= 1
        with finished:  # state.done is only changed with the condition's lock held
            state.done += 1
            finished.notify()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50000", help="HOST:PORT of managerd")
    address = parser.parse_args().address
    run = uuid.uuid4().hex[:8]  # names unique to this run

    with connect(address) as m:
        start = m.Event(f"example-start-{run}")
        finished = m.Condition(f"example-finished-{run}")
        state = m.Namespace(f"example-state-{run}")
        state.inside, state.most_inside, state.done = 0, 0, 0

        workers = [
            multiprocessing.Process(target=worker, args=(address, run)) for _ in range(N_WORKERS)
        ]
        for w in workers:
            w.start()
        print(f"{N_WORKERS} workers started; setting the start event")
        start.set()
        with finished:
            all_done = finished.wait_for(lambda: state.done == N_WORKERS, timeout=TIMEOUT_S)
        for w in workers:
            w.join(TIMEOUT_S)
        most_inside = state.most_inside
        for name, _ in m.objects():
            if name.startswith("example-") and run in name:
                m.delete(name)  # named objects live until deleted

    print(f"at most {most_inside} workers were inside the section at once (limit {SLOTS})")
    if any(w.exitcode != 0 for w in workers):
        print(f"FAILED: worker exit codes {[w.exitcode for w in workers]}")
        return 1
    if not all_done or not 1 <= most_inside <= SLOTS:
        print("FAILED: the workers did not all finish, or the semaphore let too many in")
        return 1
    print(f"OK: {N_WORKERS} workers started together, shared {SLOTS} slots and reported back")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey, a timeout) exits 1 too
