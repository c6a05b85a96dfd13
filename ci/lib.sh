# Helpers shared by the ci/ scripts: start a shoal daemon in a temp dir and always stop it.
# shellcheck shell=bash

SHOAL=${SHOAL:-$PWD/target/release/shoal}
WORK=""
DAEMON_PID=""

shoal_up() {
  WORK=$(mktemp -d /tmp/shoal-ci.XXXXXX)
  # Tests switch to unprivileged users, who must be able to reach the mount.
  chmod 755 "$WORK"
  "$SHOAL" init --data "$WORK/data" >/dev/null
  "$SHOAL" daemon --data "$WORK/data" --mount "$WORK/mnt" --plugin-socket "$WORK/plugin.sock" >"$WORK/daemon.log" 2>&1 &
  DAEMON_PID=$!
  trap shoal_down EXIT
  for _ in $(seq 1 300); do
    if grep -q " $WORK/mnt " /proc/self/mountinfo && ls "$WORK/mnt" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
      echo "shoal daemon exited early:" >&2
      cat "$WORK/daemon.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "shoal daemon did not mount within 30 s" >&2
  cat "$WORK/daemon.log" >&2
  return 1
}

shoal_down() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"
    for _ in $(seq 1 300); do
      kill -0 "$DAEMON_PID" 2>/dev/null || break
      sleep 0.1
    done
  fi
  if [ -n "$WORK" ] && grep -q " $WORK/mnt " /proc/self/mountinfo; then
    umount -l "$WORK/mnt" || true
  fi
  [ -n "$WORK" ] && rm -rf "$WORK"
  DAEMON_PID=""
  WORK=""
}

CLUSTER=""

# A three-node cluster on loopback (`shoal local up`), always stopped on exit.
cluster_up() {
  # Short: pjdfstest binds unix sockets under it, and their paths may not exceed 108 bytes.
  CLUSTER=$(mktemp -d /tmp/sc.XXXXXX)
  chmod 755 "$CLUSTER"
  trap cluster_down EXIT
  # Ports below 20,000: the Rust tests' clusters take theirs from 20,000 up.
  "$SHOAL" local up --nodes 3 --dir "$CLUSTER" --base-port $((10000 + RANDOM % 1000 * 10)) >/dev/null
}

cluster_down() {
  [ -n "$CLUSTER" ] || return 0
  "$SHOAL" local down --dir "$CLUSTER" >/dev/null 2>&1 || true
  for m in "$CLUSTER"/node-*/mnt; do
    grep -q " $m " /proc/self/mountinfo && umount -l "$m"
  done
  rm -rf "$CLUSTER"
  CLUSTER=""
}
