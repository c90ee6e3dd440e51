"""Workers appending to a named list and filling a named dict.

Four worker processes share the numbers 0..N-1 between them: for each number
a worker stores its square in a shared dict and appends ``(worker, number)``
to a shared list. The main process then checks that the dict has every
square and that the list has every number exactly once.

Each ``append`` or ``d[key] = value`` is one atomic operation on the daemon,
so no lock is needed for them (a read-modify-write would need one: see
value_array_counter.py).

    export MANAGERD_AUTHKEY=...        # or MANAGERD_AUTHKEY_FILE=path
    python list_dict_workers.py --address 127.0.0.1:50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import uuid

from managerd_client import connect

N_NUMBERS = 40
N_WORKERS = 4
TIMEOUT_S = 30.0


def worker(address: str, list_name: str, dict_name: str, worker_id: int) -> None:
    with connect(address) as m:  # the authkey comes from MANAGERD_AUTHKEY
        squares = m.dict(dict_name)  # the same dict and list in every process
        seen = m.list(list_name)
        for n in range(worker_id, N_NUMBERS, N_WORKERS):  # this worker's share
            squares[n] = n * n
            seen.append((worker_id, n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50000", help="HOST:PORT of managerd")
    address = parser.parse_args().address
    run = uuid.uuid4().hex[:8]  # names unique to this run
    list_name, dict_name = f"example-seen-{run}", f"example-squares-{run}"

    with connect(address) as m:
        workers = [
            multiprocessing.Process(target=worker, args=(address, list_name, dict_name, i))
            for i in range(N_WORKERS)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT_S)
        squares = m.dict(dict_name).copy()  # one round trip for the whole dict
        seen = m.list(list_name).copy()
        m.delete(list_name)  # named objects live until deleted
        m.delete(dict_name)

    print(f"dict has {len(squares)} squares, e.g. 7 -> {squares.get(7)}")
    print(f"list has {len(seen)} entries, first {seen[:3]}")
    if any(w.exitcode != 0 for w in workers):
        print(f"FAILED: worker exit codes {[w.exitcode for w in workers]}")
        return 1
    if squares != {n: n * n for n in range(N_NUMBERS)}:
        print("FAILED: the dict is missing squares")
        return 1
    if sorted(n for _, n in seen) != list(range(N_NUMBERS)):
        print("FAILED: the list is missing numbers or has some twice")
        return 1
    print(f"OK: {N_WORKERS} workers filled the dict and the list with {N_NUMBERS} numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey, a timeout) exits 1 too
