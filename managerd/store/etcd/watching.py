"""Waiting for a change in etcd: the one wake-up every blocking primitive uses.

A blocking call reads the state, and if it must wait, watches from the
revision of that read + 1: a change between the read and the watch is
delivered by the watch (etcd replays history from that revision), so no
wake-up is missed and nothing polls. The caller then reads again: a wake-up
says only that something changed.
"""

from __future__ import annotations

import contextlib

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import Compacted, Event, EventType


async def changed(
    client: EtcdClient,
    key: bytes,
    range_end: bytes = b"",
    *,
    after_revision: int,
    kind: EventType | None = None,
) -> list[Event]:
    """The first events on ``[key, range_end)`` after ``after_revision`` (of ``kind`` if
    given); ``[]`` if that history was compacted (the caller reads the state again)."""
    try:
        async with contextlib.aclosing(
            client.watch(key, range_end, start_revision=after_revision + 1)
        ) as events:
            async for batch in events:
                wanted = [e for e in batch if kind is None or e.type is kind]
                if wanted:
                    return wanted
    except Compacted:
        return []
    raise AssertionError("a watch ended without an error")  # the client's watch never ends
