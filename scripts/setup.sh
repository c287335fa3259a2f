#!/usr/bin/env bash
# Installs what lockstep needs on a fresh Debian machine: Debian packages by
# name and Go modules through the configured module proxy. Idempotent: a
# second run only checks.
set -euo pipefail

PKGS=(
  build-essential   # the dmt runtime is a small C library built here
  iproute2          # ip netns for the one-machine cluster
  apache2 apache2-utils  # the replicated server and ab
  redis-server      # a second unmodified server in the tests
  etcd-server etcd-client # the log's benchmark peer
  mariadb-server mariadb-client sysbench # the second replicated server and its load
  lxc lxc-dev pkg-config golang-gopkg-lxc-go-lxc.v2-dev # containers; go.mod points at these Go bindings
  btrfs-progs       # mkfs.btrfs: containers' data volumes, snapshotted at checkpoints (container/volume.go)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged services must not hold the ports or data the tests use.
  for s in apache2 redis-server etcd mariadb; do
    systemctl disable --now "$s" >/dev/null 2>&1 || service "$s" stop >/dev/null 2>&1 || true
  done
fi

# Debian's CRIU fails on this kernel; build a working one once (cached).
bash "$(dirname "$0")/criu.sh"

if ! command -v go >/dev/null; then
  echo "setup: Go is required (the machine image provides /usr/local/go)" >&2
  exit 1
fi
go mod download
