"""What ``managerd ls`` and ``get`` print: objects and contents as plain data.

Values that managerd clients store are their pickles, opaque to the daemon.
Here they are decoded with the restricted decoder (builtin data types only,
never the allow-list: the CLI imports nothing it reads), and anything it
will not read is shown as its class and size, e.g. ``<mytypes.Point pickle,
57 bytes>``. Nothing here executes a stored pickle.
"""

from __future__ import annotations

import fnmatch
import pickletools
from typing import Any

from managerd.safepickle import SafeDecoder

_DECODER = SafeDecoder()


def _first_class(payload: bytes) -> str | None:
    """The first class a pickle names (without running it), if any."""
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(payload):
            if op.name == "GLOBAL" and isinstance(arg, str):
                return arg.replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:
        return None
    return None


def shown(payload: Any) -> Any:
    """A stored payload as builtin data, or ``<class pickle, N bytes>``."""
    if not isinstance(payload, (bytes, bytearray)):
        return payload
    data = bytes(payload)
    try:
        return _DECODER.loads(data)
    except Exception:
        what = _first_class(data) or "opaque"
        return f"<{what} pickle, {len(data)} bytes>"


def contents(peeked: dict[str, Any]) -> Any:
    """What ``managerd get`` prints for one ``Manager.peek`` answer."""
    kind = peeked["kind"]
    if kind == "mapping":
        items = {_key(k): shown(v) for k, v in peeked["items"]}
        return _truncated(items, peeked["total"], len(items))
    if kind == "sequence":
        values = [shown(v) for v in peeked["items"]]
        return _truncated(values, peeked["total"], len(values))
    if kind == "plain":
        value = peeked["value"]
        return value.decode("latin-1") if isinstance(value, bytes) else value
    return {k: v for k, v in peeked["describe"].items() if k not in ("type", "args")}


def _key(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool)) or key is None else repr(key)


def _truncated(value: Any, total: int, shown_n: int) -> Any:
    if total <= shown_n:
        return value
    return {"first": value, "shown": shown_n, "total": total}


def matching(objects: list[tuple[str, str]], pattern: str | None) -> list[tuple[str, str]]:
    """Objects whose name matches a shell pattern (``jobs*``), or contains it."""
    if not pattern:
        return objects
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [(n, t) for n, t in objects if fnmatch.fnmatchcase(n, pattern)]
