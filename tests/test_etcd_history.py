"""The history check of the etcd store (scripts/etcd_history.py): a short run, and its checker.

The short run (40 s of clients, faults injected in turn) must find no
violation, and must have done something: faults of every kind injected and
enough operations that succeeded. The checker is shown able to fail on
crafted histories: a lost message, a message delivered twice or after its
ack, overlapping lock holdings, a token given twice, a lost update.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import netns

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "etcd_history.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("etcd_history", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["etcd_history"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


history = _load()
Op = history.Op


@pytest.mark.multihost
@pytest.mark.slow
def test_a_short_run_under_faults_finds_no_violation(tmp_path: Path) -> None:
    reason = netns.unavailable_reason() or history.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    keep = tmp_path / "history"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "40", "--clients", "4", "--seed", "3",
         "--json", "--keep", str(keep)],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["violations"] == [], f"histories kept in {keep}"
    assert done.returncode == 0, done.stderr
    faults = summary["faults"]
    assert faults["etcd_kills"] > 0 and faults["gateway_kills"] > 0 and faults["partitions"] > 0
    kinds = summary["by_kind"]
    assert kinds["write"]["ok"] >= 20 and kinds["release"]["ok"] >= 20
    assert kinds["put"]["ok"] >= 20 and kinds["ack"]["ok"] >= 10 and kinds["get"]["ok"] >= 5
    assert summary["holdings_checked"] >= 20
    assert summary["final_count"] >= kinds["write"]["ok"]
    shutil.rmtree(keep, ignore_errors=True)


# -- the checker on crafted histories --------------------------------------------------


def op(
    client: int, kind: str, start: float, end: float | None, result: str = "ok",
    value: Any = None, **arg: Any,
) -> Any:  # fmt: skip
    return Op(client, kind, start, end, result, arg, value)


def kinds(violations: list[Any]) -> list[str]:
    return sorted(v.kind for v in violations)


def rmw(client: int, token: int, read: int, t: float, released: bool = True) -> list[Any]:
    """A holding of ``token`` from ``t`` to ``t + 1`` that reads ``read`` and writes."""
    value = (read << 32) | (token - 1)
    ops = [
        op(client, "acquire", t, t + 0.1, value=token),
        op(client, "read", t + 0.2, t + 0.3, value=value, token=token),
        op(client, "write", t + 0.4, t + 0.5, token=token, read=read),
    ]
    if released:
        ops.append(op(client, "release", t + 0.9, t + 1.0, token=token))
    return ops


def final(count: int) -> int:
    return count << 32


GOOD = [
    op(1, "put", 0, 1, item="1-1"),
    op(1, "put", 1, 2, item="1-2"),
    op(1, "put", 2, 3, item="1-3"),
    op(1, "put", 3, 4, "info", item="1-4"),  # may or may not be there
    op(2, "get", 2, 3, value="1-1"),
    op(2, "reserve", 3, 4, value=["1-2", 7]),
    op(2, "ack", 4, 5, item="1-2", delivery=7),
    *rmw(1, 10, 0, 10),
    *rmw(2, 12, 1, 11),
    *rmw(1, 15, 2, 12),
]


def test_a_good_history_passes() -> None:
    assert history.check(GOOD, ["1-3"], final(3)) == []
    assert history.check(GOOD, ["1-3", "1-4"], final(3)) == []  # the indeterminate put


def test_a_lost_message_is_found() -> None:
    assert kinds(history.check(GOOD, [], final(3))) == ["lost"]  # 1-3 went nowhere


def test_an_indeterminate_get_may_explain_one_loss_only() -> None:
    maybe = [*GOOD, op(3, "get", 5, None, "info")]
    assert history.check(maybe, [], final(3)) == []
    assert kinds(history.check([*maybe, op(1, "put", 6, 7, item="1-5")], [], final(3))) == ["lost"]


def test_a_message_delivered_twice_is_found() -> None:
    twice = [*GOOD, op(3, "get", 2.5, 3.5, value="1-1")]
    assert kinds(history.check(twice, ["1-3"], final(3))) == ["duplicate"]


def test_a_message_delivered_after_its_ack_is_found() -> None:
    again = [*GOOD, op(3, "reserve", 6, 7, value=["1-2", 8])]  # reserved, never acked
    assert kinds(history.check(again, ["1-3"], final(3))) == ["duplicate"]
    left = history.check(GOOD, ["1-3", "1-2"], final(3))  # still in the queue after its ack
    assert kinds(left) == ["duplicate"]


def test_a_message_nobody_put_or_whose_put_failed_is_found() -> None:
    failed = [*GOOD, op(1, "put", 5, 6, "fail", item="1-9")]
    assert kinds(history.check(failed, ["1-3", "1-9"], final(3))) == ["duplicate"]
    assert kinds(history.check(GOOD, ["1-3", "x-1"], final(3))) == ["duplicate"]


def test_overlapping_holdings_are_found() -> None:
    # Token 20 acquired at 30.1, while token 18 (acquired at 29.6) ran to 30.5.
    overlap = [*GOOD, *rmw(1, 18, 3, 29.6), *rmw(2, 20, 4, 30)]
    assert kinds(history.check(overlap, ["1-3"], final(5))) == ["lock overlap"]


def test_holdings_in_the_wrong_order_of_tokens_are_found() -> None:
    # Token 30 held and released before token 25 was acquired.
    backwards = [*GOOD, *rmw(1, 30, 3, 40), *rmw(2, 25, 4, 42)]
    assert kinds(history.check(backwards, ["1-3"], final(5))) == ["lock overlap"]


def test_one_token_granted_twice_is_found() -> None:
    twice = [*GOOD, *rmw(1, 30, 3, 40), op(2, "acquire", 45, 45.1, value=30)]
    assert kinds(history.check(twice, ["1-3"], final(4))) == ["lock overlap"]


def test_a_holding_that_was_lost_is_not_an_overlap() -> None:
    """A holder whose session expired (release failed) may overlap the next: fencing's job."""
    lost = rmw(1, 18, 3, 29.6, released=False)
    lost.append(op(1, "release", 30.5, 30.6, "fail", token=18))
    fine = [*GOOD, *lost[:2], lost[-1], *rmw(2, 20, 3, 30)]  # token 18 never wrote
    assert history.check(fine, ["1-3"], final(4)) == []


def test_a_lost_update_is_found() -> None:
    # Two ok writes from the same read: one increment vanished.
    lost = [*GOOD, *rmw(1, 18, 3, 30), *rmw(2, 20, 3, 31)]
    found = history.check(lost, ["1-3"], final(4))
    assert {v.kind for v in found} == {"counter"}
    assert any("from the same read 3" in v.detail for v in found)


def test_a_final_count_other_than_the_acknowledged_increments_is_found() -> None:
    assert kinds(history.check(GOOD, ["1-3"], final(2))) == ["counter"]
    assert kinds(history.check(GOOD, ["1-3"], final(4))) == ["counter"]
    maybe = [*GOOD, op(1, "write", 50, None, "info", token=16, read=3)]
    assert history.check(maybe, ["1-3"], final(4)) == []
    assert history.check(maybe, ["1-3"], final(3)) == []


def test_a_stale_read_is_found() -> None:
    stale = [*GOOD, op(3, "read", 20, 20.1, value=final(1))]  # 3 was written by 12.5
    assert kinds(history.check(stale, ["1-3"], final(3))) == ["counter"]


def test_the_history_is_read_back_from_invocation_and_return_lines() -> None:
    lines = [
        json.dumps({"c": 1, "i": 1, "f": "put", "t": 1.0, "a": {"item": "1-1"}, "g": "g1"}),
        json.dumps({"c": 1, "i": 1, "t": 2.0, "r": "ok", "v": None}),
        json.dumps({"c": 1, "i": 2, "f": "put", "t": 3.0, "a": {"item": "1-2"}, "g": "g2"}),
        '{"c": 1, "i": 2, "t": 4.0, "r"',  # cut short: the put stays indeterminate
    ]
    ops = history.read_history(iter(lines))
    assert [(o.kind, o.result, o.end) for o in ops] == [("put", "ok", 2.0), ("put", "info", None)]
