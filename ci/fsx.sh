#!/usr/bin/env bash
# Runs fsx on a shoal mount: `ci/fsx.sh [OPERATIONS] [SEED] [NODES]` (CI: 50,000 on one node and
# on node 3 of a three-node cluster; soak: `ci/fsx.sh 1000000`).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/lib.sh
export PATH="$HOME/.cargo/bin:$PATH"
ops=${1:-50000}
seed=${2:-$RANDOM}
nodes=${3:-1}
logs=$(mktemp -d /tmp/shoal-fsx.XXXXXX)
if [ "$nodes" = 1 ]; then
  shoal_up
  mnt=$WORK/mnt
  daemon_log=$WORK/daemon.log
else
  cluster_up
  mnt=$CLUSTER/node-3/mnt
  daemon_log=$CLUSTER/node-3/daemon.log
fi
mkdir -p "$mnt/fsx"
# fsx 0.3.2's mapped read never unmaps what it mapped, so a long run reaches the kernel's limit
# on mappings per process (vm.max_map_count, 65,530 by default) and mmap fails with ENOMEM
# inside fsx (seen at about 800,000 operations). Raise the limit for this run, then restore it.
maps=$(cat /proc/sys/vm/max_map_count)
if [ "$ops" -gt 50000 ] && [ "$maps" -lt $((ops + 65530)) ]; then
  sysctl -qw vm.max_map_count=$((ops + 65530))
  restore_maps() { sysctl -qw vm.max_map_count="$maps"; }
  trap 'restore_maps; if [ "$nodes" = 1 ]; then shoal_down; else cluster_down; fi' EXIT
fi
echo "fsx: $ops operations on $nodes node(s), seed $seed"
if ! fsx -f ci/fsx.toml -N "$ops" -S "$seed" -P "$logs" "$mnt/fsx/testfile" >"$logs/fsx.log" 2>&1; then
  grep -v "^\[ERROR fsx\] *[0-9]" "$logs/fsx.log" | tail -40 >&2
  tail -20 "$logs/fsx.log" >&2
  echo "fsx failed (seed $seed); daemon log:" >&2
  tail -20 "$daemon_log" >&2
  exit 1
fi
tail -1 "$logs/fsx.log"
rm -rf "$logs"
echo "fsx: $ops operations on $nodes node(s) passed: 0 miscompares"
