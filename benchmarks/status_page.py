"""How light is the status page with many objects?

Starts a daemon with a metrics port, creates ``--objects`` objects (a mix:
queues with an item, locks, dicts, events, values), then:

1. times ``GET /status.json`` (median of ``--rounds``) and prints its size;
2. opens ``/`` in headless Chromium (Debian's ``chromium``, driven by
   playwright) and times from navigation to the first rendered tables
   (median of ``--rounds`` fresh pages), and one refresh (the page's poll);
3. prints how many table rows the page holds (it shows 100 per table).

A number to read, not a test::

    uv run python benchmarks/status_page.py --objects 10000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from managerd_client import connect

KINDS = ("Queue", "Lock", "dict", "Event", "Value")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    authkey = secrets.token_hex(16)
    http_port = free_port()
    env = dict(os.environ, MANAGERD_AUTHKEY=authkey)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "managerd", "serve", "--port", "0",
         "--metrics-port", str(http_port), "--log-level", "INFO"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = _wait_for_port(daemon)
        with connect(("127.0.0.1", port), authkey=authkey.encode()) as m:
            started = time.perf_counter()
            for i in range(args.objects):
                kind = KINDS[i % len(KINDS)]
                name = f"{kind.lower()}-{i:05d}"
                if kind == "Queue":
                    m.Queue(name).put(i)
                elif kind == "Lock":
                    m.Lock(name)
                elif kind == "dict":
                    m.dict(name)["k"] = i
                elif kind == "Event":
                    m.Event(name)
                else:
                    m.Value(name, "i", i)
            print(f"created {args.objects} objects in {time.perf_counter() - started:.1f}s")
            url = f"http://127.0.0.1:{http_port}"
            times, size = [], 0
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{url}/status.json", timeout=30) as r:
                    body = r.read()
                times.append(time.perf_counter() - t0)
                size = len(body)
            doc = json.loads(body)
            print(
                f"GET /status.json: {statistics.median(times) * 1000:.0f} ms median, "
                f"{size / 1e6:.2f} MB, {doc['objects']} objects"
            )
            _page(url, args.chromium, args.rounds)
    finally:
        daemon.terminate()
        daemon.wait(15)


def _page(url: str, chromium: str, rounds: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        loads, refreshes, rows = [], [], 0
        for _ in range(rounds):
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(f"{url}/")
            page.wait_for_selector("body[data-polls='1']")
            loads.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            page.wait_for_selector("body[data-polls='2']")
            # The wait includes the page's 1 s poll interval; the refresh is the rest.
            refreshes.append(time.perf_counter() - t1)
            rows = page.eval_on_selector_all("tbody tr", "trs => trs.length")
            page.close()
        browser.close()
    print(
        f"page: first render {statistics.median(loads) * 1000:.0f} ms median "
        f"(navigation to tables), next poll rendered {statistics.median(refreshes):.2f}s "
        f"later (1 s poll interval included), {rows} table rows in the DOM"
    )


def _wait_for_port(daemon: subprocess.Popen[str]) -> int:
    assert daemon.stderr is not None
    for line in daemon.stderr:
        m = re.search(r"serving on \S+:(\d+)", line)
        if m:
            return int(m.group(1))
    raise SystemExit("the daemon did not start")


if __name__ == "__main__":
    main()
