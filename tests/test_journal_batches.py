"""A batch's journal records: ``Journal.append_many`` writes what ``append`` would.

A ``put_many`` journals its queued items in one ``append_many``; the file
must hold the very bytes of one ``append`` per record (framing, CRCs,
order), barriers must wait for the whole batch, and a journal of batches
written by a real daemon killed with SIGKILL must replay to the items left.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from managerd.store.memory.journal import FsyncMode, Journal
from managerd.store.memory.records import QueueOp, RecordKind
from managerd_client import Manager

from conftest import Daemon

_PUSH = (int(RecordKind.OP), "q", int(QueueOp.PUSH))


def _records(tag: str, n: int) -> list[tuple[Any, ...]]:
    return [(*_PUSH, f"{tag}{i}".encode() + os.urandom(i % 7), 0) for i in range(n)]


def _journal_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("journal-*.log"))}


async def _write(directory: Path, batches: list[list[tuple[Any, ...]]], many: bool) -> Journal:
    """Append ``batches`` one record at a time or one batch at a time, then close."""
    journal = Journal(directory, FsyncMode.ALWAYS, 1.0)
    journal.recover()
    journal.open(asyncio.get_running_loop())
    for batch in batches:
        if many:
            journal.append_many(batch)
        else:
            for record in batch:
                journal.append(record)
        barrier = journal.barrier()
        if batch:
            assert barrier is not None  # the batch is not on disk yet: wait for it
            await barrier
        assert barrier is None or barrier.done()
        assert journal.barrier() is None  # everything appended is durable now
    await journal.close()
    return journal


def test_append_many_writes_the_bytes_of_one_append_per_record(tmp_path: Path) -> None:
    batches = [
        _records("a", 1000),
        [],
        [(int(RecordKind.CREATE), "Queue", "q", {"maxsize": 0}), (*_PUSH, b"", 0)],
        _records("b", 1),
        [(int(RecordKind.OP), "q", int(QueueOp.POP), 700), *_records("c", 300)],
    ]
    one = asyncio.run(_write(tmp_path / "one", batches, many=False))
    many = asyncio.run(_write(tmp_path / "many", batches, many=True))
    files = _journal_bytes(tmp_path / "many")
    assert list(files) == ["journal-0.log"]
    assert files == _journal_bytes(tmp_path / "one")
    # Size accounting (compaction's trigger) and record counts move alike.
    assert many._journal_bytes == one._journal_bytes == len(files["journal-0.log"])
    assert many._appended == one._appended == sum(map(len, batches))
    replayed, _ = Journal(tmp_path / "many", FsyncMode.ALWAYS, 1.0).recover()
    assert replayed == [record for batch in batches for record in batch]


def test_a_killed_daemons_journal_of_batches_is_append_by_append_and_replays(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    d = Daemon(tmp_path, args=["--data-dir", str(data), "--fsync", "always"]).start()
    try:
        with d.connect() as m:
            q = m.Queue("batches")
            q.put_many([("a", i) for i in range(1000)])
            assert q.get_many(250) == [("a", i) for i in range(250)]
            q.put_many([("b", i, "x" * 100) for i in range(1000)])
            q.put(("c", 0))
        d.kill()  # SIGKILL: no snapshot, no clean close
        # The daemon's file, re-written one ``append`` per record it holds, is the same.
        written = tmp_path / "written"
        shutil.copytree(data, written)
        records, _ = Journal(written, FsyncMode.ALWAYS, 1.0).recover()
        pushes = [r for r in records if r[:3] == (_PUSH[0], "batches", _PUSH[2])]
        assert len(pushes) == 2001
        assert not list(written.glob("snapshot-*.bin"))  # far below compaction's size
        asyncio.run(_write(tmp_path / "again", [records], many=False))
        assert _journal_bytes(tmp_path / "again") == _journal_bytes(data)
        d.start(port=d.port)
        with d.connect() as m:
            q = m.Queue("batches")
            expected = (
                [("a", i) for i in range(250, 1000)]
                + [("b", i, "x" * 100) for i in range(1000)]
                + [("c", 0)]
            )
            assert q.qsize() == len(expected)
            assert q.get_many(5000) == expected
    finally:
        d.stop()


def _cancel_last_call(m: Manager) -> None:
    """Cancel this thread's last call, as an interrupt just after its answer would."""
    channel = m._channel
    assert channel is not None
    rid = next(channel._rids) - 1  # the last request id used (one is skipped: harmless)
    channel._abandon(rid, RuntimeError("as if interrupted"))


def test_an_undone_get_many_is_journaled_in_order_across_a_kill(tmp_path: Path) -> None:
    """The batch goes back to the front, in order, in one ``append_many``."""
    d = Daemon(tmp_path, args=["--data-dir", str(tmp_path / "data"), "--fsync", "always"]).start()
    try:
        with d.connect() as m:
            q = m.Queue("undo")
            q.put_many(["a", "b", "c", "d", "e"])
            assert q.get_many(3) == ["a", "b", "c"]
            _cancel_last_call(m)
            m.ping()
        d.kill()
        d.start(port=d.port)
        with d.connect() as m:
            q = m.Queue("undo")
            assert q.get_many(2) == ["a", "b"]
            q.put("f")
            assert q.get_many(10) == ["c", "d", "e", "f"]
    finally:
        d.stop()
