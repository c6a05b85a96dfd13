#!/usr/bin/env bash
# Every test shoal has: formatting and clippy (warnings are errors, so raft/clippy.toml's ban on
# clocks and randomness in the state machine holds), cargo deny (licenses, bans, sources), unit and integration tests (real FUSE mounts, kill -9 durability,
# crashes at every failpoint),
# pjdfstest against the mount, fsx, the Debian package (installed, and its mount helper used), the Docker plugin against real dockerds, and the benchmark runner's quick mode against every peer
# (a smoke test: no assertion on speed). Needs root; see ci/require.sh for what else.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/require.sh
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release -p shoal-raft -p shoal-fs --features failpoints --all-targets -- -D warnings
# Licenses, banned crates and sources (deny.toml). Advisories need the RustSec database, which is
# cloned from GitHub: run `cargo deny check advisories` where GitHub is reachable.
cargo deny check licenses bans sources
cargo build --release --workspace --all-targets
cargo test --release --workspace
# The crash tests at the failpoints need the binary built with them; the plain one goes back
# in place for everything after.
cargo test --release -p shoal-fs --features failpoints --test failpoints
cargo build --release -p shoal-fs --bin shoal
ci/pjdfstest.sh
ci/fsx.sh 50000
ci/fsx.sh 50000 "$RANDOM" 3
# The Debian package, installed here; the Docker tests run the installed binary.
ci/package.sh
export SHOAL=/usr/bin/shoal
ci/docker.sh
ci/swarm.sh
bench/install-peers.sh
bench/run --quick --out "$(mktemp -d /tmp/shoal-bench-quick.XXXXXX)" \
  --require local,fuse-passthrough,shoal-r1,shoal-r3,juicefs,seaweedfs
