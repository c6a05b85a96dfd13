#!/usr/bin/env bash
# Builds the managed Docker plugin's directory: OUT/config.json and OUT/rootfs (the shoal
# binary with the libraries it loads, busybox for the entry point's shell, the entry point).
# Then, on each host: docker plugin create shoal OUT (see docs/DOCKER.md).
#
# Usage: fs/plugin/build.sh OUT [SHOAL_BINARY]   (default: target/release/shoal)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: fs/plugin/build.sh OUT [SHOAL_BINARY]}
shoal=${2:-target/release/shoal}
[ -x "$shoal" ] || { echo "no shoal binary at $shoal: cargo build --release first" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "missing /bin/busybox (apt-get install busybox-static)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"/rootfs/{bin,tmp,etc,proc,sys,dev,run/docker/plugins,mnt/shoal,var/lib/shoal}
cp fs/plugin/config.json "$out/config.json"
cp /bin/busybox "$out/rootfs/bin/busybox"
ln -s busybox "$out/rootfs/bin/sh"
# Without its line tables (91 MB with them, 17 MB without).
if command -v strip >/dev/null; then
  strip --strip-debug -o "$out/rootfs/bin/shoal" "$shoal"
else
  install -m 755 "$shoal" "$out/rootfs/bin/shoal"
fi
install -m 755 fs/plugin/entrypoint.sh "$out/rootfs/bin/shoal-plugin"
for lib in $(ldd "$shoal" | grep -o '/[^ ]*'); do
  mkdir -p "$out/rootfs$(dirname "$lib")"
  cp -L "$lib" "$out/rootfs$lib"
done
echo "root:x:0:0:root:/:/bin/sh" > "$out/rootfs/etc/passwd"
echo "root:x:0:" > "$out/rootfs/etc/group"
echo "plugin directory: $out (docker plugin create NAME $out)"
