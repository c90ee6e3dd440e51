"""The in-memory objects (layer 1, part of the store), their registry and journal.

May import: ``managerd.store`` and the base modules (``managerd.safepickle``,
``managerd.histogram``). Never a layer above (service, wire, the edge).
"""
