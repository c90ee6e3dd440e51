"""How long a client's calls stop when its etcd gateway is killed: resuming through another.

Starts a 3-node cluster (``tests/etcd_support.py``) and gateway B, then for
each of ``--trials`` rounds: a gateway A, a client connected with
``"A,B"`` holding a lock through A, A killed with SIGKILL, and the time
from the kill until the client's next call (``lock.locked()``) answers
through B in the same session. Prints p50 and max over the trials.

A number to read, not a test (2 shared cores: relative figures)::

    uv run python benchmarks/etcd_resume.py --trials 10
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd_client import connect  # noqa: E402

from conftest import Daemon  # noqa: E402
from etcd_support import running_cluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--session-ttl-s", type=int, default=10)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        store = "etcd://" + ",".join(cluster.endpoints)
        args = ["--store", store, "--store-prefix", "/bench" + secrets.token_hex(3) + "/"]
        args += ["--session-ttl-s", str(options.session_ttl_s)]
        authkey = secrets.token_hex(16).encode()
        b = Daemon(Path(tmp) / "b", args=args)
        b.authkey = authkey
        b.start()
        took_s: list[float] = []
        try:
            for trial in range(options.trials):
                a = Daemon(Path(tmp) / f"a{trial}", args=args)
                a.authkey = authkey
                a.start()
                try:
                    with connect(f"{a.address},{b.address}", authkey=authkey) as m:
                        lock = m.Lock(f"bench-{trial}")
                        assert lock.acquire()
                        session = m.session_id
                        killed = time.perf_counter()
                        a.kill()
                        assert lock.locked()
                        took_s.append(time.perf_counter() - killed)
                        assert m.session_id == session, "the session was not resumed"
                        lock.release()
                finally:
                    a.stop()
        finally:
            b.stop()
    took_ms = sorted(1000 * s for s in took_s)
    print(
        f"gateway kill -> next call answered through another gateway, same session "
        f"({len(took_ms)} trials): p50 {statistics.median(took_ms):.1f} ms, "
        f"max {took_ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
