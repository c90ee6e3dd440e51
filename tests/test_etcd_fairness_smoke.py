"""``benchmarks/etcd_fairness.py --quick`` runs, and every item is received exactly once.

Consumers blocked in ``get()`` over two etcd gateways (and over the embedded
daemon) take every numbered item of a paced and of a flat-out phase: none
missing, none twice, nothing but the items put. The shares and the waits are
figures, printed, never asserted: on a loaded machine a gateway can lose
every race for a while, and that is what the benchmark is there to measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_item_reaches_exactly_one_consumer(tmp_path: Path) -> None:
    out = tmp_path / "fairness.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "etcd_fairness.py"), "--quick",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(out.read_text())
    assert len(results) == 4, list(results)
    assert {k.split(",")[0] for k in results} == {"embedded daemon", "2 etcd gateways"}
    for phase, figures in results.items():
        assert figures["puts"] > 0, phase
        assert (figures["missing"], figures["twice"], figures["stray"]) == (0, 0, 0), (
            phase,
            figures,
        )
        # Nothing but the items put (the sentinels are not counted as items).
        assert sum(c["items"] for c in figures["consumers"]) == figures["puts"], (phase, figures)
        assert len(figures["consumers"]) == 4, phase
