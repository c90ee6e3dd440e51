"""managerd: named multiprocessing primitives served across hosts.

The daemon package. Clients use the ``managerd_client`` distribution.
"""

__version__ = "0.1.0"
