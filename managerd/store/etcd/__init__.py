"""The etcd store (issue 13): managerd's objects kept in an etcd cluster.

Part of layer 1, the store. May import: ``managerd.store`` (its own layer),
the base modules, ``managerd_client``'s errors, and its third-party
dependencies (``grpcio``, ``aetcd``'s messages; the ``etcd`` extra). Never
``managerd.service``, ``managerd.wire`` or the edge modules.

Layout (keys under a prefix, ``/m/`` by default; shared/ETCD.md):

- ``client.py``: the asyncio etcd v3 client (KV, Txn, leases, watches over
  all endpoints; why this client, in its docstring); ``kv.py``: the typed
  values it takes and returns, and its errors.
- ``sessions.py``: a session is a lease kept alive; its keys vanish with it.
- ``queues.py``: a FIFO queue (idempotent put, blocking get through a
  watch, reserve/ack/nack).
- ``locks.py``: a lock with fencing tokens (FIFO waiters, etcd's mutex
  recipe).

Not wired into ``managerd serve`` yet: the store interface is not
implemented in full (see issue 13).
"""
