"""The etcd store (issue 13): managerd's objects kept in an etcd cluster.

Part of layer 1, the store. May import: ``managerd.store`` (its own layer),
the base modules, ``managerd_client``'s errors, and its third-party
dependencies (``grpcio``, ``aetcd``'s messages; the ``etcd`` extra). Never
``managerd.service``, ``managerd.wire`` or the edge modules.

Layout (keys under a prefix, ``/m/`` by default; shared/ETCD.md):

- ``client.py``: the asyncio etcd v3 client (KV, Txn, leases, watches over
  all endpoints; why this client, in its docstring); ``kv.py``: the typed
  values it takes and returns, and its errors; ``groupcommit.py``: the
  Txns of concurrent calls sent as one Txn (each nested, keeping its own
  outcome).
- ``sessions.py``: a session is a lease kept alive; its keys vanish with it;
  another gateway takes it over by the client's resume token (its hash is
  a key on the lease) while the lease lives (``EtcdStore.resume``).
- ``queues.py``: a FIFO queue (idempotent put, blocking get and reserve
  through a watch, several takes per Txn, reserve/ack/nack, requeue of
  expired and orphaned reservations); ``places.py``: the one line of
  parked calls across gateways (a queue's blocked gets and reserves, a
  pipe end's blocked reads), places in create_revision order.
- ``locks.py``: a lock with fencing tokens (FIFO waiters, etcd's mutex
  recipe) and a re-entrant one; ``sync.py``: Event, Semaphore and
  BoundedSemaphore; ``values.py``: Value and dict; ``watching.py``: the
  wake-up they share (a watch from the revision of the last read).
- ``election.py``: one gateway elected (a key on its lease, etcd's recipe)
  to return expired and orphaned reservations of every queue.
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

**Resuming through another gateway**: a client whose gateway died
reconnects to another with its resume token; that gateway finds the
session's lease (``sessions.py``), renews it, and serves the session with
what it holds: lock keys are on its lease, reservations name its etcd id
(delivery ids are derived from the reservation, ``handles.Deliveries``),
and a lock or semaphore ``acquire`` (a Condition's own too: its lock's) or a
Condition ``wait`` the client asks again (``REISSUE`` of the managerd
dialect, naming the request it first was) keeps its key's place in line
(``EtcdLock.adopt``; the semaphore's and Condition's keys are named by that
request). A Barrier ``wait`` asked again that had arrived is the same party
of its round (each arrival notes its request). A get asked again is handed
what the dead gateway took for that request (``queues.py``).

Every write made for a session's call is checked against the session's key
in its Txn (``client.SESSION_GUARD``): once the lease is gone, nothing
written late for it lands.

A gateway that lives on when a session is taken over from it sees so
through a watch of the token keys and lets go of the session
(``EtcdStore._let_go``).

``snapshot`` is read from etcd when asked (a future); ``would_hand_out``
answers None, the stock dialect's decode check of what ``pop`` would
remove being made where etcd removes it (both in ``store.py``).
"""
