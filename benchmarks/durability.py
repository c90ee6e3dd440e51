"""Durability figures: put throughput per fsync mode, and restart time for 1,000,000 items.

Runs, in one invocation and on the same machine:

- 100-byte puts for ``--seconds`` from 1 and from 8 producer processes,
  against managerd with ``--fsync always``, ``interval`` and ``never`` (a
  data directory on the local disk), managerd in memory, and a stock
  ``multiprocessing.managers`` server;
- 1,000,000 queued 100-byte items: the data directory's size, and the time
  from start to serving, after a clean stop and after ``kill -9``.

Usage: ``uv run python benchmarks/durability.py [--seconds 3] [--items 1000000]``.
Prints a table, then the same figures as JSON. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from multiprocessing.managers import BaseManager
from pathlib import Path
from queue import Queue as StdQueue
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd_client import connect  # noqa: E402

from conftest import Daemon  # noqa: E402

PAYLOAD = b"x" * 100
_stock_queue: StdQueue[Any] = StdQueue()


class StockManager(BaseManager):
    pass


StockManager.register("Queue", callable=lambda: _stock_queue)


def _put_for(q: Any, seconds: float) -> int:
    """Put 100-byte items for ``seconds``; how many."""
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        q.put(PAYLOAD)
        n += 1
    return n


def _produce_managerd(address: str, authkey: bytes, seconds: float, out: Any) -> None:
    with connect(address, authkey=authkey) as m:
        out.put(_put_for(m.Queue("bench"), seconds))


def _produce_stock(address: tuple[str, int], authkey: bytes, seconds: float, out: Any) -> None:
    StockManager.register("Queue")
    m: Any = StockManager(address=address, authkey=authkey)
    m.connect()
    out.put(_put_for(m.Queue(), seconds))


def _rate(target: Any, args: tuple[Any, ...], producers: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, seconds, out)) for _ in range(producers)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(30)
    return total / seconds


def throughput(seconds: float) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in (
            ("managerd fsync=always", ["--fsync", "always"]),
            ("managerd fsync=interval", ["--fsync", "interval"]),
            ("managerd fsync=never", ["--fsync", "never"]),
            ("managerd in memory", []),
        ):
            results[label] = {}
            for producers in (1, 8):
                base = Path(tmp) / f"{len(results)}-{producers}"
                base.mkdir()
                extra = ["--data-dir", str(base / "data"), *args] if args else []
                d = Daemon(base, args=extra).start()
                try:
                    results[label][producers] = _rate(
                        _produce_managerd, (d.address, d.authkey), producers, seconds
                    )
                finally:
                    d.stop()
        results["stock multiprocessing.managers"] = {}
        for producers in (1, 8):
            manager = StockManager(address=("127.0.0.1", 0), authkey=b"bench")
            manager.start()
            try:
                results["stock multiprocessing.managers"][producers] = _rate(
                    _produce_stock, (manager.address, b"bench"), producers, seconds
                )
            finally:
                manager.shutdown()
    return results


def restart(items: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        d = Daemon(base, args=["--data-dir", str(base / "data"), "--fsync", "interval"]).start()
        with d.connect() as m:
            q = m.Queue("million")
            batch = [PAYLOAD] * 10_000
            started = time.perf_counter()
            for _ in range(items // len(batch)):
                q.put_many(batch)
            figures["fill_s"] = round(time.perf_counter() - started, 2)
        for how in ("clean stop", "kill -9"):
            if how == "clean stop":
                d.stop()
            else:
                d.kill()
            figures[f"data_dir_mb after {how}"] = round(_size(base / "data") / 2**20, 1)
            started = time.perf_counter()
            d.start(port=d.port)
            figures[f"restart_s after {how}"] = round(time.perf_counter() - started, 2)
            recovered = re.findall(r"recovered .* in ([0-9.]+)s", d.log)
            figures[f"recovery_s after {how} (daemon's own log)"] = float(recovered[-1])
            with d.connect() as m:
                assert m.Queue("million").qsize() == items
        d.stop()
    return figures


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; {args.seconds}s per run; 100-byte puts")
    rates = throughput(args.seconds)
    print(f"\n{'puts/s':<34}{'1 producer':>14}{'8 producers':>14}")
    for label, by in rates.items():
        print(f"{label:<34}{by[1]:>14,.0f}{by[8]:>14,.0f}")
    figures = restart(args.items)
    print(f"\n{args.items:,} queued 100-byte items:")
    for key, value in figures.items():
        print(f"  {key:<44}{value}")
    print(json.dumps({"puts_per_s": rates, "restart": figures}, indent=2))


if __name__ == "__main__":
    main()
