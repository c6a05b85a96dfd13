#!/usr/bin/env bash
# A first fio comparison: the same jobs on the local disk, on a single-node shoal mount, and on
# a three-node cluster (R=3: writes through node 1, reads through node 2), in one run. Prints a
# table. The full runner against the peers comes with the benchmark work.
# Usage (root, from the repository root): bench/first-fio.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/lib.sh
jobs=(seq-write seq-read rand-read rand-write)
JOBS=$PWD/bench/fio

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# fio's JSON → "MB/s" for bandwidth jobs, "IOPS" for 4 KiB jobs.
figure() { # json job
  python3 - "$1" "$2" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
if sys.argv[2].startswith("seq"):
    print(f'{side["bw_bytes"] / 1e6:.0f} MB/s')
else:
    print(f'{side["iops"] / 1e3:.1f}k IOPS')
PY
}

run_jobs() { # write-dir label [read-dir]
  declare -gA RESULT
  local out
  out=$(mktemp -d /tmp/shoal-fio-out.XXXXXX)
  for job in "${jobs[@]}"; do
    local dir=$1
    case $job in seq-read|rand-read) dir=${3:-$1} ;; esac
    drop_caches
    (cd "$dir" && fio --output-format=json --output="$out/$job.json" "$JOBS/$job.fio" >/dev/null)
    RESULT[$2,$job]=$(figure "$out/$job.json" "$job")
    echo "  $2 $job: ${RESULT[$2,$job]}"
  done
  rm -rf "$out"
}

local_dir=$(mktemp -d /var/tmp/shoal-fio-local.XXXXXX)
echo "local disk ($local_dir):"
run_jobs "$local_dir" local
rm -rf "$local_dir"

shoal_up
echo "shoal single node ($WORK/mnt):"
run_jobs "$WORK/mnt" shoal
shoal_down

cluster=$(mktemp -d /tmp/shoal-fio-cluster.XXXXXX)
port=$((20000 + RANDOM % 20000))
"$SHOAL" local up --nodes 3 --dir "$cluster" --base-port "$port" >/dev/null
trap '"$SHOAL" local down --dir "$cluster" >/dev/null; rm -rf "$cluster"' EXIT
echo "shoal three nodes, R=3 (write on node 1, read on node 2):"
run_jobs "$cluster/node-1/mnt" shoal3 "$cluster/node-2/mnt"

ratio() { python3 -c "print(f'{float(\"${1%% *}\".rstrip(\"k\")) / float(\"${2%% *}\".rstrip(\"k\")):.2f}x')"; }
printf '\n| job | local | shoal-r1 | ratio | shoal-r3 | ratio |\n|---|---|---|---|---|---|\n'
for job in "${jobs[@]}"; do
  l=${RESULT[local,$job]}; s=${RESULT[shoal,$job]}; t=${RESULT[shoal3,$job]}
  echo "| $job | $l | $s | $(ratio "$s" "$l") | $t | $(ratio "$t" "$l") |"
done
