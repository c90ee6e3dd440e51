"""Layer 2, the service: the sessions table, admission, invoking methods and answering.

May import: ``managerd.service`` (its own layer), ``managerd.store`` and the
base modules (``managerd.safepickle``, ``managerd.histogram``). Never
``managerd.wire`` or the edge modules (server, metrics, settings, cli...),
not even under ``TYPE_CHECKING``, and never ``managerd.store.memory``: the
store is what ``store/interface.py`` says, passed in by the server.
"""
