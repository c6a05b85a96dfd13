#!/usr/bin/env bash
# Runs fsx on a shoal mount: `ci/fsx.sh [OPERATIONS] [SEED]` (CI: 50,000; soak: 1,000,000).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/lib.sh
export PATH="$HOME/.cargo/bin:$PATH"
ops=${1:-50000}
seed=${2:-$RANDOM}
shoal_up
mkdir -p "$WORK/mnt/fsx" "$WORK/artifacts"
echo "fsx: $ops operations, seed $seed"
if ! fsx -f ci/fsx.toml -N "$ops" -S "$seed" -P "$WORK/artifacts" "$WORK/mnt/fsx/testfile" >"$WORK/fsx.log" 2>&1; then
  tail -40 "$WORK/fsx.log" >&2
  echo "fsx failed (seed $seed); daemon log:" >&2
  tail -20 "$WORK/daemon.log" >&2
  exit 1
fi
tail -1 "$WORK/fsx.log"
echo "fsx: $ops operations passed: 0 miscompares"
