"""Value and Array increments under ``get_lock()``.

Four worker processes each add 1 to a shared counter (a ``Value``) and to
their own slot of a shared ``Array``, 50 times. ``counter.value += 1`` is a
read then a write, two separate operations: without the lock, two workers
could read the same value and one increment would be lost. Under
``get_lock()`` (the RLock named ``"<value name>.lock"``, shared by every
process) none is, and the final count is exact.

    export MANAGERD_AUTHKEY=...        # or MANAGERD_AUTHKEY_FILE=path
    python value_array_counter.py --address 127.0.0.1:50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import uuid

from managerd_client import connect

N_WORKERS = 4
N_INCREMENTS = 50
TIMEOUT_S = 60.0


def worker(address: str, value_name: str, array_name: str, worker_id: int) -> None:
    with connect(address) as m:  # the authkey comes from MANAGERD_AUTHKEY
        counter = m.Value(value_name, "i")  # attach: created by main() with 0
        per_worker = m.Array(array_name, "i", N_WORKERS)
        for _ in range(N_INCREMENTS):
            with counter.get_lock():  # read-modify-write: hold the lock
                counter.value += 1
            with per_worker.get_lock():
                per_worker[worker_id] += 1
        # (counter.add(1) would do the same in one atomic step on the daemon.)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50000", help="HOST:PORT of managerd")
    address = parser.parse_args().address
    run = uuid.uuid4().hex[:8]  # names unique to this run
    value_name, array_name = f"example-counter-{run}", f"example-slots-{run}"

    with connect(address) as m:
        counter = m.Value(value_name, "i", 0)  # typecode "i" and initial value, as in stdlib
        per_worker = m.Array(array_name, "i", [0] * N_WORKERS)
        workers = [
            multiprocessing.Process(target=worker, args=(address, value_name, array_name, i))
            for i in range(N_WORKERS)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT_S)
        final, slots = counter.value, per_worker.tolist()
        for name in (value_name, array_name, value_name + ".lock", array_name + ".lock"):
            m.delete(name)  # named objects (locks too) live until deleted

    expected = N_WORKERS * N_INCREMENTS
    print(f"counter = {final} (expected {expected}), per worker {slots}")
    if any(w.exitcode != 0 for w in workers):
        print(f"FAILED: worker exit codes {[w.exitcode for w in workers]}")
        return 1
    if final != expected or slots != [N_INCREMENTS] * N_WORKERS:
        print("FAILED: increments were lost")
        return 1
    print(f"OK: {expected} increments, none lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey, a timeout) exits 1 too
