"""Layer 3, the wire: bytes <-> calls (the connection, the managerd and stock dialects).

May import: ``managerd.wire`` (its own layer), ``managerd.service``,
``managerd.store`` and the base modules. Never the edge modules (server,
metrics, settings, cli...), not even under ``TYPE_CHECKING``: what a
connection needs of the daemon is the ``ConnectionContext`` protocol, and
the server passes itself in. ``store.memory`` is for the store's own use:
the few places that still reach into it are listed in
``tests/test_imports.py`` (``ALLOWED``).
"""
