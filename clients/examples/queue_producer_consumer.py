"""Producer/consumer over a named Queue.

One producer process puts jobs on a queue, two consumer processes take them
and put their results on a second queue, and the main process collects the
results and checks that every job was done exactly once.

Every process connects on its own and finds the queues by *name*, so the
worker functions below run unchanged on other hosts.

    export MANAGERD_AUTHKEY=...        # or MANAGERD_AUTHKEY_FILE=path
    python queue_producer_consumer.py --address 127.0.0.1:50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import uuid

from managerd_client import connect

N_JOBS = 20
N_CONSUMERS = 2
STOP = None  # one per consumer: "no more jobs"
TIMEOUT_S = 30.0  # never wait forever on a queue: a dead producer would hang us


def producer(address: str, jobs_name: str) -> None:
    with connect(address) as m:  # the authkey comes from MANAGERD_AUTHKEY
        jobs = m.Queue(jobs_name)  # get-or-create: the same queue in every process
        for i in range(N_JOBS):
            jobs.put({"id": i, "x": i})
        for _ in range(N_CONSUMERS):
            jobs.put(STOP)


def consumer(address: str, jobs_name: str, results_name: str) -> None:
    with connect(address) as m:
        jobs, results = m.Queue(jobs_name), m.Queue(results_name)
        while (job := jobs.get(timeout=TIMEOUT_S)) is not STOP:  # queue.Empty on timeout
            results.put({"id": job["id"], "square": job["x"] ** 2, "by": os.getpid()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50000", help="HOST:PORT of managerd")
    address = parser.parse_args().address

    # Names unique to this run, so that two runs never share a queue.
    run = uuid.uuid4().hex[:8]
    jobs_name, results_name = f"example-jobs-{run}", f"example-results-{run}"

    with connect(address) as m:
        results = m.Queue(results_name)
        workers = [multiprocessing.Process(target=producer, args=(address, jobs_name))]
        workers += [
            multiprocessing.Process(target=consumer, args=(address, jobs_name, results_name))
            for _ in range(N_CONSUMERS)
        ]
        for w in workers:
            w.start()
        try:
            done = [results.get(timeout=TIMEOUT_S) for _ in range(N_JOBS)]
        finally:
            for w in workers:
                w.join(TIMEOUT_S)
            m.delete(jobs_name)  # named objects live until deleted
            m.delete(results_name)

    by_consumer: dict[int, int] = {}
    for result in done:
        by_consumer[result["by"]] = by_consumer.get(result["by"], 0) + 1
    print(f"{len(by_consumer)} consumers handled {sorted(by_consumer.values())} jobs each")
    if sorted(r["id"] for r in done) != list(range(N_JOBS)):
        print("FAILED: some job was lost or done twice")
        return 1
    if any(r["square"] != r["id"] ** 2 for r in done):
        print("FAILED: a wrong result")
        return 1
    if any(w.exitcode != 0 for w in workers):
        print(f"FAILED: worker exit codes {[w.exitcode for w in workers]}")
        return 1
    print(f"OK: {N_JOBS} jobs produced, consumed and checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey, a timeout) exits 1 too
