#!/usr/bin/env bash
# Every test shoal has: unit and integration tests (real FUSE mounts, kill -9 durability),
# pjdfstest against the mount, and fsx. Needs root; see ci/require.sh for what else.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/require.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
ci/pjdfstest.sh
ci/fsx.sh 50000
ci/fsx.sh 50000 "$RANDOM" 3
