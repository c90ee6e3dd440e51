"""Layer 2, the service: the sessions table, admission, invoking methods and answering.

May import: ``managerd.service`` (its own layer), ``managerd.store`` and the
base modules (``managerd.safepickle``, ``managerd.histogram``). Never
``managerd.wire`` or the edge modules (server, metrics, settings, cli...),
not even under ``TYPE_CHECKING``. ``store.memory`` is for the store's own
use: the few places that still reach into it are listed in
``tests/test_imports.py`` (``ALLOWED``).
"""
