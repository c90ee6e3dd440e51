#!/bin/sh
# Run docker-compose.etcd.yml's topology as real containers with podman:
#
#   sudo sh scripts/podman_etcd_check.sh
#
# podman here has no compose, so this script starts what the compose file
# describes, with its own settings: three etcd members from its ETCD_*
# environment and its `etcdctl endpoint health` health check; two gateways
# with its command (`serve --store etcd://...`), MANAGERD_AUTHKEY_FILE and the
# authkey as a secret file (uid 10001, mode 0400), and its /readyz health
# check. All on the host network, so each member and gateway gets ports of its
# own (the compose file's 2379/2380/2381 and 50000/9120 would collide), and
# the members and the gateways name each other by 127.0.0.1:port instead of
# etcd1:2379. Prometheus, Grafana and the example workers are not started
# (nothing here checks them; the checks below are made by a client on the host).
#
#   1. the etcd image: the compose file's quay.io/coreos/etcd:v3.5.17 cannot
#      be pulled (no registry reachable), so deploy/etcd.Containerfile installs
#      Debian bookworm's etcd-server and etcd-client (3.4.23, which reads the
#      same ETCD_* variables) on the local base image, as
#      localhost/managerd-etcd:check;
#   2. managerd's image from deploy/Dockerfile of this tree, as
#      scripts/podman_check.sh builds it (the base image must exist: run
#      podman_check.sh once first);
#   3. the members until `etcdctl endpoint health` passes in each, then the
#      gateways until each one's /readyz health check passes;
#   4. with managerd_client on the host, connect("G1,G2"): an object made
#      through gateway 1 is the same through gateway 2; a consumer blocked on
#      gateway 1 is woken by a put through gateway 2; a client holding a Lock
#      through gateway 1 goes on through gateway 2 after `podman kill` of
#      gateway 1 (same fencing token, its release succeeds, no LockLost) and
#      an item queued before the kill is still there; after `podman kill` of
#      the etcd leader, puts and gets still work through gateway 2.
#
# No restart policy (compose's unless-stopped): a killed container stays
# dead for the rest of the run. Needs root, podman and runc. Exits non-zero on
# the first failure; removes its containers, secret and volumes (the images
# stay).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
work=${PODMAN_ETCD_CHECK_DIR:-/tmp/managerd-podman-etcd}
# Member i: client base+i, peer base+10+i, metrics base+20+i; gateway j:
# managerd base+30+j, metrics (/readyz) base+40+j.
base_port=${PODMAN_ETCD_CHECK_PORT_BASE:-52400}
run_flags="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
base=localhost/managerd-base:bookworm
etcd_image=localhost/managerd-etcd:check
managerd_image=localhost/managerd:check
compose="$here/docker-compose.etcd.yml"
members="etcd1 etcd2 etcd3"
gateways="gateway1 gateway2"
started=$(date +%s)

say() { echo "podman_etcd_check: $*"; }
fail() { say "FAILED: $*"; exit 1; }

cleanup() {
    for c in $members $gateways; do
        # Each container's log stays in $work for a look after the run.
        podman logs "mdcheck-$c" >"$work/$c.log" 2>&1 || true
        podman rm -f -v "mdcheck-$c" >/dev/null 2>&1 || true
        podman volume rm "mdcheck-$c-data" >/dev/null 2>&1 || true
    done
    podman secret rm mdcheck_managerd_authkey >/dev/null 2>&1 || true
}
mkdir -p "$work"
trap cleanup EXIT
cleanup

podman image exists "$base" \
    || fail "no $base: run scripts/podman_check.sh first (it imports the base image)"

# One value of the compose file's shared etcd environment (x-etcd-environment).
compose_env() {
    v=$(sed -n "s/^  $1: *//p" "$compose" | head -n 1 | tr -d '"')
    [ -n "$v" ] || fail "$1 is not in $compose"
    echo "$v"
}

cd "$here"
# -- 1, 2: the images ------------------------------------------------------------------
# shellcheck disable=SC2086
podman build $run_flags --format docker --build-arg BASE_IMAGE="$base" \
    -f deploy/etcd.Containerfile -t "$etcd_image" deploy >"$work/etcd-build.log" 2>&1 \
    || { tail -20 "$work/etcd-build.log"; fail "building $etcd_image"; }
# shellcheck disable=SC2086
say "built $etcd_image ($(podman run --rm $run_flags --entrypoint etcd "$etcd_image" --version | sed -n 1p))"
# shellcheck disable=SC2086
podman build $run_flags --format docker --build-arg PYTHON_IMAGE="$base" \
    -f deploy/Dockerfile -t "$managerd_image" . >"$work/managerd-build.log" 2>&1 \
    || { tail -20 "$work/managerd-build.log"; fail "building $managerd_image"; }
say "built $managerd_image from deploy/Dockerfile"

# -- 3: the etcd members -----------------------------------------------------------------
client_port() { echo $((base_port + $1)); }
peer_port() { echo $((base_port + 10 + $1)); }
metrics_port() { echo $((base_port + 20 + $1)); }
gateway_port() { echo $((base_port + 30 + $1)); }
readyz_port() { echo $((base_port + 40 + $1)); }

cluster="etcd1=http://127.0.0.1:$(peer_port 1),etcd2=http://127.0.0.1:$(peer_port 2),etcd3=http://127.0.0.1:$(peer_port 3)"
endpoints="127.0.0.1:$(client_port 1),127.0.0.1:$(client_port 2),127.0.0.1:$(client_port 3)"
for i in 1 2 3; do
    # The compose file's environment; only the URLs move to this member's ports.
    # ETCDCTL_ENDPOINTS points its health check (`etcdctl endpoint health`,
    # which dials 127.0.0.1:2379 by default) at this member's client port.
    # shellcheck disable=SC2086
    podman run -d --name "mdcheck-etcd$i" $run_flags --network host \
        -v "mdcheck-etcd$i-data:/etcd-data" \
        -e ETCD_NAME="etcd$i" \
        -e ETCD_DATA_DIR="$(compose_env ETCD_DATA_DIR)" \
        -e ETCD_LISTEN_CLIENT_URLS="http://127.0.0.1:$(client_port $i)" \
        -e ETCD_ADVERTISE_CLIENT_URLS="http://127.0.0.1:$(client_port $i)" \
        -e ETCD_LISTEN_PEER_URLS="http://127.0.0.1:$(peer_port $i)" \
        -e ETCD_INITIAL_ADVERTISE_PEER_URLS="http://127.0.0.1:$(peer_port $i)" \
        -e ETCD_LISTEN_METRICS_URLS="http://127.0.0.1:$(metrics_port $i)" \
        -e ETCD_INITIAL_CLUSTER="$cluster" \
        -e ETCD_INITIAL_CLUSTER_STATE="$(compose_env ETCD_INITIAL_CLUSTER_STATE)" \
        -e ETCD_INITIAL_CLUSTER_TOKEN="$(compose_env ETCD_INITIAL_CLUSTER_TOKEN)" \
        -e ETCD_AUTO_COMPACTION_MODE="$(compose_env ETCD_AUTO_COMPACTION_MODE)" \
        -e ETCD_AUTO_COMPACTION_RETENTION="$(compose_env ETCD_AUTO_COMPACTION_RETENTION)" \
        -e ETCD_QUOTA_BACKEND_BYTES="$(compose_env ETCD_QUOTA_BACKEND_BYTES)" \
        -e ETCD_LOGGER="$(compose_env ETCD_LOGGER)" \
        -e ETCDCTL_ENDPOINTS="127.0.0.1:$(client_port $i)" \
        --health-cmd '["etcdctl", "endpoint", "health"]' \
        --health-interval 5s --health-timeout 3s --health-retries 5 --health-start-period 10s \
        "$etcd_image" >/dev/null 2>"$work/run.err" || { cat "$work/run.err"; fail "starting etcd$i"; }
done

# `podman healthcheck run` until it passes: podman schedules health checks
# with systemd timers, and this host has no systemd (podman run's complaint
# about that goes to $work/run.err, not to the output).
wait_healthy() {
    tries=0
    until podman healthcheck run "mdcheck-$1" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -lt "$2" ] || { podman logs --tail 30 "mdcheck-$1"; fail "$1 never healthy"; }
        sleep 1
    done
}
t0=$(date +%s)
for i in 1 2 3; do wait_healthy "etcd$i" 60; done
say "etcd1..3 healthy (etcdctl endpoint health in each) after $(($(date +%s) - t0)) s"
for i in 1 2 3; do
    curl -fsS -o "$work/etcd$i.metrics" "http://127.0.0.1:$(metrics_port $i)/metrics"
    grep -q '^etcd_server_has_leader 1' "$work/etcd$i.metrics" \
        || fail "etcd$i's metrics port does not serve etcd_server_has_leader 1"
done
say "etcd1..3 serve /metrics on their metrics ports (ETCD_LISTEN_METRICS_URLS)"
for i in 1 2 3; do
    # etcd warns of an ETCD_* variable it does not know and goes on without it.
    if podman logs "mdcheck-etcd$i" 2>&1 | grep -i 'unrecognized environment variable'; then
        fail "etcd$i ignores a variable of the compose file's environment"
    fi
done
say "etcd1..3 took every ETCD_* variable (none unrecognized)"

# -- 3: the gateways -------------------------------------------------------------------
# The compose secret: a file at /run/secrets/managerd_authkey, owned by the
# images' user 10001, mode 0400.
(umask 077; python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$work/authkey")
podman secret create mdcheck_managerd_authkey "$work/authkey" >/dev/null
for j in 1 2; do
    # shellcheck disable=SC2086
    podman run -d --name "mdcheck-gateway$j" $run_flags --network host \
        --secret "mdcheck_managerd_authkey,target=managerd_authkey,uid=10001,gid=10001,mode=0400" \
        -e MANAGERD_AUTHKEY_FILE=/run/secrets/managerd_authkey \
        -e MANAGERD_HOST=127.0.0.1 -e MANAGERD_PORT="$(gateway_port $j)" \
        -e MANAGERD_METRICS_PORT="$(readyz_port $j)" \
        --health-cmd "[\"python\", \"-c\", \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:$(readyz_port $j)/readyz', timeout=3)\"]" \
        --health-interval 10s --health-timeout 5s --health-retries 3 --health-start-period 15s \
        "$managerd_image" serve --store "etcd://$endpoints" >/dev/null 2>"$work/run.err" \
        || { cat "$work/run.err"; fail "starting gateway$j"; }
done
t0=$(date +%s)
for j in 1 2; do wait_healthy "gateway$j" 60; done
for j in 1 2; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(readyz_port $j)/readyz")
    [ "$code" = 200 ] || fail "gateway$j /readyz answered $code"
    podman exec "mdcheck-gateway$j" sh -c 'stat -c "%u %a" /run/secrets/managerd_authkey' \
        | grep -qx '10001 400' || fail "gateway$j's secret is not 10001, 0400"
done
say "gateway1, gateway2 healthy (/readyz 200) after $(($(date +%s) - t0)) s"

# -- 4: a client on the host -----------------------------------------------------------
python3 -m uv run --python python3 python - "$work/authkey" "$endpoints" \
    "$(gateway_port 1)" "$(gateway_port 2)" <<'EOF'
import json
import subprocess
import sys
import threading
import time
from typing import Any

from managerd_client import connect

authkey = open(sys.argv[1], "rb").read().strip()
endpoints, p1, p2 = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
g1, g2 = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"


def ok(what: str) -> None:
    print(f"podman_etcd_check: ok: {what}", flush=True)


def waiters(address: str, name: str) -> int:
    with connect(address, authkey=authkey) as m:
        return int(m.status()["objects"].get(name, {}).get("waiters", 0))


# An object made through gateway 1 is the same through gateway 2.
with connect(g1, authkey=authkey) as a, connect(g2, authkey=authkey) as b:
    a.dict("conf")["mode"] = "etcd"
    assert b.dict("conf")["mode"] == "etcd", "gateway 2 does not see gateway 1's dict"
    b.dict("conf")["by"] = 2
    assert dict(a.dict("conf").items()) == {"mode": "etcd", "by": 2}
    with a.Lock("db"):
        assert not b.Lock("db").acquire(blocking=False), "the lock is held twice"
    free = b.Lock("db")
    assert free.acquire(blocking=False), "the lock stayed held after its release"
    free.release()
ok("a dict and a lock made through gateway 1 are the same through gateway 2")

# A consumer blocked on gateway 1 is woken by a put through gateway 2.
got: list[Any] = []
with connect(g1, authkey=authkey) as consumer:
    waiting = threading.Thread(target=lambda: got.append(consumer.Queue("jobs").get(timeout=30)))
    waiting.start()
    deadline = time.monotonic() + 10
    while waiters(g1, "jobs") < 1:
        assert time.monotonic() < deadline, "the get never waited on gateway 1"
        time.sleep(0.1)
    with connect(g2, authkey=authkey) as producer:
        producer.Queue("jobs").put({"id": 1})
    waiting.join(30)
assert got == [{"id": 1}], got
ok("a consumer blocked on gateway 1 was woken by a put through gateway 2")

# A client holding a lock through gateway 1; gateway 1 is killed.
m = connect(f"{g1},{g2}", authkey=authkey)
assert m.address == ("127.0.0.1", p1), m.address
m.Queue("kept").put({"before": "kill"})
lock = m.Lock("held")
assert lock.acquire()
token = lock.fencing_token
subprocess.run(["podman", "kill", "mdcheck-gateway1"], check=True, capture_output=True)
t0 = time.monotonic()
assert m.Queue("kept").get(timeout=10) == {"before": "kill"}, "the queued item is gone"
took = time.monotonic() - t0
assert m.address == ("127.0.0.1", p2), m.address
assert lock.fencing_token == token, (lock.fencing_token, token)
with connect(g2, authkey=authkey) as other:
    assert not other.Lock("held").acquire(blocking=False), "the lock was free after the kill"
lock.release()  # raises LockLost if the session did not survive
with connect(g2, authkey=authkey) as other:
    after = other.Lock("held")
    assert after.acquire(blocking=False), "the release did not free the lock"
    after.release()
ok(
    f"after podman kill of gateway1 the client went on through gateway2 in {took:.2f} s: "
    f"lock still its own (token {token!r}), released without LockLost; the queued item was there"
)

# The etcd leader is killed; puts and gets go on.
status = subprocess.run(
    ["podman", "exec", "-e", f"ETCDCTL_ENDPOINTS={endpoints}", "mdcheck-etcd1",
     "etcdctl", "endpoint", "status", "-w", "json"],
    check=True, capture_output=True, text=True,
).stdout
members = json.loads(status)
leader = next(
    i for i, s in enumerate(members, 1) if s["Status"]["header"]["member_id"] == s["Status"]["leader"]
)
subprocess.run(["podman", "kill", f"mdcheck-etcd{leader}"], check=True, capture_output=True)
t0 = time.monotonic()
q = m.Queue("after-leader")
for n in range(20):
    q.put(n)
assert [q.get(timeout=10) for _ in range(20)] == list(range(20))
m.dict("conf")["after"] = "leader kill"
assert m.dict("conf")["after"] == "leader kill"
ok(f"after podman kill of etcd{leader} (the leader) 20 puts and gets and a dict write "
   f"went through in {time.monotonic() - t0:.2f} s")
m.close()
EOF
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(readyz_port 2)/readyz")
[ "$code" = 200 ] || fail "gateway2 /readyz answered $code with two etcd members"
podman healthcheck run mdcheck-gateway2 >/dev/null || fail "gateway2's health check fails with two etcd members"
say "ok: gateway2 still ready (/readyz 200, health check passing) on two etcd members"
say "ok: all checks passed in $(($(date +%s) - started)) s"
