"""What the daemon asks of the operating system at start.

More file descriptors (the soft limit raised toward the hard one), and an
allocator that keeps freed memory (glibc ``mallopt``).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import resource

log = logging.getLogger("managerd")


# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1


_M_MMAP_THRESHOLD = -3


_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # HEAP_MAX/2 on 64-bit: larger values are refused


def raise_file_limit(max_connections: int) -> None:
    """Let the process hold ``max_connections`` sockets, if the hard limit allows.

    The usual soft limit of 1,024 descriptors would refuse clients long
    before ``max_connections``; each connection takes one (two while a parked
    waiter's peer is being probed).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections * 2 + 64
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", want, exc)
            return
        soft = want
    if soft < max_connections + 64:
        log.warning(
            "open-file limit %d is below max_connections %d: raise it (ulimit -n)",
            soft, max_connections,
        )  # fmt: skip


def retain_freed_memory(retain_bytes: int) -> None:
    """Let glibc keep up to ``retain_bytes`` of freed memory for reuse.

    By default glibc serves a large allocation (a 1 MB frame, its payload,
    the reply) with mmap, or trims the heap once 2x its threshold is free,
    so every large request faults its pages in afresh: ~780 page faults
    per 1 MB put+get, most of the time that pair takes (BENCHMARKS.md).
    Allocations under half of ``retain_bytes`` now come from the heap, and
    the heap is trimmed only above ``retain_bytes``: the daemon's resident
    memory may stay that much above what it holds. 0 leaves glibc alone;
    other C libraries are left alone.
    """
    if not retain_bytes or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, min(retain_bytes // 2, _MMAP_THRESHOLD_MAX))
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, retain_bytes)
    except (OSError, AttributeError):
        ok = 0
    if not ok:
        log.warning("could not tune the allocator (mallopt); large requests will be slower")
