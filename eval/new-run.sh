#!/usr/bin/env bash
# Crane's entry point, kept for its users:
#   eval/new-run.sh CONFIG [build|no_build] MODE ROUNDS
# CONFIG is a file in configs/ (with or without .toml, e.g. apache or
# configs/apache.toml); MODE is orig, xtern_only, proxy_only, joint_sched or
# a comma-separated list of them; ROUNDS is how many client runs per mode.
# Results go to eval/results/<app>.{csv,md,png}.
set -euo pipefail
usage() { echo "usage: $0 CONFIG [build|no_build] MODE ROUNDS" >&2; exit 2; }
[ $# -eq 4 ] || usage
cfg=$1 build=$2 mode=$3 rounds=$4
cd "$(dirname "$0")/.."
case "$cfg" in
  *.toml) ;;
  *) cfg="configs/$(basename "$cfg").toml" ;;
esac
[ -f "$cfg" ] || { echo "$0: no config $cfg" >&2; exit 2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "$0: ROUNDS must be a positive number" >&2; exit 2; }
case "$build" in
  build) make setup build ;;
  no_build) [ -x bin/lockstep ] || { echo "$0: bin/lockstep missing; use build" >&2; exit 2; } ;;
  *) usage ;;
esac
exec bin/lockstep eval --config "$cfg" --modes "$mode" --rounds "$rounds" --out eval/results
