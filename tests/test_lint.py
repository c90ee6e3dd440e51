"""Lint and type checks are part of the test command.

``ruff check``, ``ruff format --check`` and ``mypy`` (strict; what it checks
is configured in ``pyproject.toml``) run from the repository root with the
tools of this environment; any finding fails the test and shows the tool's
output. Also: CI runs exactly the test command the README gives.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_TIMEOUT_S = 110.0  # under pytest's 120 s per test


@pytest.mark.parametrize(
    "tool",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(tool: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *tool],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, (
        f"`{' '.join(tool)}` exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def test_mypy_is_strict() -> None:
    config = (REPO / "pyproject.toml").read_text()
    section = config.split("[tool.mypy]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^strict\s*=\s*true\s*$", section, flags=re.M), section


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    tests = [c for c in commands if c.rstrip().endswith("pytest")]
    assert len(tests) == 1, f"the README should give one test command, found {tests}"
    return str(tests[0]).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_test_command()
    script = (REPO / ".ci" / "run").read_text()
    assert command in script.splitlines(), f"{command!r} is not a line of .ci/run"
