"""Long-running producer and consumer workers, as docker-compose.yml runs them.

One ``producer`` and any number of ``consumer`` processes (``docker compose
up --scale consumer=4``) share work through named objects, so that the
Grafana dashboard has something to show:

- the producer puts a job on the queue ``compose-jobs`` every
  ``--interval-s`` seconds (blocking while the queue is full);
- each consumer *reserves* a job (acknowledged delivery: a consumer killed
  mid-job gives it back to the queue), works on it for ``--work-s`` seconds,
  counts it in the dict ``compose-done`` under the lock ``compose-done-lock``
  (contended once there are several consumers), and acks it.

    export MANAGERD_AUTHKEY_FILE=~/.config/managerd/authkey   # or MANAGERD_AUTHKEY=...
    python compose_worker.py producer --address 127.0.0.1:50000
    python compose_worker.py consumer --address 127.0.0.1:50000

Both run until SIGTERM or Ctrl-C (exit 0), or until ``--jobs N`` jobs are
done. If the daemon stays away longer than the client reconnects for, the
worker exits 1 with the error, and a container's restart policy starts it
again.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any

from managerd_client import connect

MAXSIZE = 10_000  # a producer with no consumers stops here instead of filling memory
POLL_S = 1.0  # longest a blocking call waits before the stop flag is looked at again


def producer(args: argparse.Namespace, stop: threading.Event) -> int:
    with connect(args.address) as m:  # the authkey comes from the environment
        jobs = m.Queue(args.queue, maxsize=MAXSIZE)
        print(f"producer: a job on {args.queue!r} every {args.interval_s} s", flush=True)
        n = 0
        while not stop.is_set() and (args.jobs is None or n < args.jobs):
            try:
                jobs.put({"id": n, "x": n, "at": time.time()}, timeout=POLL_S)
            except queue.Full:
                continue
            n += 1
            stop.wait(args.interval_s)  # pacing, not synchronisation
    print(f"producer: put {n} jobs", flush=True)
    return 0


def consumer(args: argparse.Namespace, stop: threading.Event) -> int:
    me = f"{socket.gethostname()}/{os.getpid()}"
    with connect(args.address) as m:
        jobs = m.Queue(args.queue, maxsize=MAXSIZE)
        done, done_lock = m.dict(args.done), m.Lock(f"{args.done}-lock")
        print(f"consumer {me}: taking jobs from {args.queue!r}", flush=True)
        n = 0
        while not stop.is_set() and (args.jobs is None or n < args.jobs):
            try:
                message = jobs.reserve(timeout=POLL_S)
            except queue.Empty:
                continue
            with message:  # acked on success, given back on an exception
                job: dict[str, Any] = message.value
                stop.wait(args.work_s)  # the "work"
                with done_lock:
                    done[me] = done.get(me, 0) + 1
                    done["total"] = done.get("total", 0) + 1
                    done["last_square"] = job["x"] ** 2
            n += 1
    print(f"consumer {me}: did {n} jobs", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["producer", "consumer"])
    parser.add_argument(
        "--address",
        default=os.environ.get("MANAGERD_ADDRESS", "127.0.0.1:50000"),
        help="HOST:PORT of managerd [$MANAGERD_ADDRESS, else 127.0.0.1:50000]",
    )
    parser.add_argument("--queue", default="compose-jobs", help="queue name [compose-jobs]")
    parser.add_argument(
        "--done",
        default="compose-done",
        help="dict counting done jobs (and NAME-lock) [compose-done]",
    )
    parser.add_argument("--interval-s", type=float, default=0.5, help="producer: between puts")
    parser.add_argument("--work-s", type=float, default=1.0, help="consumer: time per job")
    parser.add_argument("--jobs", type=int, default=None, help="stop after this many jobs")
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return producer(args, stop) if args.role == "producer" else consumer(args, stop)


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey) exits 1 with its traceback
