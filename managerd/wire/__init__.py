"""Layer 3, the wire: bytes <-> calls (the connection, the managerd and stock dialects).

May import: ``managerd.wire`` (its own layer), ``managerd.service``,
``managerd.store`` and the base modules. Never the edge modules (server,
metrics, settings, cli...), not even under ``TYPE_CHECKING``: what a
connection needs of the daemon is the ``ConnectionContext`` protocol, and
the server passes itself in. Never ``managerd.store.memory`` either: the
store is what ``store/interface.py`` says.
"""
