"""Run the model-based stateful tests for N minutes; print examples per primitive and failures.

    python3 -m uv run --python python3 scripts/stateful_long.py --minutes 20

Runs ``tests/test_stateful_*.py`` in rounds (each round with
``MANAGERD_STATEFUL_EXAMPLES`` examples per test) until the time is up, each
round with a fresh hypothesis seed. Every example a state machine starts is
counted by primitive (``MANAGERD_STATEFUL_COUNTS``); each failing test is
listed with the tail of its report. Exit code 1 if anything failed.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--examples", type=int, default=50, help="examples per test per round")
    parser.add_argument("--steps", type=int, default=30, help="steps per example")
    parser.add_argument("-k", default="", help="pytest -k expression (e.g. queue)")
    parser.add_argument(
        "--test-timeout", type=int, default=900, help="seconds one test (one machine) may take"
    )
    args = parser.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    rounds = 0
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = Path(tmp) / "counts"
        while time.monotonic() < deadline:
            rounds += 1
            counts_file.write_text("")
            env = dict(os.environ)
            env.update(
                MANAGERD_STATEFUL_EXAMPLES=str(args.examples),
                MANAGERD_STATEFUL_STEPS=str(args.steps),
                MANAGERD_STATEFUL_COUNTS=str(counts_file),
            )
            cmd = [
                sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                # A test that hangs is stopped by pytest-timeout, which prints
                # every thread's stack: a hang is a failure to explain.
                "-o", f"timeout={args.test_timeout}",
                f"--hypothesis-seed={random.randrange(2**32)}",
                *(["-k", args.k] if args.k else []),
                *sorted(str(p) for p in (ROOT / "tests").glob("test_stateful_*.py")),
            ]  # fmt: skip
            # A round may end after the deadline: it is cut only if it hangs
            # past what pytest-timeout allows every one of its tests.
            left_s = args.test_timeout * 20
            try:
                out = subprocess.run(
                    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left_s
                )
                report = out.stdout + out.stderr
                failed = out.returncode != 0
            except subprocess.TimeoutExpired as exc:
                out_text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
                report = f"round {rounds} timed out: {exc}\n{(out_text or '')[-6000:]}"
                failed = True
            counts.update(line for line in counts_file.read_text().splitlines() if line)
            if failed:
                failures.append(f"--- round {rounds}\n" + report[-6000:])
            print(f"round {rounds}: {'FAILED' if failed else 'ok'}; {dict(counts)}", flush=True)
    print(f"\n{rounds} rounds in {args.minutes} min; examples tried per primitive:")
    for primitive, n in sorted(counts.items()):
        print(f"  {primitive:20} {n}")
    print(f"failures: {len(failures)}")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
