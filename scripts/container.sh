#!/usr/bin/env bash
# Build the service's container with no registry access and run it on 127.0.0.1.
#
#   scripts/container.sh build            # base image (mmdebstrap) + bento + image
#   scripts/container.sh run [PORT]       # start it; prints the container id
#   scripts/container.sh check            # exit 0 if a Docker daemon is (or can be made) available
#
# Docker Hub is unreachable here, so the base image is made locally with mmdebstrap
# (../shared/CONTAINERS.md). NIN_CONTAINER_FLAVOR=cpu (default here) leaves out onnxruntime-gpu's
# CUDA and cuDNN wheels (serving/service.py: image()); `gpu` keeps them, for `docker run --gpus all`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
BASE=${NIN_BASE_IMAGE:-local/bookworm:py}
IMAGE=${NIN_IMAGE:-nin-fashion-mnist:local}
FLAVOR=${NIN_CONTAINER_FLAVOR:-cpu}

die() { echo "container: $*" >&2; exit 2; }

ensure_docker() {
  docker info >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || die "no Docker daemon, and not root to start one"
  if ! command -v dockerd >/dev/null; then
    apt-get update -qq >/dev/null && apt-get install -y -qq docker.io >/dev/null 2>&1 || die "cannot install docker.io"
  fi
  (dockerd >/tmp/nin-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  die "dockerd did not start (see /tmp/nin-dockerd.log)"
}

mirror() {  # the Debian mirror apt uses here
  grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v security | head -1 | awk '{print $2}'
}

ensure_base() {  # mmdebstrap: the same minbase as debootstrap in half the time (24 s against 51 s here)
  docker image inspect "$BASE" >/dev/null 2>&1 && return 0
  command -v mmdebstrap >/dev/null || apt-get install -y -qq mmdebstrap >/dev/null 2>&1 || die "cannot install mmdebstrap"
  local tar; tar=$(mktemp /tmp/nin-rootfs.XXXX.tar)
  mmdebstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    --customize-hook='cp /usr/local/share/ca-certificates/* "$1/usr/local/share/ca-certificates/" 2>/dev/null || true' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1 || true' \
    bookworm "$tar" "$(mirror)" >/tmp/nin-mmdebstrap.log 2>&1 || { rm -f "$tar"; die "mmdebstrap failed (see /tmp/nin-mmdebstrap.log)"; }
  docker import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    "$tar" "$BASE" >/dev/null
  rm -f "$tar"
}

build() {
  ensure_docker
  ensure_base
  command -v uv >/dev/null || export PATH="$PWD/$BIN:$PATH"
  # the shipped model into BentoML's store (the bento packs it from there), checked against its card
  "$BIN/python" -m serving.model_files models/nin-fashion-mnist >/dev/null || die "the shipped model cannot be imported"
  local tag
  tag=$(NIN_BASE_IMAGE="$BASE" NIN_CONTAINER_FLAVOR="$FLAVOR" "$BIN/bentoml" build --output tag 2>/tmp/nin-build.log | tail -1 | sed 's/^__tag__://')
  [ -n "$tag" ] || die "bentoml build failed (see /tmp/nin-build.log)"
  # BentoML's user `bentoml` with uid/gid 10034 instead of its default 1034 (below 10000, where
  # a host's own users live)
  DOCKER_BUILDKIT=0 "$BIN/bentoml" containerize "$tag" -t "$IMAGE-bento" \
    --opt build-arg=BENTO_USER_UID=10034 --opt build-arg=BENTO_USER_GID=10034 >/tmp/nin-containerize.log 2>&1 \
    || die "containerize failed (see /tmp/nin-containerize.log)"
  # the last layer: a read-only model and a HEALTHCHECK (deploy/Dockerfile says why there)
  DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" --build-arg BENTO_IMAGE="$IMAGE-bento" - <deploy/Dockerfile \
    >/tmp/nin-last-layer.log 2>&1 || die "the last layer failed (see /tmp/nin-last-layer.log)"
  echo "$IMAGE"
}

run() {  # as deploy/k8s runs it: read-only root with two writable tmpfs, no capabilities
  ensure_docker
  docker run -d --read-only --tmpfs /tmp --tmpfs /var/lib/bentoml:uid=10034,gid=10034 --cap-drop ALL \
    --security-opt no-new-privileges -p "127.0.0.1:${1:-3000}:3000" "$IMAGE"
}

case "${1:-}" in
  build) build ;;
  run) run "${2:-3000}" ;;
  check) ensure_docker ;;
  *) echo "usage: $0 build | run [PORT] | check" >&2; exit 2 ;;
esac
