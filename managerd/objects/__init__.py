"""The objects the daemon serves, one module per family.

``queues`` (Queue, JoinableQueue, Pipe), ``mappings`` (dict, list,
Namespace, Value, Array), ``locks`` (Lock, RLock, Semaphore,
BoundedSemaphore) and ``sync`` (Event, Condition, Barrier). The one table of
served types is ``managerd.registry.TYPES``.
"""
