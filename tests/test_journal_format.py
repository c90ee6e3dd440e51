"""The data directory's format: versioned files, the previous format recovered.

``fixtures/datadir-format1/`` was written by a real daemon of data format 1
(commit 5456f22, see ``fixtures/make_datadir_format1.py``): a snapshot and a
journal with every kind of record, killed with a reservation held.
"""

from __future__ import annotations

import ast
import enum
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from managerd.store.memory.records import FORMAT_VERSION

from conftest import Daemon, wait_until

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "datadir-format1"
STORE = Path(__file__).resolve().parent.parent / "managerd" / "store" / "memory"


def _daemon(tmp: Path, data: Path) -> Daemon:
    return Daemon(tmp, args=["--data-dir", str(data), "--fsync", "always"])


def _copy_fixture(tmp: Path) -> Path:
    data = tmp / "data"
    shutil.copytree(FIXTURE, data)
    return data


def _state(d: Daemon) -> dict[str, Any]:
    """Every object as the daemon holds it, decoded, without taking anything."""
    out: dict[str, Any] = {}
    with d.connect() as m:
        objects = m.status()["objects"]
        for name, typeid in m.objects():
            peek = m.peek(name, 100)
            about = objects[name]
            if peek["kind"] == "sequence":
                value: Any = [pickle.loads(p) for p in peek["items"]]
            elif peek["kind"] == "mapping":
                value = {k: pickle.loads(p) for k, p in peek["items"]}
            elif peek["kind"] == "plain":
                value = peek["value"]
            else:
                value = about.get("set")
            extra = {k: about[k] for k in ("unfinished", "reserved") if k in about}
            out[name] = (typeid, value, extra)
    return out


#: What the format-1 fixture holds (its generator says how it came about).
FIXTURE_STATE: dict[str, Any] = {
    # "c" was reserved when the daemon died: back at the front
    "q": ("Queue", ["c", "d", "e"], {"unfinished": 5, "reserved": 0}),
    "jq": ("JoinableQueue", [2, 3, 4], {"unfinished": 2, "reserved": 0}),
    "q2": ("Queue", [{"n": 1}, b"raw"], {"unfinished": 2, "reserved": 0}),
    "d": ("dict", {"z": 3, "w": "W"}, {}),
    "d2": ("dict", {}, {}),
    "l": ("list", [0, 10, 5], {}),
    "ns": ("Namespace", {"beta": {"b": 2}}, {}),
    "v": ("Value", 42, {}),
    "arr": ("Array", [9, 8, 7], {}),
    "ev": ("Event", False, {}),
    "ev2": ("Event", True, {}),
    "lk": ("Lock", None, {}),
}


def _headers(data: Path) -> dict[str, bytes]:
    """The header line of each journal and snapshot (a compaction may remove some meanwhile)."""
    out: dict[str, bytes] = {}
    for p in data.iterdir():
        if p.name.startswith(("journal-", "snapshot-")):
            try:
                out[p.name] = p.read_bytes().split(b"\n", 1)[0]
            except FileNotFoundError:
                continue
    return out


def _all_current(data: Path) -> bool:
    """Only files of this format left (the recovery's compaction is done)."""
    headers = _headers(data)
    want = str(FORMAT_VERSION).encode()
    return any(n.startswith("snapshot-") for n in headers) and all(
        h.rsplit(b"-", 1)[1] == want for h in headers.values()
    )


def test_a_format1_data_directory_is_recovered_exactly(tmp_path: Path) -> None:
    data = _copy_fixture(tmp_path)
    d = _daemon(tmp_path, data).start()
    try:
        assert _state(d) == FIXTURE_STATE
        with d.connect() as m:
            msg = m.Queue("q").reserve(timeout=5)
            assert (msg.value, msg.deliveries) == ("c", 2)  # its delivery was counted
            msg.ack()
            assert m.Queue("q2", maxsize=5).full() is False
        # The start's compaction rewrote everything in this format.
        assert wait_until(lambda: _all_current(data)), _headers(data)
    finally:
        d.stop()


def test_a_recovered_directory_round_trips_in_the_new_format(tmp_path: Path) -> None:
    data = _copy_fixture(tmp_path)
    d = _daemon(tmp_path, data).start()
    try:
        assert wait_until(lambda: _all_current(data)), _headers(data)
        with d.connect() as m:  # records of every kind, in the new format's journal
            m.Queue("q").put("f")
            m.Queue("q").get()
            held = m.JoinableQueue("jq").reserve(timeout=5)
            assert held.value == 2
            m.JoinableQueue("jq").task_done()
            m.dict("d")["new"] = 1
            m.list("l").append(6)
            m.Namespace("ns").gamma = 3
            m.Value("v", "i").add(1)
            m.Array("arr", "i", 3)[2] = 6
            m.Event("ev").set()
            m.delete("d2")
            m.Queue("fresh").put_many([1, 2])
            before = _state(d)
            d.kill()  # the reservation comes back at the front
        d.start(port=d.port)
        after = _state(d)
        assert before["jq"] == ("JoinableQueue", [3, 4], {"unfinished": 1, "reserved": 1})
        assert after.pop("jq") == ("JoinableQueue", [2, 3, 4], {"unfinished": 1, "reserved": 0})
        del before["jq"]
        assert after == before
        assert after["q"][1] == ["d", "e", "f"] and "d2" not in after
        assert _headers(data) and all(
            h.endswith(str(FORMAT_VERSION).encode()) for h in _headers(data).values()
        )
    finally:
        d.stop()


def test_format1_files_followed_by_a_new_journal_are_read_in_order(tmp_path: Path) -> None:
    """A crash between the first new journal and its snapshot: format 1, then format 2."""
    data = _copy_fixture(tmp_path)
    d = _daemon(tmp_path, data).start()
    try:
        assert wait_until(lambda: _all_current(data)), _headers(data)
        # journal-2 was begun (not after the format-1 journal-1), then the compaction's
        new_journals = sorted(data.glob("journal-*.log"))
        assert [p.name for p in new_journals] == ["journal-3.log"]
        with d.connect() as m:
            m.Queue("q").put("g")
            m.dict("d").pop("z")
            m.list("l").insert(0, -1)
            m.Event("ev2").clear()
            expected = _state(d)
        d.kill()
    finally:
        d.stop()
    # The directory as if the daemon had died before writing snapshot-3.bin.
    mixed = tmp_path / "mixed"
    shutil.copytree(FIXTURE, mixed)
    (mixed / "journal-2.log").write_bytes(b"MANAGERD-JOURNAL-%d\n" % FORMAT_VERSION)
    shutil.copy(data / "journal-3.log", mixed / "journal-3.log")
    d2 = _daemon(tmp_path, mixed).start()
    try:
        assert _state(d2) == expected
    finally:
        d2.stop()


def test_an_empty_format1_journal_is_not_appended_to(tmp_path: Path) -> None:
    """A format-1 daemon's fresh directory: new records go to a new file, never after it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "journal-0.log").write_bytes(b"MANAGERD-JOURNAL-1\n")
    d = _daemon(tmp_path, data).start()
    try:
        with d.connect() as m:
            m.Queue("q").put_many([1, 2, 3])
        assert (data / "journal-0.log").read_bytes() == b"MANAGERD-JOURNAL-1\n"
        d.kill()
        d.start(port=d.port)
        with d.connect() as m:
            assert m.Queue("q").get_many(10, block=False) == [1, 2, 3]
    finally:
        d.stop()


def _serve(data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "managerd", "serve", "--port", "0", "--data-dir", str(data), *extra],
        env={**Daemon(data).env(), "MANAGERD_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["journal-1.log", "snapshot-1.bin"])
def test_a_newer_format_refuses_to_start_with_one_line(tmp_path: Path, name: str) -> None:
    data = _copy_fixture(tmp_path)
    path = data / name
    body = path.read_bytes().split(b"\n", 1)[1]
    kind = b"JOURNAL" if name.startswith("journal") else b"SNAPSHOT"
    newer = FORMAT_VERSION + 1
    path.write_bytes(b"MANAGERD-" + kind + b"-" + str(newer).encode() + b"\n" + body)
    files = {p.name: p.read_bytes() for p in data.iterdir()}
    for extra in ((), ("--recover",)):  # --recover never cuts a file it cannot read
        done = _serve(data, *extra)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert name in lines[0] and f"format {newer}" in lines[0] and "newer" in lines[0]
        assert {p.name: p.read_bytes() for p in data.iterdir() if p.name in files} == files


# -- no bare strings in the store's records and waiters ----------------------------------
def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == name
    ]


def test_records_and_waiter_kinds_are_enums_not_strings() -> None:
    """Every journaled change names an enum member; no record or waiter kind is a str literal."""
    found: list[str] = []
    changes = 0
    for path in sorted(STORE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "_j"):
            changes += 1
            if not call.args or not isinstance(call.args[0], (ast.Attribute, ast.IfExp)):
                found.append(f"{path.name}:{call.lineno}: _j without an enum member")
        for call in _calls(tree, "append"):
            arg = call.args[0] if call.args else None
            if isinstance(arg, ast.Tuple) and arg.elts:
                first = arg.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.append(f"{path.name}:{call.lineno}: a record kind as a string")
        for call in _calls(tree, "park"):
            data = call.args[4] if len(call.args) > 4 else None
            if isinstance(data, ast.Constant) and isinstance(data.value, str):
                found.append(f"{path.name}:{call.lineno}: a waiter kind as a string")
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef) and func.name in ("apply", "replay"):
                for node in ast.walk(func):
                    if isinstance(node, ast.Compare) and any(
                        isinstance(c, ast.Constant) and isinstance(c.value, str)
                        for c in [node.left, *node.comparators]
                    ):
                        found.append(f"{path.name}:{node.lineno}: a record compared to a string")
    assert changes > 30  # the walk found the journaled changes
    assert found == []


def test_on_disk_values_are_pinned_and_cover_every_journaled_type() -> None:
    """Changing a value on disk breaks every data directory: it must be a new format."""
    from managerd.store.memory.records import EFFECTS, FORMAT1_EFFECTS, RecordKind
    from managerd.store.memory.registry import TYPES

    pinned = {
        "RecordKind": {"CREATE": 1, "DELETE": 2, "STATE": 3, "OP": 4},
        "QueueOp": {
            "PUSH": 1, "FRONT": 2, "POP": 3, "RES": 4, "UNRES": 5, "DONE": 6, "UNFINISHED": 7,
        },
        "EventOp": {"FLAG": 1},
        "DictOp": {"SET": 1, "DEL": 2, "UPDATE": 3, "CLEAR": 4},
        "ListOp": {"SET": 1, "DEL": 2, "EXTEND": 3, "INSERT": 4, "ALL": 5},
        "NamespaceOp": {"SET": 1, "DEL": 2},
        "ValueOp": {"SET": 1},
        "ArrayOp": {"SET": 1},
    }  # fmt: skip
    enums: set[type[enum.IntEnum]] = {RecordKind, *EFFECTS.values()}
    assert {e.__name__: {m.name: m.value for m in e} for e in enums} == pinned
    durable = {typeid for typeid, cls in TYPES.items() if cls.durable}
    assert set(EFFECTS) == durable == set(FORMAT1_EFFECTS)
    for typeid, table in FORMAT1_EFFECTS.items():  # every effect has its format-1 string
        assert set(table.values()) == set(EFFECTS[typeid])


def test_a_journal_with_a_torn_header_is_begun_again(tmp_path: Path) -> None:
    """A crash while a journal's header was written: it holds nothing, and stays readable."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "journal-0.log").write_bytes(b"MANAGERD-JOU")
    d = _daemon(tmp_path, data).start()
    try:
        with d.connect() as m:
            m.Queue("q").put_many([1, 2])
        d.kill()
        d.start(port=d.port)  # journal-0 is whole now: read, not "not a managerd file"
        with d.connect() as m:
            assert m.Queue("q").get_many(10, block=False) == [1, 2]
    finally:
        d.stop()
