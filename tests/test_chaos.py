"""CI's short run of the chaos script (scripts/chaos.py): every must-be-0 figure is 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import netns

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"


def test_short_chaos_run_loses_nothing() -> None:
    reason = netns.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration-s", "10", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    figures = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(figures["produced"]) > 0 and int(figures["lock_holdings"]) > 0
    for must_be_zero in (
        "lost",
        "duplicates_after_ack",
        "lock_overlap_violations",
        "stuck_waiters",
    ):
        assert figures[must_be_zero].strip() == "0", done.stdout
