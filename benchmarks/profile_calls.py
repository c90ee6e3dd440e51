"""Where a small call's time goes: cProfile of the daemon and of the client, per workload.

For each workload a fresh ``managerd serve`` runs under cProfile (stopped
with SIGTERM, so the profile is written), and the client makes ``--calls``
calls under its own cProfile. Printed per side: the functions with the most
own time, in µs per call (cProfile's overhead inflates every figure by
about the same factor: read them as shares, not as absolute costs; the
suite's CPU per call is the absolute figure).

Usage::

    uv run python benchmarks/profile_calls.py --calls 20000 --top 15
    uv run python benchmarks/profile_calls.py --only noop,putget
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients"))

from managerd_client import Manager, connect  # noqa: E402

#: Runs ``managerd serve`` under cProfile and writes the profile on exit.
_DAEMON = """
import cProfile, runpy, sys
out = sys.argv.pop(1)
sys.argv[0] = "managerd"
prof = cProfile.Profile()
try:
    prof.runcall(runpy.run_module, "managerd", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    prof.dump_stats(out)
"""


def _workloads(m: Manager) -> dict[str, Callable[[], Any]]:
    value = m.Value("pv", "i", 1)
    q = m.Queue("pq")
    lock = m.Lock("pl")
    payload = b"x" * 100

    def putget() -> None:
        q.put(payload)
        q.get()

    def lock_pair() -> None:
        lock.acquire()
        lock.release()

    return {"noop": m.ping, "value_get": lambda: value.value, "putget": putget, "lock": lock_pair}


def _top(stats: pstats.Stats, calls: int, top: int) -> str:
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{Path(file).name}:{line}({fn})"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    out = io.StringIO()
    out.write(f"  total {total / calls * 1e6:.1f} µs/call (profiled)\n")
    out.write(f"  {'own µs':>7} {'cum µs':>7} {'n/call':>6}  function\n")
    for tt, ct, nc, name in rows[:top]:
        out.write(f"  {tt / calls * 1e6:7.2f} {ct / calls * 1e6:7.2f} {nc / calls:6.2f}  {name}\n")
    return out.getvalue()


def _daemon(tmp: Path, prof: Path, port: int, key: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MANAGERD_AUTHKEY=key, MANAGERD_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients")])
    cmd = [sys.executable, "-c", _DAEMON, str(prof), "serve", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=tmp)


def _connect(port: int, key: str) -> Manager:
    deadline = time.monotonic() + 30
    while True:
        try:
            return connect(("127.0.0.1", port), key.encode())
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--only", default="noop,value_get,putget,lock")
    parser.add_argument("--port", type=int, default=47311)
    args = parser.parse_args()
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.only.split(","):
            prof = tmp / f"{name}.prof"
            daemon = _daemon(tmp, prof, args.port, key)
            try:
                m = _connect(args.port, key)
                fn = _workloads(m)[name]
                for _ in range(1000):
                    fn()
                client = cProfile.Profile()
                client.enable()
                for _ in range(args.calls):
                    fn()
                client.disable()
                m.close()
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
            print(f"== {name}: client")
            print(_top(pstats.Stats(client), args.calls, args.top))
            print(f"== {name}: daemon (setup and warm-up included)")
            print(_top(pstats.Stats(str(prof)), args.calls + 1000, args.top))


if __name__ == "__main__":
    main()
