"""The status document: what ``managerd status``, ``/status.json`` and the web page show.

The daemon answers a ``status`` request with every object's description
(depths, holders, waiters), every session and its own settings; rates come
from two such answers ``interval_s`` apart. :func:`summarize` turns the two
into one JSON document, with a table per family of objects, which
``managerd status --json`` prints, ``GET /status.json`` serves and the web
page renders. :func:`render` draws the same document as plain text, so the
output can be pasted into an issue. Payload contents never appear: only
sizes and counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUEUE_TYPES = ("Queue", "JoinableQueue")
LOCK_TYPES = ("Lock", "RLock", "Semaphore", "BoundedSemaphore")
SYNC_TYPES = ("Event", "Condition", "Barrier")
DATA_TYPES = ("dict", "list", "Namespace", "Value", "Array")
PIPE_TYPES = ("Pipe",)

#: The document's tables, in the order the page and the text show them.
SECTIONS = ("queues", "locks", "sync", "data", "pipes", "sessions")


def _rate(new: dict[str, Any], old: dict[str, Any], key: str, interval_s: float) -> float:
    return round(float(new.get(key, 0) - old.get(key, 0)) / interval_s, 1)


def _plain(value: Any) -> Any:
    """A Value's number as JSON can carry it (a 'c' Value holds one byte)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def _holder(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "session": h.get("id"),
        "host": h.get("host"),
        "pid": h.get("pid"),
        "thread": h.get("thread"),
        "peer": h.get("peer"),
        "permits": h.get("permits"),
    }


def _queue(
    name: str, obj: dict[str, Any], old: dict[str, Any], interval_s: float
) -> dict[str, Any]:
    return {
        "name": name,
        "type": obj["type"],
        "depth": obj["depth"],
        "reserved": obj["reserved"],
        "waiters": obj["waiters"],
        "puts_per_s": _rate(obj, old, "puts_total", interval_s),
        "gets_per_s": _rate(obj, old, "gets_total", interval_s),
    }


def _lock(name: str, obj: dict[str, Any]) -> dict[str, Any]:
    if obj["type"] in ("Lock", "RLock"):
        holder = obj.get("holder")
        holders = [holder] if holder else []
    else:
        holders = obj.get("holders", [])
    return {
        "name": name,
        "type": obj["type"],
        "holders": [_holder(h) for h in holders],
        "held_for_s": obj.get("held_for_s"),
        "available": obj.get("value"),
        "waiters": obj["waiters"],
        "waiting": obj.get("waiting", []),
        "token": obj.get("token"),
    }


def _sync(name: str, obj: dict[str, Any]) -> dict[str, Any]:
    typeid = obj["type"]
    args = obj.get("args", {})
    if typeid == "Event":
        state = "set" if obj.get("set") else "clear"
        waiters = obj.get("waiters", 0)
    elif typeid == "Barrier":
        waiters = obj.get("n_waiting", 0)
        parties = args.get("parties")
        state = "broken" if obj.get("broken") else f"{waiters}/{parties} arrived"
    else:
        state = f"lock {args.get('lock')}"
        waiters = obj.get("waiters", 0)
    return {"name": name, "type": typeid, "state": state, "waiters": waiters}


def _data(name: str, obj: dict[str, Any]) -> dict[str, Any]:
    typeid = obj["type"]
    row: dict[str, Any] = {"name": name, "type": typeid, "size": obj.get("len")}
    if typeid == "Value":
        row["size"] = 1
        row["value"] = _plain(obj.get("value"))  # a number, not a payload
    return row


def _pipe(name: str, obj: dict[str, Any]) -> dict[str, Any]:
    buffered = obj.get("buffered", [0, 0])
    return {
        "name": name,
        "type": obj["type"],
        "buffered": sum(buffered),
        "buffered_by_end": buffered,
        "closed": obj.get("closed", [False, False]),
        "waiters": obj.get("waiters", 0),
    }


def summarize(before: dict[str, Any], after: dict[str, Any], interval_s: float) -> dict[str, Any]:
    """The status document: one table per family of objects, sessions, the daemon."""
    interval_s = max(interval_s, 1e-3)
    tables: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    other: list[dict[str, Any]] = []
    old_objects = before.get("objects", {})
    for name, obj in sorted(after["objects"].items()):
        typeid = obj["type"]
        if typeid in QUEUE_TYPES:
            tables["queues"].append(_queue(name, obj, old_objects.get(name, obj), interval_s))
        elif typeid in LOCK_TYPES:
            tables["locks"].append(_lock(name, obj))
        elif typeid in SYNC_TYPES:
            tables["sync"].append(_sync(name, obj))
        elif typeid in DATA_TYPES:
            tables["data"].append(_data(name, obj))
        elif typeid in PIPE_TYPES:
            tables["pipes"].append(_pipe(name, obj))
        else:  # a type this renderer does not know yet still shows up
            other.append({"name": name, "type": typeid})
    tables["sessions"] = [
        {
            **{k: s.get(k) for k in ("id", "kind", "peer", "host", "pid", "age_s", "waiting")},
            "holds": s.get("holds", []),
            "waits_for": s.get("waits_for", []),
        }
        for s in after["sessions"]
    ]
    by_type: dict[str, int] = {}
    for obj in after["objects"].values():
        by_type[obj["type"]] = by_type.get(obj["type"], 0) + 1
    return {
        "version": after.get("version"),
        "uptime_s": after["uptime_s"],
        "settings": after.get("settings", {}),
        "objects": len(after["objects"]),
        "objects_by_type": dict(sorted(by_type.items())),
        **tables,
        "other": other,
        "deadlocks": after.get("deadlocks", []),
        "deadlocks_total": after.get("deadlocks_total", 0),
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


def holder_text(h: dict[str, Any]) -> str:
    """``host:pid:thread`` (or the peer address of a stock client)."""
    if h.get("host") is None:
        return str(h.get("peer"))
    where = f"{h['host']}:{h['pid']}"
    return f"{where}:{h['thread']}" if h.get("thread") else where


def render(summary: dict[str, Any]) -> str:
    settings = summary.get("settings") or {}
    head = f"managerd {summary.get('version') or ''} up {summary['uptime_s']:.0f}s, "
    head += f"{summary['objects']} objects"
    if settings:
        head += " (" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"
    parts = [head]
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
            [
                "name",
                "type",
                "holders (host:pid:thread)",
                "held for s",
                "available",
                "waiters",
                "token",
            ],
            [
                [
                    lk["name"],
                    lk["type"],
                    ", ".join(holder_text(h) for h in lk["holders"]) or None,
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
            "events, conditions and barriers",
            ["name", "type", "state", "waiters"],
            [[o["name"], o["type"], o["state"], o["waiters"]] for o in summary["sync"]],
        )
    )
    parts.append(
        _table(
            "dicts, lists, namespaces, values and arrays",
            ["name", "type", "size", "value"],
            [[o["name"], o["type"], o["size"], o.get("value")] for o in summary["data"]],
        )
    )
    parts.append(
        _table(
            "pipes",
            ["name", "buffered", "closed ends", "waiters"],
            [
                [p["name"], p["buffered"], sum(1 for c in p["closed"] if c), p["waiters"]]
                for p in summary["pipes"]
            ],
        )
    )
    parts.append(
        _table(
            "sessions",
            ["id", "kind", "peer", "host:pid", "age s", "holds", "waits for"],
            [
                [
                    s["id"],
                    s["kind"],
                    s["peer"],
                    f"{s['host']}:{s['pid']}" if s["host"] else None,
                    s["age_s"],
                    ", ".join(s["holds"]) or None,
                    ", ".join(s["waits_for"]) or None,
                ]
                for s in summary["sessions"]
            ],
        )
    )
    if summary.get("deadlocks"):
        parts.append("deadlocks:\n" + "\n".join(f"  {c['text']}" for c in summary["deadlocks"]))
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
