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
command -v strace >/dev/null || missing+=("strace (apt-get install strace; the benchmark smoke test counts fsyncs with it)")
command -v bindfs >/dev/null || missing+=("bindfs (apt-get install bindfs; the benchmark's FUSE passthrough)")
/usr/bin/python3 -c 'import matplotlib, venv' 2>/dev/null \
  || missing+=("python3-matplotlib and python3-venv (apt-get install python3-matplotlib python3-venv; the benchmark's chart and its peers)")
command -v dockerd >/dev/null || missing+=("dockerd (apt-get install docker.io; the plugin tests start their own engines)")
[ -x /bin/busybox ] || missing+=("/bin/busybox (apt-get install busybox-static; the plugin tests' container image)")
command -v curl >/dev/null || missing+=("curl (apt-get install curl; the plugin tests send raw requests)")
getent passwd nobody >/dev/null && getent group nogroup >/dev/null && getent passwd daemon >/dev/null \
  || missing+=("the users nobody/nogroup and daemon/daemon that pjdfstest switches to")
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing before the tests can run:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
command -v setpriv >/dev/null || { echo "setpriv is missing (apt-get install util-linux; the security tests run commands as nobody)" >&2; exit 1; }
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest@0.2.2
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny@0.20.2
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
# fsx 0.3.2's mapped read never unmaps what it mapped: a million operations leave some 190,000
# mappings, fsx's own CPU time grows with them (a run of 2026-12-06 slowed to half its rate by
# 450,000 operations, fsx at 67 % CPU and the daemon at 20 %) and the kernel's limit on mappings
# ends it with ENOMEM. Install it with the munmap its mapped write already has.
fsx_fixed="$HOME/.cargo/bin/.fsx-0.3.2-unmaps"
if [ ! -e "$fsx_fixed" ]; then
  command -v fsx >/dev/null || cargo install --locked fsx@0.3.2 # fetches its source too
  src=$(ls -d "$HOME"/.cargo/registry/src/*/fsx-0.3.2 | head -n 1)
  tmp=$(mktemp -d)
  cp -r "$src" "$tmp/fsx"
  python3 - "$tmp/fsx/src/main.rs" <<'PY'
import sys
path = sys.argv[1]
s = open(path).read()
old = """            self.check_eofpage(offset, p.as_ptr(), size);
        }
    }

    fn domapwrite("""
new = """            self.check_eofpage(offset, p.as_ptr(), size);
            munmap(p, map_size).unwrap();
        }
    }

    fn domapwrite("""
assert s.count(old) == 1, "fsx 0.3.2's domapread is not what ci/require.sh expects"
open(path, "w").write(s.replace(old, new))
PY
  cargo install --locked --force --path "$tmp/fsx"
  rm -rf "$tmp"
  touch "$fsx_fixed"
fi
