"""Restart without loss: a real daemon killed with SIGKILL, its data directory recovered."""

from __future__ import annotations

import os
import queue
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from managerd_client import ManagerdError

from conftest import Daemon, wait_until

WORKER = str(Path(__file__).resolve().parent / "workers_durability.py")


def _durable(tmp: Path, *extra: str, fsync: str = "always") -> Daemon:
    return Daemon(tmp, args=["--data-dir", str(tmp / "data"), "--fsync", fsync, *extra])


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[Daemon]:
    d = _durable(tmp_path).start()
    try:
        yield d
    finally:
        d.stop()


def _spawn(d: Daemon, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, WORKER, args[0], d.address, *args[1:]],
        env=d.client_env(),
        stdin=subprocess.DEVNULL,
    )


def _lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [
        line.split() for line in path.read_text().splitlines() if line.endswith(tuple("0123456789"))
    ]


@pytest.mark.slow
def test_kill_during_puts_and_takes_loses_nothing_acknowledged(durable: Daemon) -> None:
    """20 crash points with fsync=always: acked puts survive, in order; acked takes stay gone."""
    d, tmp = durable, durable.tmp
    rng = random.Random(20)
    puts: dict[str, list[str]] = {}
    took: set[str] = set()
    seen: set[str] = set()
    for crash in range(20):
        outs = [tmp / f"c{crash}-p{i}.log" for i in range(2)]
        taker = tmp / f"c{crash}-c.log"
        procs = [_spawn(d, "produce", "q", f"r{crash}p{i}", str(out)) for i, out in enumerate(outs)]
        procs.append(_spawn(d, "consume", "q", str(taker)))
        # The crash point: a random moment while the clients are busy.
        assert wait_until(lambda o=outs[0]: o.exists() and o.stat().st_size > 0, timeout_s=20)
        time.sleep(rng.uniform(0.0, 0.3))
        d.kill()
        for p in procs:
            p.wait(30)
        for out in outs:
            for _, item in _lines(out):
                puts.setdefault(item.split(":")[0], []).append(item)
        for word, item in _lines(taker):
            (took if word == "took" else seen).add(item)
        d.start(port=d.port)
        assert "recovered" in d.log
    with d.connect() as m:
        q = m.Queue("q")
        remaining = q.get_many(10**7, block=False) if q.qsize() else []
    assert sum(map(len, puts.values())) > 100, "the clients did too little to prove anything"
    assert not took & set(remaining), "an item acknowledged as taken came back"
    assert len(remaining) == len(set(remaining)), "an item came back twice"
    for producer, acked in puts.items():
        mine = [item for item in remaining if item.startswith(producer + ":")]
        assert mine == sorted(mine), f"{producer}: order changed"
        # Gone without an acknowledged take: only if its ack was in flight
        # at the crash (the consumer saw it; the ack's answer was lost).
        missing = [item for item in acked if item not in took and item not in set(mine)]
        assert set(missing) <= seen, f"{producer}: acknowledged puts lost: {missing[:5]}"


@pytest.mark.slow
def test_kill_during_updates_of_dict_list_namespace_value_array(durable: Daemon) -> None:
    d, tmp = durable, durable.tmp
    rng = random.Random(7)
    acked: list[list[list[str]]] = []
    for crash in range(20):
        out = tmp / f"m{crash}.log"
        proc = _spawn(d, "mutate", str(out), str(crash * 10**6))
        assert wait_until(lambda o=out: o.exists() and o.stat().st_size > 0, timeout_s=20)
        time.sleep(rng.uniform(0.0, 0.3))
        d.kill()
        proc.wait(30)
        acked.append(_lines(out))
        d.start(port=d.port)
    with d.connect() as m:
        data = m.dict("d").copy()
        items = m.list("l").copy()
        last = m.Namespace("ns").last
        value = m.Value("v", "q").value
        array = m.Array("a", "q", 4).tolist()
    adds = 0
    for crash, lines in enumerate(acked):
        base = crash * 10**6
        for word, *rest in lines:
            if word == "dict":
                assert data[f"k{rest[0]}"] == int(rest[0])
            elif word == "value":
                adds += 1
        appended = [int(r[0]) for w, *r in lines if w == "list"]
        mine = [i for i in items if base <= i < base + 10**6]
        # Acked appends, in order; at most one more that landed unacknowledged.
        assert mine[: len(appended)] == appended
        assert len(mine) - len(appended) in (0, 1)
    assert adds <= value <= adds + len(acked)  # each crash may add one unacknowledged
    last_ns = max(int(r[0]) for w, *r in acked[-1] if w == "ns")
    assert last in (last_ns, last_ns + 1)
    for slot in range(4):
        writes = [int(r[1]) for w, *r in acked[-1] if w == "array" and int(r[0]) == slot]
        if writes:
            assert array[slot] >= writes[-1]


def _journal(d: Daemon) -> Path:
    return max((d.tmp / "data").glob("journal-*.log"), key=lambda p: int(p.stem.split("-")[1]))


def test_torn_last_record_is_dropped_and_daemon_starts(durable: Daemon) -> None:
    d = durable
    with d.connect() as m:
        m.Queue("q").put_many(list(range(5)))
    d.kill()
    with _journal(d).open("ab") as f:
        f.write(b"\x00\x00\x01\x00\x12\x34")  # a frame header whose body never came
    d.start(port=d.port)
    assert "dropping 6 bytes" in d.log
    with d.connect() as m:
        assert m.Queue("q").get_many(10) == [0, 1, 2, 3, 4]


def test_corrupt_middle_refuses_to_start_unless_recover(tmp_path: Path) -> None:
    d = _durable(tmp_path).start()
    with d.connect() as m:
        q = m.Queue("q")
        for i in range(20):
            q.put(i)
    d.kill()
    journal = _journal(d)
    data = bytearray(journal.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    journal.write_bytes(bytes(data))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "managerd",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=d.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert journal.name in done.stderr and "offset" in done.stderr and "--recover" in done.stderr
    d.args.append("--recover")
    d.start()
    assert "dropping" in d.log
    with d.connect() as m:
        got = m.Queue("q").get_many(100, block=False)
    assert got == list(range(len(got))) and 0 < len(got) < 20  # a prefix survived
    d.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _need_mount() -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        if os.environ.get("CI"):
            pytest.fail("mounting a tmpfs needs root")
        pytest.skip("mounting a tmpfs needs root")


def test_full_disk_refuses_mutations_reads_keep_working(tmp_path: Path) -> None:
    _need_mount()
    data = tmp_path / "data"
    _mount_tmpfs(data, "2m")
    d = _durable(tmp_path)
    try:
        d.start()
        with d.connect() as m:
            q = m.Queue("big")
            blob = b"x" * 100_000
            stored = 0
            with pytest.raises(OSError, match=r"data directory|not written"):
                for _ in range(100):
                    q.put(blob)
                    stored += 1
            assert stored > 0
            with pytest.raises(OSError, match="cannot take writes"):
                q.put(b"more")
            assert q.qsize() >= stored  # reads keep working
            assert ("big", "Queue") in m.objects()
            assert "cannot write to" in d.log
            subprocess.run(["mount", "-o", "remount,size=64m", str(data)], check=True)
            assert wait_until(lambda: _put_ok(q), timeout_s=10)
        d.kill()
        d.start(port=d.port)
        with d.connect() as m:
            assert m.Queue("big").qsize() >= stored + 1
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)


def _put_ok(q: object) -> bool:
    try:
        q.put(b"after")  # type: ignore[attr-defined]
    except (OSError, ManagerdError):
        return False
    return True


def test_read_only_data_directory_refuses_to_start(tmp_path: Path) -> None:
    _need_mount()
    data = tmp_path / "data"
    _mount_tmpfs(data, "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        d = _durable(tmp_path)
        done = subprocess.run(
            [sys.executable, "-m", "managerd", "serve", "--port", "0", "--data-dir", str(data)],
            env=d.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "data directory" in done.stderr and "Read-only" in done.stderr
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_compaction_keeps_the_directory_small(tmp_path: Path) -> None:
    one_mib = 1024 * 1024
    d = _durable(tmp_path, fsync="interval")
    d.extra_env["MANAGERD_JOURNAL_COMPACT_BYTES"] = str(one_mib)
    d.start()
    try:
        with d.connect() as m:
            q = m.Queue("churn")
            batch = [b"y" * 100] * 1000
            for _ in range(100):  # 100,000 put/get cycles of 100-byte items: ~14 MiB of records
                q.put_many(batch)
                assert len(q.get_many(1000)) == 1000
            q.put_many(list(range(10)))
        data = tmp_path / "data"
        assert wait_until(lambda: _size(data) < 3 * one_mib, timeout_s=15), _size(data)
        assert list(data.glob("snapshot-*.bin")), "no snapshot was written"
        print(f"data directory after 100,000 put/get cycles: {_size(data)} bytes")
        d.kill()
        d.start(port=d.port)
        with d.connect() as m:
            assert m.Queue("churn").get_many(100) == list(range(10))
        with pytest.raises(queue.Empty), d.connect() as m:
            m.Queue("churn").get(timeout=0.1)
    finally:
        d.stop()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _serve_second(d: Daemon, data: Path) -> subprocess.CompletedProcess[str]:
    """A second ``serve`` on ``data`` with no authkey configured (it would write one)."""
    env = {k: v for k, v in d.env().items() if k != "MANAGERD_AUTHKEY"}
    return subprocess.run(
        [sys.executable, "-m", "managerd", "serve", "--port", "0", "--data-dir", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_second_daemon_on_a_data_directory_refuses_and_touches_nothing(tmp_path: Path) -> None:
    """Issue 11 (3): a second daemon exits at once, naming the holder; the first loses nothing."""
    # fsync=always: the puts are on disk when acknowledged, so the sizes below
    # change only if the second daemon writes (with "interval" they grow late).
    d = _durable(tmp_path, fsync="always").start()
    data = tmp_path / "data"
    try:
        with d.connect() as m:
            q = m.Queue("q")
            q.put_many(list(range(50)))
        before = {p.name: p.stat().st_size for p in data.iterdir()}
        assert d.proc is not None
        second = _serve_second(d, data)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert str(data) in lines[0] and f"pid {d.proc.pid}" in lines[0]
        after = {p.name: p.stat().st_size for p in data.iterdir()}
        assert after == before  # no compaction, no authkey, no new journal
        assert not (data / "authkey").exists()
        with d.connect() as m:
            m.Queue("q").put_many(list(range(50, 100)))  # the first keeps its journal
        d.kill()
        d.start(port=d.port)
        with d.connect() as m:
            assert m.Queue("q").get_many(200, block=False) == list(range(100))
    finally:
        d.stop()


def test_a_killed_daemons_lock_never_blocks_a_restart(tmp_path: Path) -> None:
    d = _durable(tmp_path).start()
    try:
        with d.connect() as m:
            m.Queue("q").put(1)
        d.kill()
        lock = tmp_path / "data" / "managerd.lock"
        assert lock.exists()  # the stale file stays; the kernel dropped the flock
        d.start(port=d.port)
        assert d.proc is not None
        assert lock.read_text().strip() == str(d.proc.pid)
        with d.connect() as m:
            assert m.Queue("q").get(timeout=5) == 1
        d.stop()
        d.start(port=d.port)  # and after a clean stop
    finally:
        d.stop()


def test_a_removed_nan_key_stays_removed_after_a_crash(tmp_path: Path) -> None:
    """Found by the dict model: replay unpickles a fresh NaN, which finds no entry."""
    d = _durable(tmp_path, fsync="always").start()
    try:
        with d.connect() as m:
            dct = m.dict("nan-keys")
            dct["kept"] = 1
            dct[(1, float("nan"))] = "tuple"
            dct[float("nan")] = "popped"
            assert dct.popitem()[1] == "popped"  # the NaN key, last in
            assert dct.popitem()[1] == "tuple"  # a key holding a NaN
            dct.setdefault(float("nan"), "stays")
        d.kill()
        d.start(port=d.port)
        with d.connect() as m:
            left = sorted(map(str, m.dict("nan-keys").values()))
        assert left == ["1", "stays"], left
    finally:
        d.stop()


def test_a_crash_before_the_startup_snapshot_loses_nothing(tmp_path: Path) -> None:
    """Found by reading the recovery: the first process's journal ends with a
    reservation that recovery put back at the front; the next process's records
    (taking that item again, acking it) go to a new journal before the startup
    snapshot is on disk. A crash in that window replayed them on top of the old
    reservation: the take popped the *next* item, which was lost. A small disk
    holds the window open (the snapshot does not fit; the journal's records do)."""
    _need_mount()
    data = tmp_path / "data"
    _mount_tmpfs(data, "1m")
    d = _durable(tmp_path, fsync="always")
    big = b"B" * 600_000
    try:
        d.start()
        with d.connect() as m:
            q = m.Queue("window")
            q.put(b"A")
            q.put(big)
            assert q.reserve(timeout=5).value == b"A"  # reserved, never acked
        d.kill()
        d.start(port=d.port)  # its startup snapshot cannot be written
        with d.connect() as m:
            message = m.Queue("window").reserve(timeout=5)
            assert message.value == b"A"  # back at the front after the restart
            message.ack()
        assert wait_until(lambda: "could not write snapshot" in d.log, timeout_s=10)
        d.kill()
        subprocess.run(["mount", "-o", "remount,size=64m", str(data)], check=True)
        d.start(port=d.port)
        with d.connect() as m:
            q = m.Queue("window")
            assert q.get(timeout=5) == big  # not lost
            with pytest.raises(queue.Empty):
                q.get(timeout=0.5)  # and A, acked, does not come back
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)
