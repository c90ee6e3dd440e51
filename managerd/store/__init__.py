"""Layer 1, the store: what the objects mean and the state they keep.

May import: ``managerd.store`` (its own layer) and the base modules
(``managerd.safepickle``, ``managerd.histogram``), plus ``managerd_client``'s
errors and wire constants. Never ``managerd.service``, ``managerd.wire`` or
the edge modules (server, metrics, settings, cli...), not even under
``TYPE_CHECKING``: what it needs from above is passed in.

What the layers above see: ``interface.py`` (the ``Store`` protocol and
its handles), ``stats.py`` (the snapshots status and metrics read),
``api.py`` (exposed methods and their specs) and ``sessions.py`` (who holds
what). ``memory/`` is the first store; only the edge (``server.py``, which
builds it) imports it.
"""
