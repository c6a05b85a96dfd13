#!/usr/bin/env bash
# The long run, outside CI: `ci/soak.sh MINUTES [OUT]`. Until MINUTES have passed it runs, at
# the same time:
#   - fsx, 1,000,000 operations per run on node 3 of a three-node cluster, a new seed each run;
#   - in turn: the kill -9 tests (a writer that records a file only after fsync of the file and
#     its directory, killed at different points; kill -9 of cluster nodes under writers), three
#     new seeds of the simulation (fs/tests/sim) and the failpoint crash tests (every
#     durability edge, several nodes writing at once).
# Every run's result goes to OUT/runs.txt, a failed run's output is kept in OUT, and the run
# goes on; OUT/summary.txt has the counts. Exits non-zero if anything failed. Needs root.
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: ci/soak.sh MINUTES [OUT]}
out=${2:-$(mktemp -d /tmp/shoal-soak.XXXXXX)}
mkdir -p "$out"
export PATH="$HOME/.cargo/bin:$PATH"
end=$(($(date +%s) + minutes * 60))
echo "soak: $minutes minutes, results in $out"

# Both builds first, so that the loops below only run: the failpoint tests use a binary built
# with `--features failpoints`, everything else the plain one.
cargo build --release -p shoal-fs --features failpoints --tests || exit 1
cargo build --release --workspace --all-targets || exit 1

record() { # SUITE STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%ss\t%s\n' "$(date -u +%H:%M:%S)" "$1" "$2" "$3" "$4" >>"$out/runs.txt"
}

fsx_loop() {
  local n=0
  while [ "$(date +%s)" -lt "$end" ]; do
    n=$((n + 1))
    local seed=$RANDOM start
    start=$(date +%s)
    if ci/fsx.sh 1000000 "$seed" 3 >"$out/fsx-$n.log" 2>&1; then
      record fsx ok $(($(date +%s) - start)) "1000000 operations, seed $seed"
      rm -f "$out/fsx-$n.log"
    else
      record fsx FAILED $(($(date +%s) - start)) "seed $seed, see fsx-$n.log"
    fi
  done
}

crash_loop() {
  local n=0
  while [ "$(date +%s)" -lt "$end" ]; do
    n=$((n + 1))
    local start log
    start=$(date +%s)
    log="$out/kill-$n.log"
    # The plain binary: cargo puts it back in place after a failpoints build.
    cargo build --release -p shoal-fs --bin shoal >/dev/null 2>&1
    if cargo test --release -p shoal-fs --test it -- durability::kill_9 cluster::files_stay \
      cluster::the_leader_dies cluster::blocks_of_a_dead cluster::writes_go_on --nocapture >"$log" 2>&1; then
      record kill ok $(($(date +%s) - start)) "$(grep -o '[0-9]* passed' "$log" | tail -1)"
      rm -f "$log"
    else
      record kill FAILED $(($(date +%s) - start)) "see kill-$n.log"
    fi
    [ "$(date +%s)" -lt "$end" ] || break
    start=$(date +%s)
    log="$out/sim-$n.log"
    local seeds="$RANDOM,$RANDOM,$RANDOM"
    if SHOAL_SIM_SEEDS=$seeds cargo test --release -p shoal-fs --test sim -- --nocapture >"$log" 2>&1; then
      record sim ok $(($(date +%s) - start)) "seeds $seeds, $(grep -o '[0-9]* acknowledged files checked' "$log" | awk '{s += $1} END {print s + 0}') acknowledged files checked"
      rm -f "$log"
    else
      record sim FAILED $(($(date +%s) - start)) "seeds $seeds, see sim-$n.log"
    fi
    [ "$(date +%s)" -lt "$end" ] || break
    start=$(date +%s)
    log="$out/failpoints-$n.log"
    if cargo test --release -p shoal-fs --features failpoints --test failpoints \
      -- --nocapture >"$log" 2>&1; then
      local acked
      acked=$(grep -o '[0-9]* files acknowledged' "$log" | awk '{s += $1} END {print s + 0}')
      record failpoints ok $(($(date +%s) - start)) \
        "$(grep -o '[0-9]* passed' "$log" | tail -1), $acked fsynced files checked"
      rm -f "$log"
    else
      record failpoints FAILED $(($(date +%s) - start)) "see failpoints-$n.log"
    fi
  done
}

fsx_loop &
fsx_pid=$!
crash_loop
wait "$fsx_pid"

{
  echo "soak of $minutes minutes, ended $(date -u '+%F %H:%M') UTC"
  for suite in fsx kill sim failpoints; do
    ok=$(awk -F'\t' -v s="$suite" '$2 == s && $3 == "ok"' "$out/runs.txt" | wc -l)
    failed=$(awk -F'\t' -v s="$suite" '$2 == s && $3 != "ok"' "$out/runs.txt" | wc -l)
    echo "$suite: $ok runs passed, $failed failed"
  done
} | tee "$out/summary.txt"
! grep -q FAILED "$out/runs.txt"
