"""The model-based stateful tests against the etcd store, a short run (issue 13).

Each ``tests/test_stateful_*.py`` module is run in a pytest of its own with
``MANAGERD_STATEFUL_STORE=etcd``: its daemon is then a gateway on a real
3-node etcd cluster (``stateful_support.sdaemon``), and every machine of the
module checks the gateway against the standard-library model, hostile values,
interrupts, kills and restarts included. The store is chosen when
``stateful_support`` is imported, hence a process per module.

Short, for CI: ``EXAMPLES`` examples per machine from a fixed seed (the same
programs every run, so a failure here is reproducible with this file's
command). Longer runs with random seeds: README "An etcd cluster as the
store" (``MANAGERD_STATEFUL_STORE=etcd`` with ``MANAGERD_STATEFUL_EXAMPLES``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODULES = ("sync", "locks", "queues", "mappings", "stock")
EXAMPLES = 3
SEED = 1

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("module", MODULES)
def test_the_stateful_models_hold_on_etcd(module: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MANAGERD_STATEFUL_STORE": "etcd",
        "MANAGERD_STATEFUL_EXAMPLES": str(EXAMPLES),
    }
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--hypothesis-seed={SEED}", f"--basetemp={tmp_path / 'run'}",
            str(HERE / f"test_stateful_{module}.py"),
        ],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=560,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
