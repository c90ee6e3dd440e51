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

With no role, like the other examples, it runs once and checks itself: a
producer and two consumers as local processes share 12 jobs on objects
whose names are unique to the run, then it deletes them and prints ``OK``:

    python compose_worker.py --address 127.0.0.1:50000
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
import uuid
from multiprocessing import Process
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


DEMO_JOBS = 12
DEMO_CONSUMERS = 2
DEMO_TIMEOUT_S = 30.0


def _run(role: str, args: argparse.Namespace) -> None:
    """A worker process of the demo; its exit code is the role's."""
    sys.exit((producer if role == "producer" else consumer)(args, threading.Event()))


def demo(args: argparse.Namespace) -> int:
    run = uuid.uuid4().hex[:8]  # names unique to this run
    names = {"queue": f"example-compose-jobs-{run}", "done": f"example-compose-done-{run}"}
    jobs_each = DEMO_JOBS // DEMO_CONSUMERS
    workers = [
        Process(
            target=_run,
            args=("producer", argparse.Namespace(**{**vars(args), **names, "jobs": DEMO_JOBS})),
        )
    ]
    workers += [
        Process(
            target=_run,
            args=("consumer", argparse.Namespace(**{**vars(args), **names, "jobs": jobs_each})),
        )
        for _ in range(DEMO_CONSUMERS)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(DEMO_TIMEOUT_S)
    with connect(args.address) as m:
        done = dict(m.dict(names["done"]))
        left = m.Queue(names["queue"]).qsize()
        for name in (names["queue"], names["done"], f"{names['done']}-lock"):
            m.delete(name)  # named objects live until deleted
    per_consumer = sorted(v for k, v in done.items() if "/" in k)
    print(f"{len(per_consumer)} consumers did {per_consumer} jobs; {left} left on the queue")
    if any(w.exitcode != 0 for w in workers):
        print(f"FAILED: worker exit codes {[w.exitcode for w in workers]}")
        return 1
    if done.get("total") != DEMO_JOBS or sum(per_consumer) != DEMO_JOBS or left:
        print("FAILED: a job was lost or done twice")
        return 1
    print(f"OK: {DEMO_JOBS} jobs produced, reserved, done and acked")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "role",
        nargs="?",
        choices=["producer", "consumer"],
        help="run as a long-lived worker; without it, a self-checking demo",
    )
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
    if args.role is None:
        args.interval_s = args.work_s = 0.0
        return demo(args)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return producer(args, stop) if args.role == "producer" else consumer(args, stop)


if __name__ == "__main__":
    sys.exit(main())  # an exception (no daemon, wrong authkey) exits 1 with its traceback
