"""A Barrier party and a Condition's acquire blocked through a gateway that dies (issue 13).

Real ``managerd serve --store etcd://...`` gateways on one real 3-node etcd
cluster (``test_etcd_resume.py``'s), the one a blocked call waits through
killed with SIGKILL. The client asks the call again through the other
gateway, where its session resumes: a Barrier party that had arrived is the
same party of the same round (counted once, the round not broken, its
index the one it arrived with); a Condition's acquire is its lock's acquire
asked again (its place in line kept, ahead of a later contender).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from test_etcd_resume import (
    Gateways,
    call,
    gateways,
    in_thread,
    keys_in_etcd,
    new_session,
    two_stores,
    waiters_on,
)

from managerd.store.api import Call
from managerd.store.etcd.store import EtcdStore

from conftest import Daemon, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster", "gateways"]  # the fixtures


def parties_waiting_on(gateway: Daemon, name: str) -> int:
    """A barrier's waiting parties as ``gateway``'s status shows them (its own parked
    calls and the other live gateways' published counts)."""
    with gateway.connect() as m:
        return int(m.status()["objects"].get(name, {}).get("n_waiting", 0))


def test_a_barrier_party_parked_on_a_dead_gateway_stays_a_party_of_its_round(
    gateways: Gateways,
) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    with (
        gateways.client(a, b) as moving,
        gateways.client(b) as other,
        gateways.client(b) as last,
        gateways.client(b) as look,
    ):
        bar = look.Barrier("round", 3)
        first, first_index = in_thread(lambda: moving.Barrier("round", 3).wait(60))
        assert wait_until(lambda: bar.n_waiting == 1, timeout_s=30)
        second, second_index = in_thread(lambda: other.Barrier("round", 3).wait(60))
        assert wait_until(lambda: bar.n_waiting == 2, timeout_s=30)
        session = moving.session_id

        a.kill()

        # Asked again through B, in the same session: two parties wait there.
        assert wait_until(lambda: parties_waiting_on(b, "round") == 2, timeout_s=30), (
            f"waiting on B: {parties_waiting_on(b, 'round')}; moving {first_index}, "
            f"other {second_index}; B's log:\n{b.log[-4000:]}"
        )
        assert moving.session_id == session
        assert bar.n_waiting == 2  # not counted twice
        assert not bar.broken
        assert not first_index and not second_index  # the round waits for its third
        third = last.Barrier("round", 3).wait(60)
        first.join(30)
        second.join(30)
        assert (first_index, second_index, third) == ([0], [1], 2)
        assert not bar.broken
        assert bar.n_waiting == 0


def test_a_condition_acquire_parked_on_a_dead_gateway_keeps_its_place_through_another(
    gateways: Gateways,
) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    with (
        gateways.client(b) as holder,
        gateways.client(a, b) as moving,
        gateways.client(b) as later,
    ):
        held = holder.Condition("cv")
        assert held.acquire()
        token = held.fencing_token
        assert token is not None
        moving_cv, later_cv = moving.Condition("cv"), later.Condition("cv")
        done = {"moving": threading.Event(), "later": threading.Event()}
        order: list[str] = []  # who held the lock, in turn

        def acquire_then_release(cv: Any, who: str) -> tuple[bool, int | None]:
            """Its lock (an RLock: the thread's own), its token, released when told."""
            got = cv.acquire(timeout=60)
            token = cv.fencing_token
            order.append(who)
            done[who].wait(60)
            if got:
                cv.release()
            return got, token

        acquirer, acquired = in_thread(lambda: acquire_then_release(moving_cv, "moving"))
        contenders = b"l/cv.lock/"
        assert wait_until(lambda: keys_in_etcd(gateways, contenders) == 2, timeout_s=30)
        # In line behind the moving client's acquire (parked through A first).
        late, late_got = in_thread(lambda: acquire_then_release(later_cv, "later"))
        assert wait_until(lambda: keys_in_etcd(gateways, contenders) == 3, timeout_s=30)
        session = moving.session_id

        a.kill()

        assert wait_until(lambda: waiters_on(b, "cv.lock") == 2, timeout_s=30), (
            f"waiters on B: {waiters_on(b, 'cv.lock')}; acquired {acquired}; "
            f"B's log:\n{b.log[-4000:]}"
        )
        assert moving.session_id == session
        assert not acquired and not late_got
        held.release()
        # Its place in line was kept: it holds, before the later one.
        assert wait_until(lambda: order == ["moving"], timeout_s=30), order
        assert waiters_on(b, "cv.lock") == 1
        done["moving"].set()
        acquirer.join(30)
        [(got, moved_token)] = acquired
        assert got is True
        assert moved_token is not None and moved_token > token
        done["later"].set()
        late.join(30)
        [(late_ok, later_token)] = late_got
        assert late_ok is True
        assert later_token is not None and later_token > moved_token
        assert order == ["moving", "later"]
        assert held.acquire(blocking=False)  # let go by both, whole
        held.release()


def test_a_barrier_party_let_go_by_a_gateway_that_lives_is_the_wait_asked_again(
    cluster: EtcdCluster,
) -> None:
    """In process: B takes the session over while its party waits through A; A drops
    the wait without breaking the barrier or leaving the count; asked again through B
    (naming the request it first was), it is that party, with its index."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("moving"), new_session("other")
        loop = asyncio.get_running_loop()
        bar = a.get_or_create("Barrier", "round", {"parties": 2})
        first = bar.methods["wait"].fn(bar, Call(s, 5, loop, 41), 60)
        bar_b = b.get_or_create("Barrier", "round", {"parties": 2})
        while await call(bar_b, other, "state") != (2, 1, False):
            await asyncio.sleep(0.01)  # until it arrived

        moved = await b.resume(s.resume_token)
        assert moved is not None
        await asyncio.wait([first], timeout=30)
        assert first.cancelled()  # dropped on A once it saw the takeover
        await asyncio.sleep(0.2)  # what A does after the drop, if anything, is done
        assert await call(bar_b, other, "state") == (2, 1, False)  # still its party
        moved.reissuing = (5, "round", "wait", 41)
        again = bar_b.methods["wait"].fn(bar_b, Call(moved, 5, loop, 97), 60)
        moved.reissuing = None
        await asyncio.wait([again], timeout=0.5)
        assert not again.done()  # not counted twice: the round still waits
        assert await call(bar_b, other, "wait", 60) == 1
        assert await again == 0
        assert await call(bar_b, other, "state") == (2, 0, False)

    two_stores(cluster, body)
