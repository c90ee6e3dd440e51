"""How long a stock ``multiprocessing.managers`` client takes to get going.

Prints, for each Python 3.11/3.12/3.13 found (pyenv's, or this one), the
median, p90 and max over ``--rounds`` fresh clients of:

- ``handshake``: ``Client(address, authkey)`` and one ``dummy`` request;
- ``connect+first call``: ``BaseManager.connect()``, ``m.Queue(name)`` and
  ``q.qsize()`` — five TCP connections, each with the HMAC handshake.

Without ``TCP_NODELAY``/``TCP_QUICKACK`` on the daemon each connection can
lose ~40 ms to Nagle and delayed ACK (NOTES.md); with them a round is a few
ms. A number to read, not a test::

    uv run python benchmarks/stock_connect.py            # starts its own daemon
    MANAGERD_AUTHKEY=... uv run python benchmarks/stock_connect.py --address HOST:PORT
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import subprocess
import sys

# Runs in the stock interpreter: standard library only.
CLIENT = r"""
import os, statistics, sys, time
from multiprocessing.connection import Client
from multiprocessing.managers import BaseManager, dispatch

host, port = sys.argv[1].rsplit(":", 1)
address, key, rounds = (host, int(port)), os.environ["MANAGERD_AUTHKEY"].encode(), int(sys.argv[2])

class M(BaseManager):
    pass

M.register("Queue")

def handshake():
    conn = Client(address, authkey=key)
    dispatch(conn, None, "dummy")
    conn.close()

def first_call():
    m = M(address=address, authkey=key)
    m.connect()
    m.Queue("benchmark-stock-connect").qsize()

for name, fn in (("handshake", handshake), ("connect+first call", first_call)):
    fn()  # warm up imports and the object
    ms = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - start) * 1000)
    ms.sort()
    p90 = ms[int(len(ms) * 0.9) - 1]
    print(f"  {name:<20} median {statistics.median(ms):6.2f} ms  p90 {p90:6.2f} ms  "
          f"max {ms[-1]:6.2f} ms")
"""


def interpreters() -> list[tuple[str, str]]:
    """(version, path) of Python 3.11-3.13: pyenv's newest of each, else this one."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = []
    for version in ("3.11", "3.12", "3.13"):
        paths = glob.glob(f"{root}/versions/{version}.*/bin/python{version}")
        if paths:
            found.append(
                (version, max(paths, key=lambda p: [int(n) for n in re.findall(r"\d+", p)]))
            )
        elif sys.version.startswith(version):
            found.append((version, sys.executable))
    return found


def start_daemon(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "managerd", "serve", "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"managerd serving on (\S+:\d+)", line)
        if match:
            return proc, match.group(1)
    proc.wait()
    raise SystemExit("the daemon did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="HOST:PORT of a running daemon (default: start one)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    env = dict(os.environ)
    daemon = None
    if args.address:
        address = args.address
    else:
        env["MANAGERD_AUTHKEY"] = secrets.token_hex(16)
        daemon, address = start_daemon(env)
    try:
        for version, python in interpreters():
            print(f"stock Python {version} against managerd at {address}:", flush=True)
            subprocess.run(
                [python, "-I", "-S", "-c", CLIENT, address, str(args.rounds)], env=env, check=True
            )
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
