#!/usr/bin/env bash
# Checks what the tests need, installs the cargo-installable tools, and says exactly what is
# missing otherwise.
set -euo pipefail
missing=()
[ "$(id -u)" = 0 ] || { echo "the tests mount FUSE filesystems: run them as root (sudo ci/test.sh)" >&2; exit 1; }
[ -c /dev/fuse ] || missing+=("/dev/fuse (load the fuse kernel module: modprobe fuse)")
command -v fusermount3 >/dev/null || missing+=("fusermount3 (apt-get install fuse3)")
command -v python3 >/dev/null || missing+=("python3 (apt-get install python3)")
command -v fio >/dev/null || missing+=("fio (apt-get install fio)")
getent passwd nobody >/dev/null && getent group nogroup >/dev/null && getent passwd daemon >/dev/null \
  || missing+=("the users nobody/nogroup and daemon/daemon that pjdfstest switches to")
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing before the tests can run:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi
export PATH="$HOME/.cargo/bin:$PATH"
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest@0.2.2
command -v fsx >/dev/null || cargo install --locked fsx@0.3.2
