#!/usr/bin/env bash
# Fuzzes every target in fuzz/ (or the TARGETs named) for MINUTES in all (split evenly), with cargo fuzz on nightly.
# Inputs that find new paths are added to fuzz/corpus/TARGET and the corpus is minimized
# (commit it: the tests replay the corpus on stable); a crash stops the run and leaves its input in fuzz/artifacts/TARGET,
# which `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-…` replays.
# SANITIZER=address adds ASan (slower; shoal's own code has no `unsafe`).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:?usage: ci/fuzz.sh MINUTES [TARGET...]}"
shift
sanitizer="${SANITIZER:-none}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
rustup toolchain list | grep -q '^nightly' || { echo "ci/fuzz.sh needs a nightly toolchain: rustup toolchain install nightly" >&2; exit 2; }
if (( $# )); then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz); fi
per=$(( minutes * 60 / ${#targets[@]} ))
(( per > 0 )) || per=1
cargo +nightly fuzz build --fuzz-dir fuzz -s "$sanitizer" --release --debug-assertions
for t in "${targets[@]}"; do
  before=$(ls "fuzz/corpus/$t" | wc -l)
  echo "== $t: ${per} s"
  cargo +nightly fuzz run --fuzz-dir fuzz -s "$sanitizer" --release --debug-assertions "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$per" -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E '^(#[0-9]+.*(DONE|pulse)|stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|thread .* panicked|Failing input|.*Test unit written)' || true
  if compgen -G "fuzz/artifacts/$t/crash-*" >/dev/null; then
    echo "FAILED: $t crashed; inputs in fuzz/artifacts/$t" >&2
    exit 1
  fi
  # Keep only inputs that add coverage, so the committed corpus stays small.
  cargo +nightly fuzz cmin --fuzz-dir fuzz -s "$sanitizer" --release --debug-assertions "$t" "fuzz/corpus/$t" >/dev/null 2>&1
  echo "   corpus $before -> $(ls "fuzz/corpus/$t" | wc -l) inputs (minimized)"
done
