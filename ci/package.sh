#!/usr/bin/env bash
# Builds the Debian package from the release binary, installs it on this machine, and checks
# what it put there: the binary, the systemd unit, man pages, completions, and the mount(8)
# helper, used for real: `mount -t fuse.shoal` of a fresh node, a file written and read, and
# `umount` stopping its daemon. The Docker and Swarm tests that follow run the installed
# /usr/bin/shoal (ci/test.sh exports SHOAL). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

fail() { echo "FAIL: $*" >&2; exit 1; }

out=target/release/pkg
rm -rf "$out"
target/release/shoal debug docs --out "$out"
# Stripped, as Debian packages are (the line tables stay in target/release/shoal).
cargo deb -p shoal-fs --no-build --strip --output target/debian/ >/dev/null
deb=$(ls -t target/debian/shoal_*.deb | head -n 1)
dpkg -i "$deb" >/dev/null
version=$(/usr/bin/shoal --version)
[ "$version" = "$(target/release/shoal --version)" ] || fail "installed $version, built $(target/release/shoal --version)"
for f in /lib/systemd/system/shoal.service /sbin/mount.fuse.shoal /usr/share/bash-completion/completions/shoal \
  /usr/share/zsh/vendor-completions/_shoal /usr/share/fish/vendor_completions.d/shoal.fish /usr/share/doc/shoal/DOCKER.md; do
  [ -e "$f" ] || fail "the package did not install $f"
done
ls /usr/share/man/man1/shoal.1* /usr/share/man/man1/shoal-daemon.1* /usr/share/man/man1/shoal-mount.1* >/dev/null \
  || fail "the package did not install the man pages"
grep -q '^ExecStart=/usr/bin/shoal daemon ' /lib/systemd/system/shoal.service || fail "the unit does not run /usr/bin/shoal"
echo "ok: $(basename "$deb") installed: $version, the systemd unit, $(ls /usr/share/man/man1/shoal*.1* | wc -l) man pages, bash/zsh/fish completions, /sbin/mount.fuse.shoal"

# mount(8) finds /sbin/mount.fuse.shoal by the type.
w=$(mktemp -d /tmp/shoal-pkg.XXXXXX)
cleanup() {
  grep -q " $w/mnt " /proc/self/mountinfo && umount -l "$w/mnt"
  rm -rf "$w"
}
trap cleanup EXIT
shoal init --data "$w/data" >/dev/null
mkdir "$w/mnt"
mount -t fuse.shoal "$w/data" "$w/mnt" -o _netdev,nofail,no_plugin,cache_size=64MiB \
  || fail "mount -t fuse.shoal failed; its log: $(tail -n 5 "$w/data/daemon.log" 2>/dev/null)"
echo "written through mount -t fuse.shoal" > "$w/mnt/hello"
[ "$(cat "$w/mnt/hello")" = "written through mount -t fuse.shoal" ] || fail "reading back through the mount"
shoal status --data "$w/data" >/dev/null || fail "the mounted node's daemon does not answer"
if mount -t fuse.shoal "$w/data" "$w/mnt2" -o colour=blue 2>"$w/err"; then fail "an unknown option was accepted"; fi
grep -q "unknown option 'colour=blue'" "$w/err" || fail "unknown option: $(cat "$w/err")"
umount "$w/mnt"
for _ in $(seq 1 100); do
  shoal status --data "$w/data" >/dev/null 2>&1 || break
  sleep 0.1
done
if shoal status --data "$w/data" >/dev/null 2>&1; then fail "the daemon still runs 10 s after umount"; fi
echo "ok: mount -t fuse.shoal (the packaged helper) mounted a node, a file went through it, an unknown option was refused, and umount stopped the daemon"
