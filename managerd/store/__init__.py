"""Layer 1, the store: what the objects mean and the state they keep.

May import: ``managerd.store`` (its own layer) and the base modules
(``managerd.safepickle``, ``managerd.histogram``), plus ``managerd_client``'s
errors and wire constants. Never ``managerd.service``, ``managerd.wire`` or
the edge modules (server, metrics, settings, cli...), not even under
``TYPE_CHECKING``: what it needs from above is passed in.

``api.py`` (exposed methods and their specs) and ``sessions.py`` (who holds
what) are what the layers above see; ``memory/`` holds the objects.
"""
