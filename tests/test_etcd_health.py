"""A gateway's Kubernetes-style probes follow its etcd cluster.

A real ``managerd serve --store etcd://...`` on a real 3-node cluster: it is
ready while etcd answers; with every member killed it stays alive
(``/healthz``) but is not ready (``/readyz`` 503, saying why), and it is
ready again, and serves, once the cluster is back. The healthcheck command
of ``docker-compose.etcd.yml``'s gateways, pointed at this gateway, passes
and fails with it. An embedded daemon's readiness is covered by
``test_metrics.py``. A call etcd cannot answer (no quorum) is the caller's
``StoreUnavailable`` (its outcome unknown), not a daemon bug, and the
gateway goes on serving.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy import REPO, compose_model

from managerd_client import InternalError, StoreUnavailable

from conftest import Daemon, free_port, wait_until
from etcd_support import EtcdCluster, running_cluster

#: Long enough for an election after the restart (~2 s here) on a loaded machine.
RECOVER_TIMEOUT_S = 60.0


def probe(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of ``path`` on the metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def compose_healthcheck(port: int) -> int:
    """The exit status of docker-compose.etcd.yml's gateway healthcheck, run against
    the metrics port ``port`` of this host (the image's python: this one)."""
    service = compose_model(REPO / "docker-compose.etcd.yml")["services"]["gateway1"]
    test: list[str] = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], test
    argv = [sys.executable, *(a.replace("127.0.0.1:9120", f"127.0.0.1:{port}") for a in test[2:])]
    assert any(str(port) in a for a in argv), argv
    done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    return done.returncode


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A cluster of this test alone: the test stops all of it."""
    (tmp_path / "etcd").mkdir()
    with running_cluster(tmp_path / "etcd") as cluster:
        yield cluster


@pytest.mark.timeout(180)
def test_a_gateway_is_ready_only_while_etcd_answers(
    own_cluster: EtcdCluster, tmp_path: Path
) -> None:
    port = free_port()
    gateway = Daemon(
        tmp_path / "gateway",
        args=["--store", "etcd://" + ",".join(own_cluster.endpoints), "--metrics-port", str(port)],
    ).start()
    try:
        assert probe(port, "/readyz") == (200, "ready\n")
        assert compose_healthcheck(port) == 0
        with gateway.connect() as m:
            m.Queue("jobs").put(1)

        for i in range(len(own_cluster.members)):
            own_cluster.kill(i)
        assert wait_until(lambda: probe(port, "/readyz")[0] == 503, RECOVER_TIMEOUT_S)
        status, body = probe(port, "/readyz")
        assert status == 503 and "etcd" in body, body
        assert probe(port, "/healthz") == (200, "ok\n")  # alive: not to be restarted
        assert compose_healthcheck(port) != 0

        own_cluster.start()  # every member again, on its data directory
        assert wait_until(lambda: probe(port, "/readyz")[0] == 200, RECOVER_TIMEOUT_S)
        assert probe(port, "/readyz") == (200, "ready\n")
        assert compose_healthcheck(port) == 0
        with gateway.connect() as m:
            assert m.Queue("jobs").get(timeout=10) == 1
    finally:
        gateway.stop()


@pytest.mark.timeout(240)
def test_a_call_etcd_cannot_answer_is_store_unavailable(
    own_cluster: EtcdCluster, tmp_path: Path
) -> None:
    gateway = Daemon(
        tmp_path / "gateway", args=["--store", "etcd://" + ",".join(own_cluster.endpoints)]
    ).start()
    try:
        with gateway.connect() as m:
            v = m.Value("v", "i", 0)
            v.value = 1
            own_cluster.kill(1)
            own_cluster.kill(2)  # one member of three: no quorum, nothing commits
            with pytest.raises(StoreUnavailable) as raised:
                v.value = 2
            assert not isinstance(raised.value, InternalError)
            assert "may or may not have taken effect" in str(raised.value)
            m.ping()  # the gateway itself goes on answering
        own_cluster.kill(0)
        own_cluster.start()  # every member again, on its data directory

        def answers() -> bool:
            try:
                with gateway.connect() as again:
                    again.Value("v", "i", 0).value = 3
                    return bool(again.Value("v", "i", 0).value == 3)
            except StoreUnavailable:
                return False

        assert wait_until(answers, RECOVER_TIMEOUT_S)
        assert "Traceback" not in "\n".join(gateway.lines)  # no call was a daemon bug
    finally:
        gateway.stop()
