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
  recipe) and a re-entrant one; ``sync.py``: Event, Semaphore and
  BoundedSemaphore; ``values.py``: Value and dict; ``watching.py``: the
  wake-up they share (a watch from the revision of the last read).
- ``store.py``: ``EtcdStore``, the ``Store`` of ``store/interface.py``:
  names and types in etcd (a mirror kept by a watch), a lease per session,
  calls as futures; ``handles.py``: a handle class per type served, whose
  exposed methods forward to the primitives.
- ``conditions.py``: Condition and Barrier; ``pipes.py``: Pipe; ``cells.py``:
  list, Namespace and Array (one key by compare-and-set, the memory store's
  own objects applied to it).
- ``stats.py``: the cluster's figures of every object, read from etcd by a
  periodic refresh (``status``, the page, the metrics of any gateway);
  ``deadlocks.py``: the wait-for graph across gateways, read from etcd.

``managerd serve --store etcd://...`` (``server.py``) serves an
``EtcdStore``: the daemon is then a gateway.

The contract suite (``tests/contract``) runs against this store as against
the memory store; what still differs is in each handle's docstring.

**Not yet** (issue 13): ``snapshot`` and ``would_hand_out`` (why, in
``store.py``); resuming a session through another gateway; one elected
gateway for requeues (every gateway requeues its queues); group commit
across calls of a gateway (the queue batches its blocked takes only); TLS
to etcd.
"""
