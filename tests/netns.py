"""Several hosts on one machine: Linux network namespaces joined by a veth pair.

A :class:`TwoHosts` is two namespaces, ``host1`` at ``10.213.0.1/24`` and
``host2`` at ``10.213.0.2/24``, on one link. Its processes are started with
``ip netns exec`` (:meth:`TwoHosts.prefix`, :meth:`TwoHosts.popen`,
:meth:`TwoHosts.run`), since Python 3.11 has no ``os.setns``. The link can be
cut and healed (:meth:`TwoHosts.link_down`, :meth:`TwoHosts.link_up`) to make
a partition.

Names carry the creating process's pid and a random tag, so parallel runs do
not clash; each run uses only addresses inside the namespaces it made, and
:func:`destroy` (or leaving :func:`two_hosts`) deletes them, which also
removes the veth pair. Needs root and ``ip`` (Debian's ``iproute2``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ADDRESS_1 = "10.213.0.1"
ADDRESS_2 = "10.213.0.2"
PREFIX_LEN = 24
IP_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its stderr."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (apt-get install iproute2)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise :class:`NetnsError` with its stderr if it fails."""
    done = subprocess.run(
        ["ip", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT_S,
        check=False,
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class TwoHosts:
    """Two namespaces on one veth link; ``1`` and ``2`` name the hosts."""

    ns1: str
    ns2: str
    veth1: str
    veth2: str
    addr1: str = ADDRESS_1
    addr2: str = ADDRESS_2

    def ns(self, host: int) -> str:
        return {1: self.ns1, 2: self.ns2}[host]

    def veth(self, host: int) -> str:
        return {1: self.veth1, 2: self.veth2}[host]

    def addr(self, host: int) -> str:
        return {1: self.addr1, 2: self.addr2}[host]

    def prefix(self, host: int) -> list[str]:
        """The command prefix that runs a program on ``host``."""
        return ["ip", "netns", "exec", self.ns(host)]

    def popen(self, host: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``cmd`` on ``host`` (keyword arguments go to ``Popen``)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        return subprocess.Popen([*self.prefix(host), *cmd], **kwargs)

    def run(
        self, host: int, cmd: Sequence[str], timeout_s: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on ``host`` to completion, capturing its output."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            [*self.prefix(host), *cmd], text=True, timeout=timeout_s, check=False, **kwargs
        )

    def link_down(self, host: int = 1) -> None:
        """Cut the link at ``host``'s end: a partition (packets are dropped silently)."""
        ip("-n", self.ns(host), "link", "set", self.veth(host), "down")

    def link_up(self, host: int = 1) -> None:
        """Heal what :meth:`link_down` cut."""
        ip("-n", self.ns(host), "link", "set", self.veth(host), "up")


def create() -> TwoHosts:
    """Make the two hosts and their link; undo everything if a step fails."""
    tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"  # 9 chars
    hosts = TwoHosts(
        ns1=f"mdt{tag}h1",
        ns2=f"mdt{tag}h2",
        veth1=f"mdv{tag}a",  # at most 15 characters, as Linux wants
        veth2=f"mdv{tag}b",
    )
    try:
        ip("netns", "add", hosts.ns1)
        ip("netns", "add", hosts.ns2)
        ip("link", "add", hosts.veth1, "type", "veth", "peer", "name", hosts.veth2)
        for n in (1, 2):
            ip("link", "set", hosts.veth(n), "netns", hosts.ns(n))
            cidr = f"{hosts.addr(n)}/{PREFIX_LEN}"
            ip("-n", hosts.ns(n), "addr", "add", cidr, "dev", hosts.veth(n))
            ip("-n", hosts.ns(n), "link", "set", hosts.veth(n), "up")
            ip("-n", hosts.ns(n), "link", "set", "lo", "up")
    except BaseException:
        destroy(hosts)
        raise
    return hosts


def destroy(hosts: TwoHosts) -> None:
    """Delete both namespaces (the veth pair goes with them). Idempotent.

    Stop the processes running inside first: a namespace lives on, unnamed,
    while a process is in it.
    """
    for n in (1, 2):
        ip("netns", "del", hosts.ns(n), check=False)
    # Only left in the root namespace if create() failed before moving it.
    ip("link", "del", hosts.veth1, check=False)


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """:func:`create` on entry, :func:`destroy` on exit."""
    hosts = create()
    try:
        yield hosts
    finally:
        destroy(hosts)


def exists(name: str) -> bool:
    """Whether a namespace of that name exists."""
    return name in ip("netns", "list").stdout.split()
