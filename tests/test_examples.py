"""Every example in clients/examples/ runs against a real daemon and succeeds.

Each is run as a user runs it: a subprocess with ``--address`` and the
authkey in ``MANAGERD_AUTHKEY``, starting its own worker processes. The
test checks the exit code, the lines it prints, and that it deleted the
objects it made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Daemon

EXAMPLES = Path(__file__).parent.parent / "clients" / "examples"
RUN_TIMEOUT_S = 100.0

#: The lines each example must print (regexes, in order).
EXPECTED: dict[str, list[str]] = {
    "queue_producer_consumer.py": [
        r"^2 consumers handled \[\d+, \d+\] jobs each$",
        r"^OK: 20 jobs produced, consumed and checked$",
    ],
    "pipe_sender_receiver.py": [
        r"^sender: sent 42$",
        r"^receiver: got \[42, None, 'hello', \{'nested': \[1, 2\.5\]\}, b'bytes'\]$",
        r"^OK: 5 messages sent and received in order$",
    ],
    "list_dict_workers.py": [
        r"^dict has 40 squares, e.g. 7 -> 49$",
        r"^list has 40 entries",
        r"^OK: 4 workers filled the dict and the list with 40 numbers$",
    ],
    "value_array_counter.py": [
        r"^counter = 200 \(expected 200\), per worker \[50, 50, 50, 50\]$",
        r"^OK: 200 increments, none lost$",
    ],
    "sync_primitives.py": [
        r"^4 workers started; setting the start event$",
        r"^at most [12] workers were inside the section at once \(limit 2\)$",
        r"^OK: 4 workers started together, shared 2 slots and reported back$",
    ],
    "compose_worker.py": [
        r"^2 consumers did \[6, 6\] jobs; 0 left on the queue$",
        r"^OK: 12 jobs produced, reserved, done and acked$",
    ],
}


def run_example(script: str, daemon: Daemon, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--address", daemon.address],
        env={**daemon.client_env(), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", [pytest.param(s, id=s[:-3]) for s in EXPECTED])
def test_example_runs(script: str, shared_daemon: Daemon) -> None:
    before = shared_daemon.connect()
    try:
        objects_before = set(before.objects())
    finally:
        before.close()
    result = run_example(script, shared_daemon)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = result.stdout.splitlines()
    position = 0
    for pattern in EXPECTED[script]:
        found = [i for i, line in enumerate(lines) if i >= position and re.search(pattern, line)]
        assert found, f"no line matching {pattern!r} (in order) in:\n{out}"
        position = found[0] + 1
    assert "FAILED" not in out and "Traceback" not in out, out
    with shared_daemon.connect() as m:
        assert set(m.objects()) == objects_before, "the example left objects behind"


def test_example_fails_without_the_right_authkey(shared_daemon: Daemon) -> None:
    result = run_example("list_dict_workers.py", shared_daemon, MANAGERD_AUTHKEY="wrong key")
    assert result.returncode != 0
    assert "AuthenticationFailed" in result.stderr, result.stderr
    assert "OK:" not in result.stdout


def test_examples_use_only_managerd_client_and_the_stdlib() -> None:
    stdlib = sys.stdlib_module_names
    for path in EXAMPLES.glob("*.py"):
        source = path.read_text()
        modules = re.findall(r"^(?:from|import) (\w+)", source, flags=re.MULTILINE)
        foreign = {m for m in modules if m not in stdlib and m != "managerd_client"}
        assert not foreign, f"{path.name} imports {foreign}"
        assert "managerd." not in source.replace("managerd_client", ""), path.name
    assert os.access(EXAMPLES / "README.md", os.R_OK)
