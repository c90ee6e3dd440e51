"""The benchmark suite runs: ``benchmarks/suite.py --quick`` (CI's seconds-long smoke).

Every workload is executed against the raw floor, a stock manager and
managerd, with tiny counts. This checks that each one RAN and produced a
figure, and that the correctness checks inside the suite (every message
received exactly once, FIFO wakes) held — never how fast anything was.
The etcd store's benchmarks (``etcd_gateways.py``, ``etcd_failover.py``)
run the same way, tiny, on a real 3-node cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "suite.py"

#: Every workload of the quick run, and the systems that must have a figure.
EXPECTED = {
    "floor_pingpong_100B": ("floor",),
    "noop_ping": ("floor", "stock", "managerd"),
    "noop_value_get": ("floor", "stock", "managerd"),
    "queue_put_get_100B": ("floor", "stock", "managerd"),
    "queue_put_get_32KB": ("floor", "stock", "managerd"),
    "roundtrip_32KB_ms": ("floor", "stock", "managerd"),
    "queue_put_get_1MB": ("floor", "stock", "managerd"),
    "put_only_100B": ("floor", "stock", "managerd"),
    "dict_set": ("stock", "managerd"),
    "dict_get": ("stock", "managerd"),
    "lock_uncontended": ("stock", "managerd"),
    "lock_contended_4procs": ("stock", "managerd"),
    "queue_2p2c_100B": ("stock", "managerd"),
    "queue_8p8c_100B": ("stock", "managerd"),
    "queue_1p1c_100B": ("stock", "managerd"),
    "batch_1000_1p1c_100B": ("stock", "managerd"),
    "saturation_8_clients_per_core": ("stock", "managerd"),
    "variants_noop_ping": ("managerd", "metrics", "data_dir"),
    "variants_put_get_100B": ("managerd", "metrics", "data_dir"),
    "connect_first_call_ms": ("floor", "stock", "managerd"),
    "blocked_get_50_wake_ms": ("stock", "managerd"),
    "client_imports": ("managerd",),
    "noop_ping_asyncio": ("managerd",),
    "noop_ping_uvloop": ("managerd",),
    "idle_50_server_rss_mb": ("stock", "managerd"),
    "idle_50_other_call_p99_ms": ("stock", "managerd"),
    "connections_200_accepted": ("managerd",),
}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_suite_runs_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert report["correctness_failures"] == []
    workloads = report["workloads"]
    assert set(EXPECTED) <= set(workloads), f"missing: {set(EXPECTED) - set(workloads)}"
    for key, systems in EXPECTED.items():
        for system in systems:
            figure = workloads[key].get(system)
            assert isinstance(figure, (int, float)) and figure > 0, (key, system, figure)
    imports = workloads["client_imports"]["details"]
    assert imports["third_party"] == {}, imports
    assert workloads["connections_200_accepted"]["managerd"] == 200
    for key in ("queue_2p2c_100B", "queue_8p8c_100B", "queue_1p1c_100B", "batch_1000_1p1c_100B"):
        for system, details in workloads[key]["details"].items():
            assert details["ok"], (key, system, details)
            assert details["received"] == details["sent"] > 0, (key, system, details)
    for system, details in workloads["blocked_get_50_wake_ms"]["details"].items():
        assert details["fifo"] and details["exactly_one_per_put"], (system, details)
        assert details["woken"] == 50, (system, details)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_managerd_from_measures_another_checkouts_daemon(tmp_path: Path) -> None:
    """--managerd-from: a copy of the code (no venv, no git) serves as managerd@<name>."""
    other = (tmp_path / "other-checkout").resolve()
    for part in ("managerd", "clients"):
        shutil.copytree(ROOT / part, other / part, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--only", "noop,mpmc,batch",
         "--managerd-from", str(other), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=160,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert report["correctness_failures"] == []
    [(label, compared)] = report["compared"].items()
    assert label == "managerd@other-checkout", label
    # The daemon imported the copy's package, not this checkout's (installed editable).
    assert compared["managerd_module"] == str(other / "managerd" / "__init__.py"), compared
    assert compared["python"] == sys.executable, compared
    for key in ("noop_ping", "noop_value_get", "queue_2p2c_100B", "queue_8p8c_100B",
                "queue_1p1c_100B", "batch_1000_1p1c_100B"):  # fmt: skip
        workload = report["workloads"][key]
        for system in ("managerd", label):
            figure = workload[system]
            assert isinstance(figure, (int, float)) and figure > 0, (key, system, figure)
        assert workload[f"managerd/{label}"] > 0, (key, workload)
        assert set(workload["details"]) >= {"managerd", label}, (key, workload["details"].keys())
    heads = [line for line in proc.stdout.splitlines() if line.startswith("workload")]
    assert any(label in head and "ratio" in head for head in heads), heads  # the comparison table


def test_managerd_from_refuses_a_directory_without_managerd(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--only", "noop", "--managerd-from", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "is not a checkout of managerd" in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_etcd_gateway_benchmark_runs_every_workload(tmp_path: Path) -> None:
    """``benchmarks/etcd_gateways.py``, tiny: every row has a figure for every client count."""
    out = tmp_path / "gateways.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "etcd_gateways.py"), "--seconds", "0.2",
         "--clients", "1,2", "--gateways", "1,2", "--batch", "4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    figures = json.loads(out.read_text())
    floors = {"puts/s", "keys/s in Txns of 4 puts"}
    workloads = {
        "queue put+get pairs/s",
        "put_many/get_many msgs/s (4 per call)",
        "lock acquire+release pairs/s",
    }
    assert set(figures) == floors | workloads
    for workload, rows in figures.items():
        setups = (
            ["raw etcd from this machine (the floor)"]
            if workload in floors
            else ["embedded daemon", "1 gateway(s)", "2 gateway(s)"]
        )
        assert set(rows) == {f"{s}, {n} client(s)" for s in setups for n in (1, 2)}, rows
        assert all(rate > 0 for rate in rows.values()), (workload, rows)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_etcd_failover_benchmark_runs_one_trial_of_each(tmp_path: Path) -> None:
    """``benchmarks/etcd_failover.py --trials 1``: a leader kill and a gateway kill, timed."""
    out = tmp_path / "failover.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "etcd_failover.py"), "--trials", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(out.read_text())
    assert set(results) == {"etcd_leader_kill_s", "gateway_kill_s"}
    for kind, trials in results.items():
        assert len(trials) == 1 and trials[0] > 0, (kind, trials)
    assert "p50" in proc.stdout and "max" in proc.stdout
