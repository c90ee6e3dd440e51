"""etcd's pitfalls (shared/ETCD.md), on a real 3-node cluster.

- A watch that must resume from a revision compaction removed: the member
  serving a blocked get's watch is frozen (SIGSTOP), an item is put and the
  history compacted past it through the other members; the watch, reopened
  elsewhere from its revision, finds it compacted, and the get reads the
  queue again and takes the item (no lost wake-up).
- Values over etcd's request limit (1.5 MiB by default) are refused with a
  clear ValueError through a gateway; items that fit one by one are stored
  however many are put at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import RequestTooLarge
from managerd.store.etcd.queues import EtcdQueue
from managerd_client.errors import RequestTooLarge as ClientRequestTooLarge

from conftest import Daemon
from etcd_support import EtcdCluster, cluster, running_cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


def test_a_blocked_get_whose_watch_history_was_compacted_still_wakes(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as c:  # its own: a member is frozen, watches counted

        async def body() -> None:
            async with EtcdClient(c.endpoints) as etcd:
                getting = asyncio.create_task(EtcdQueue(etcd, "q").get(timeout_s=120))
                while not (serving := await asyncio.to_thread(c.watching)):
                    await asyncio.sleep(0.05)
                [frozen] = serving
                member = c.members[frozen]
                assert member.proc is not None
                os.kill(member.proc.pid, signal.SIGSTOP)
                try:
                    others = [m.endpoint for i, m in enumerate(c.members) if i != frozen]
                    async with EtcdClient(others) as other:
                        await EtcdQueue(other, "q").put(b"x")
                        last = await other.put(b"/other", b"after the item")
                    done = await asyncio.to_thread(
                        c.etcdctl, "compact", str(last.revision), endpoints=others
                    )
                    assert done.returncode == 0, done.stderr
                    # The frozen member never answers; the watch's connection is found
                    # dead (gRPC keep-alive), reopened on another member from its revision,
                    # which is compacted: the queue is read again.
                    assert await getting == b"x"
                finally:
                    os.kill(member.proc.pid, signal.SIGCONT)

        asyncio.run(body())


def test_a_request_over_etcds_limit_is_a_clear_error(cluster: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, "big-client")
            with pytest.raises(RequestTooLarge) as raised:
                await q.put(b"x" * (2 * 1024 * 1024))
            assert isinstance(raised.value, ClientRequestTooLarge)
            assert isinstance(raised.value, ValueError)
            assert "larger than etcd accepts" in str(raised.value)

    asyncio.run(body())


def test_large_values_through_a_gateway(cluster: EtcdCluster, tmp_path: Path) -> None:
    store = "etcd://" + ",".join(cluster.endpoints)
    d = Daemon(tmp_path, args=["--store", store, "--store-prefix", "/big/"]).start()
    try:
        with d.connect() as m:
            q = m.Queue("big")
            with pytest.raises(ValueError, match="larger than etcd accepts"):
                q.put(b"x" * (2 * 1024 * 1024))
            config = m.dict("config")
            with pytest.raises(ValueError, match="larger than etcd accepts"):
                config["blob"] = b"x" * (2 * 1024 * 1024)
            # 40 items of 100 kB: 4 MB in one call, stored in several Txns.
            q.put_many([b"%02d" % i + b"y" * 100_000 for i in range(40)])
            assert q.qsize() == 40
            assert [q.get(timeout=10)[:2] for _ in range(40)] == [b"%02d" % i for i in range(40)]
            config["small"] = 1
            assert config["small"] == 1
    finally:
        d.stop()
