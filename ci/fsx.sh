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
# ci/require.sh installs fsx 0.3.2 with an munmap after its mapped reads: unpatched, a long run
# slows down as its mappings pile up and ends with ENOMEM at the kernel's limit on them.
[ -e "$HOME/.cargo/bin/.fsx-0.3.2-unmaps" ] || { echo "fsx is not the patched build: run ci/require.sh" >&2; exit 1; }
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
