"""The in-process contract suite: what every primitive means, for every store (see conftest.py)."""
