"""The etcd store (issue 13): managerd's objects kept in an etcd cluster.

Part of layer 1, the store. May import: ``managerd.store`` (its own layer),
the base modules, ``managerd_client``'s errors, and its third-party
dependencies (``grpcio``, ``aetcd``'s messages; the ``etcd`` extra). Never
``managerd.service``, ``managerd.wire`` or the edge modules.

Layout (keys under a prefix, ``/m/`` by default; shared/ETCD.md):

- ``client.py``: the asyncio etcd v3 client (KV, Txn, leases, watches over
  all endpoints; why this client, in its docstring); ``kv.py``: the typed
  values it takes and returns, and its errors.
- ``sessions.py``: a session is a lease kept alive; its keys vanish with it;
  another gateway can resume it by its id while the lease lives.
- ``queues.py``: a FIFO queue (idempotent put, blocking get and reserve
  through a watch, several takes per Txn, reserve/ack/nack, requeue of
  expired and orphaned reservations).
- ``locks.py``: a lock with fencing tokens (FIFO waiters, etcd's mutex
  recipe).

**Not wired into** ``managerd serve``: these are the parts a store stands on,
not yet a ``Store`` (``store/interface.py``). They keep its method names
(``put``, ``get``, ``get_nowait``, ``reserve``, ``ack``, ``nack``, ``qsize``,
``reserved_count``; ``acquire``, ``release``) so that a handle can forward to
them: a handle's exposed method returns a Task of the coroutine as its
parked-call future, maps the stdlib's ``block``/``timeout`` to ``timeout_s``,
``call.session`` to an ``EtcdSession`` and the calling thread to a lock's
``owner``. What a Store on etcd still needs (issue 13): the other
primitives, a registry of names and types in etcd, the gateway's session
table (client heartbeats as keep-alives; a reconnecting client's session
taken over with ``EtcdSession.resume``), the elected
gateway that calls ``requeue_expired``, maxsize, ``put_many``/``get_many``,
``task_done``/``join``, ``extend``, ``max_deliveries`` and dead letters,
stats, and ``--store etcd://``.
"""
