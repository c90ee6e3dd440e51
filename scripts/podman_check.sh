#!/bin/sh
# Build managerd's images with podman and run the daemon from one:
#
#   sudo sh scripts/podman_check.sh
#
# What it checks, on a machine with no Docker engine and no image registry:
#   1. a Debian bookworm root filesystem (debootstrap: python3, pip, venv)
#      imported as the base image in place of python:3.11-slim;
#   2. `podman build --format docker` of both targets of deploy/Dockerfile,
#      and that the daemon image keeps its HEALTHCHECK;
#   3. the daemon container serves: `podman healthcheck run` passes, a
#      managerd client puts and gets through it, `/healthz` answers, and a
#      second container on the same volume recovers the object.
#
# Needs root, podman, runc and debootstrap (apt-get install podman runc
# debootstrap). runc, and the ulimits, because crun cannot set rlimits in
# this kind of sandbox. The host's CA bundle goes into the base image so
# that pip and uv inside the build trust the same roots as the host (a
# TLS-intercepting proxy's CA, where there is one). Exits non-zero on the
# first failure.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
work=${PODMAN_CHECK_DIR:-/tmp/managerd-podman}
port=${PODMAN_CHECK_PORT:-50471}
metrics_port=${PODMAN_CHECK_METRICS_PORT:-59471}
run_flags="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
base=localhost/managerd-base:bookworm

mkdir -p "$work"
cleanup() {
    podman rm -f managerd-check managerd-check2 >/dev/null 2>&1 || true
    podman volume rm managerd-check-data >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

if ! podman image exists "$base"; then
    if [ ! -x "$work/rootfs/usr/bin/python3" ]; then
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
            bookworm "$work/rootfs" http://deb.debian.org/debian
    fi
    # python:3.11-slim has a `python` and lets pip install system-wide.
    rm -f "$work"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "$work/rootfs/usr/bin/python"
    cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$work/rootfs" -c . | podman import \
        --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        --change 'CMD ["python3"]' - "$base"
fi

cd "$here"
# shellcheck disable=SC2086
podman build $run_flags --format docker --build-arg PYTHON_IMAGE="$base" \
    -f deploy/Dockerfile -t localhost/managerd:check .
# shellcheck disable=SC2086
podman build $run_flags --format docker --build-arg PYTHON_IMAGE="$base" \
    -f deploy/Dockerfile --target worker -t localhost/managerd-worker:check .
podman inspect localhost/managerd:check | grep -q '"managerd",' \
    || { echo "podman_check: the daemon image lost its HEALTHCHECK"; exit 1; }

start() {
    # shellcheck disable=SC2086
    podman run -d --name "$1" $run_flags --network host \
        -e MANAGERD_HOST=127.0.0.1 -e MANAGERD_PORT="$port" \
        -e MANAGERD_METRICS_PORT="$metrics_port" \
        -v managerd-check-data:/data localhost/managerd:check >/dev/null
    tries=0
    until podman healthcheck run "$1" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -lt 30 ] || { podman logs "$1"; echo "podman_check: $1 never healthy"; exit 1; }
        sleep 1
    done
}

start managerd-check
podman cp managerd-check:/data/authkey "$work/authkey"
chmod 600 "$work/authkey"
curl -fsS "http://127.0.0.1:$metrics_port/healthz" >/dev/null
python3 -m uv run --python python3 python - "$port" "$work/authkey" <<'EOF'
import sys
from managerd_client import connect
m = connect(f"127.0.0.1:{sys.argv[1]}", authkey=open(sys.argv[2], "rb").read())
q = m.Queue("podman-check")
q.put({"item": 1})
q.put({"item": 2})
assert q.get() == {"item": 1}
m.close()
EOF
podman stop -t 10 managerd-check >/dev/null
podman rm managerd-check >/dev/null

start managerd-check2
python3 -m uv run --python python3 python - "$port" "$work/authkey" <<'EOF'
import sys
from managerd_client import connect
m = connect(f"127.0.0.1:{sys.argv[1]}", authkey=open(sys.argv[2], "rb").read())
assert m.Queue("podman-check").get(timeout=5) == {"item": 2}, "the queued item did not survive"
m.close()
EOF
echo "podman_check: ok (both images built with podman; healthcheck kept and passing; a put survived a container restart)"
