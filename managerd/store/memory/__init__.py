"""The in-memory store (layer 1): ``store.py`` implements ``store/interface.py``
over the objects, their registry and the journal.

May import: ``managerd.store`` and the base modules (``managerd.safepickle``,
``managerd.histogram``). Never a layer above (service, wire, the edge).
"""
