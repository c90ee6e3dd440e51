"""What ``managerd status`` shows: the daemon's objects and sessions as tables.

The daemon answers a ``status`` request with every object's description
(depths, holders, waiters) and every session; rates come from two such
answers ``interval_s`` apart. Rendering is plain text, so the output can be
pasted into an issue; ``--json`` gives the same data to scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUEUE_TYPES = ("Queue", "JoinableQueue")
LOCK_TYPES = ("Lock", "RLock", "Semaphore", "BoundedSemaphore")


def _rate(new: dict[str, Any], old: dict[str, Any], key: str, interval_s: float) -> float:
    return round(float(new.get(key, 0) - old.get(key, 0)) / interval_s, 1)


def summarize(before: dict[str, Any], after: dict[str, Any], interval_s: float) -> dict[str, Any]:
    """Tables as data: queues with rates, locks with holders, sessions."""
    queues = []
    for name, obj in sorted(after["objects"].items()):
        if obj["type"] not in QUEUE_TYPES:
            continue
        old = before["objects"].get(name, obj)
        queues.append(
            {
                "name": name,
                "type": obj["type"],
                "depth": obj["depth"],
                "reserved": obj["reserved"],
                "waiters": obj["waiters"],
                "puts_per_s": _rate(obj, old, "puts_total", interval_s),
                "gets_per_s": _rate(obj, old, "gets_total", interval_s),
            }
        )
    locks = []
    for name, obj in sorted(after["objects"].items()):
        if obj["type"] not in LOCK_TYPES:
            continue
        if obj["type"] in ("Lock", "RLock"):
            holder = obj.get("holder")
            holders = [holder] if holder else []
        else:
            holders = obj.get("holders", [])
        locks.append(
            {
                "name": name,
                "type": obj["type"],
                "holders": [
                    {"host": h.get("host"), "pid": h.get("pid"), "peer": h.get("peer")}
                    for h in holders
                ],
                "held_for_s": obj.get("held_for_s"),
                "available": obj.get("value"),
                "waiters": obj["waiters"],
                "token": obj.get("token"),
            }
        )
    sessions = [
        {k: s.get(k) for k in ("id", "kind", "peer", "host", "pid", "age_s", "waiting")}
        for s in after["sessions"]
    ]
    return {
        "uptime_s": after["uptime_s"],
        "objects": len(after["objects"]),
        "queues": queues,
        "locks": locks,
        "sessions": sessions,
        "handshakes_pending": after.get("handshakes_pending", 0),
        "penalized": [
            {"address": address, "refused_for_s": left}
            for address, left in sorted(after.get("penalized", {}).items())
        ],
    }


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [f"{title} ({len(rows)})"]
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(summary: dict[str, Any]) -> str:
    parts = [f"managerd up {summary['uptime_s']:.0f}s, {summary['objects']} objects"]
    parts.append(
        _table(
            "queues",
            ["name", "type", "depth", "reserved", "waiters", "put/s", "get/s"],
            [
                [
                    q["name"],
                    q["type"],
                    q["depth"],
                    q["reserved"],
                    q["waiters"],
                    q["puts_per_s"],
                    q["gets_per_s"],
                ]
                for q in summary["queues"]
            ],
        )
    )
    parts.append(
        _table(
            "locks and semaphores",
            ["name", "type", "holders (host:pid)", "held for s", "available", "waiters", "token"],
            [
                [
                    lk["name"],
                    lk["type"],
                    ", ".join(f"{h['host']}:{h['pid']}" for h in lk["holders"]) or None,
                    lk["held_for_s"],
                    lk["available"],
                    lk["waiters"],
                    lk["token"],
                ]
                for lk in summary["locks"]
            ],
        )
    )
    parts.append(
        _table(
            "sessions",
            ["id", "kind", "peer", "host:pid", "age s", "waiting"],
            [
                [
                    s["id"],
                    s["kind"],
                    s["peer"],
                    f"{s['host']}:{s['pid']}" if s["host"] else None,
                    s["age_s"],
                    s["waiting"],
                ]
                for s in summary["sessions"]
            ],
        )
    )
    if summary["penalized"]:
        parts.append(
            _table(
                "addresses refused for failed handshakes",
                ["address", "refused for s"],
                [[p["address"], p["refused_for_s"]] for p in summary["penalized"]],
            )
        )
    parts.append(f"handshakes pending: {summary['handshakes_pending']}")
    return "\n\n".join(parts)
