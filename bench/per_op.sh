#!/usr/bin/env bash
# Per-request cost of two shoal builds side by side: a single node (no replication), a 64 MiB
# file in shoal's block cache, and fio reading it 4 KiB at a time with O_DIRECT at queue depth
# 1, so every read is one FUSE request; then a loop of stat(2) on distinct files past the
# kernel's attribute cache (each one a FUSE lookup). Runs alternate between the builds.
#
#   bench/per_op.sh OLD_SHOAL NEW_SHOAL [ROUNDS]
#
# Prints one line per run and the median of each build. Needs root, fio and python3.
set -euo pipefail
old=$1 new=$2 rounds=${3:-3}
w=$(mktemp -d /tmp/shoal-perop.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  grep -q " $w/mnt " /proc/self/mountinfo && umount -l "$w/mnt"
  rm -rf "$w"
}
trap cleanup EXIT

run() {
  local bin=$1 label=$2
  rm -rf "$w/data" "$w/mnt"
  "$bin" init --data "$w/data" >/dev/null
  "$bin" daemon --data "$w/data" --mount "$w/mnt" --no-plugin --log warn >"$w/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do grep -q " $w/mnt " /proc/self/mountinfo && break; sleep 0.1; done
  dd if=/dev/urandom of="$w/mnt/f" bs=1M count=64 conv=fsync status=none
  cat "$w/mnt/f" >/dev/null
  local iops
  iops=$(fio --name=r --filename="$w/mnt/f" --rw=randread --bs=4k --direct=1 --iodepth=1 \
    --ioengine=psync --runtime=15 --time_based --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
  mkdir "$w/mnt/d"
  for i in $(seq 1 2000); do : > "$w/mnt/d/$i"; done
  sleep 1.2 # past the kernel's 1 s attribute and entry cache
  local stats
  stats=$(python3 - "$w/mnt/d" <<'PY'
import os, sys, time
d = sys.argv[1]
names = [os.path.join(d, str(i)) for i in range(1, 2001)]
t = time.perf_counter()
for n in names:
    os.stat(n)
print(round(len(names) / (time.perf_counter() - t)))
PY
)
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  echo "$label 4k-direct-read-iops=$iops cold-stat-per-s=$stats"
}

for r in $(seq 1 "$rounds"); do
  run "$old" old
  run "$new" new
done | tee "$w/out"
python3 - "$w/out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for label in ("old", "new"):
    mine = [dict(kv.split("=") for kv in r[1:]) for r in rows if r[0] == label]
    print(label, "median:", {k: statistics.median(int(m[k]) for m in mine) for k in mine[0]})
PY
