#!/usr/bin/env bash
# A first fio comparison: the same jobs on the local disk and on a single-node shoal mount, in
# one run. Prints a table. The full runner against the peers comes with the benchmark work.
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

run_jobs() { # dir label
  declare -gA RESULT
  for job in "${jobs[@]}"; do
    drop_caches
    (cd "$1" && fio --output-format=json --output="$1/$job.json" "$JOBS/$job.fio" >/dev/null)
    RESULT[$2,$job]=$(figure "$1/$job.json" "$job")
    echo "  $2 $job: ${RESULT[$2,$job]}"
  done
}

local_dir=$(mktemp -d /var/tmp/shoal-fio-local.XXXXXX)
echo "local disk ($local_dir):"
run_jobs "$local_dir" local
rm -rf "$local_dir"

shoal_up
echo "shoal single node ($WORK/mnt):"
run_jobs "$WORK/mnt" shoal
shoal_down

printf '\n| job | local | shoal-r1 | ratio |\n|---|---|---|---|\n'
for job in "${jobs[@]}"; do
  l=${RESULT[local,$job]}; s=${RESULT[shoal,$job]}
  ratio=$(python3 -c "print(f'{float(\"${s%% *}\".rstrip(\"k\")) / float(\"${l%% *}\".rstrip(\"k\")):.2f}x')")
  echo "| $job | $l | $s | $ratio |"
done
