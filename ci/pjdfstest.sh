#!/usr/bin/env bash
# Runs pjdfstest on the local disk, on a single-node shoal mount and on node 2 of a three-node
# cluster, with the same config, and fails if shoal fails or skips a test that the local disk
# passes, unless ci/pjdfstest-exceptions.txt lists it.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/lib.sh
export PATH="$HOME/.cargo/bin:$PATH"
config=$PWD/ci/pjdfstest.toml
out=$(mktemp -d /tmp/pjdfstest-out.XXXXXX)

run_on() { # dir output
  mkdir -p "$1"
  (cd "$1" && pjdfstest -c "$config" -p "$1") >"$2" 2>&1 || true
  grep '^Summary:' "$2" | tail -1
}

echo "pjdfstest on the local disk:"
local_dir=$(mktemp -d /var/tmp/pjdfstest-local.XXXXXX)
chmod 755 "$local_dir"
run_on "$local_dir" "$out/local.txt"
rm -rf "$local_dir"

shoal_up
echo "pjdfstest on shoal, single node:"
run_on "$WORK/mnt/pjdfstest" "$out/shoal.txt"
shoal_down

cluster_up
echo "pjdfstest on shoal, node 2 of three:"
run_on "$CLUSTER/node-2/mnt/p" "$out/cluster.txt"
cluster_down

passed() { awk '$NF == "ok" {print $1}' "$1" | sort -u; }
exceptions=$(grep -v '^#' ci/pjdfstest-exceptions.txt | awk 'NF {print $1}' | sort -u)
status=0
for run in shoal cluster; do
  regressions=$(comm -23 <(passed "$out/local.txt") <(passed "$out/$run.txt") | comm -23 - <(echo "$exceptions"))
  failed=$(grep -E '^[a-z_:0-9]+ +FAILED' "$out/$run.txt" || true)
  if [ -n "$regressions" ] || [ -n "$failed" ]; then
    echo "pjdfstest: shoal ($run) does not pass what the local disk passes:" >&2
    echo "$regressions" >&2
    echo "$failed" >&2
    grep -A15 -E 'FAILED|panicked' "$out/$run.txt" | head -80 >&2 || true
    status=1
  fi
done
[ $status = 0 ] || exit 1
echo "pjdfstest: shoal (single node and three nodes) passes every test the local disk passes (exceptions: $(echo "$exceptions" | grep -c . || true), see ci/pjdfstest-exceptions.txt)"
rm -rf "$out"
