#!/usr/bin/env bash
# The Docker volume plugin against real Docker engines (Debian's docker.io).
#
# A three-node shoal cluster on loopback, and two dockerds standing for two hosts: each in its
# own mount and network namespace, with its own /etc/docker and /run/docker/plugins, finding
# the plugin of a different shoal node (dockerd A → node 1, dockerd B → node 2). Dockerd A
# also runs a one-node Swarm. Containers use an image imported from Debian's busybox-static
# and no network. Every scenario prints "ok: …" when it passed; the first failure stops the
# script with "FAIL: …" and the logs' tails.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

for tool in dockerd docker unshare curl ip /bin/busybox; do
  command -v "$tool" >/dev/null || {
    echo "missing: $tool (apt-get install docker.io busybox-static curl util-linux iproute2)" >&2
    exit 1
  }
done

IMG=shoal-busybox
DOCKERD_PIDS=()
DK=""

stop_all() {
  local rc=$?
  set +e
  for name in a b; do
    [ -S "$DK/$name/sock" ] || continue
    # Containers first, so that their volumes are unmounted while shoal still runs.
    if [ "$name" = a ]; then d a swarm leave --force >/dev/null 2>&1; fi
    d "$name" ps -aq 2>/dev/null | xargs -r timeout 60 docker -H "unix://$DK/$name/sock" rm -f >/dev/null 2>&1
  done
  for pid in "${DOCKERD_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${DOCKERD_PIDS[@]}"; do
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  if [ "$rc" != 0 ]; then
    for name in a b; do
      [ -f "$DK/$name/log" ] && { echo "--- dockerd $name log (tail)"; tail -n 20 "$DK/$name/log"; }
    done
    for k in 1 2 3; do
      [ -f "$CLUSTER/node-$k/daemon.log" ] && { echo "--- shoal node $k log (tail)"; tail -n 20 "$CLUSTER/node-$k/daemon.log"; }
    done
  fi
  cluster_down
  # dockerd's own mounts lived in its namespace and went with it; the data dirs can go.
  if [ -n "$DK" ]; then
    umount -l "$DK" 2>/dev/null
    rm -rf "$DK"
  fi
}

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
pass() { echo "ok: $*"; }

# `d NAME args…`: the docker client of dockerd NAME.
d() {
  local name=$1
  shift
  timeout 120 docker -H "unix://$DK/$name/sock" "$@"
}

# Waits up to $1 seconds for the command to succeed.
wait_for() {
  local secs=$1
  shift
  for _ in $(seq 1 $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  "$@"
}

# Starts dockerd NAME in new mount and network namespaces, with the plugin of shoal node K.
dockerd_up() {
  local name=$1 k=$2 dir="$DK/$1"
  mkdir -p "$dir" /etc/docker /run/docker/plugins
  unshare --mount --net --propagation slave -- sh -c '
    set -e
    ip link set lo up
    mount -t tmpfs shoal-ci /etc/docker
    mount -t tmpfs shoal-ci /run/docker/plugins
    mkdir /etc/docker/plugins
    echo "unix://$1" > /etc/docker/plugins/shoal.spec
    exec dockerd --data-root "$2/data" --exec-root "$2/exec" -H "unix://$2/sock" \
      --pidfile "$2/pid" --iptables=false --ip6tables=false --ip-masq=false --bridge=none
  ' sh "$CLUSTER/node-$k/plugin.sock" "$dir" >"$dir/log" 2>&1 &
  DOCKERD_PIDS+=($!)
  wait_for 60 d "$name" info || fail "dockerd $name did not start"
  tar -C "$DK/rootfs" -c . | d "$name" import - "$IMG" >/dev/null
  # The engine looks the plugin up now, before anything needs it (Swarm only places tasks
  # with volume-driver=shoal on engines that reported the plugin).
  d "$name" volume ls >/dev/null
}

# What `docker run` prints on stderr when it fails, for matching error messages.
expect_failure() {
  local what=$1 pattern=$2
  shift 2
  local out
  if out=$("$@" 2>&1); then
    fail "$what: succeeded, expected an error matching '$pattern'"
  fi
  echo "$out" | grep -qiE "$pattern" || fail "$what: error '$out' does not match '$pattern'"
  echo "    $what: $(echo "$out" | grep -iE "$pattern" | head -n 1)"
}

in_every_mount() {
  local path=$1 want=$2
  for k in 1 2 3; do
    local got
    got=$(cat "$CLUSTER/node-$k/mnt/$path" 2>&1) || fail "node $k: reading $path: $got"
    [ "$got" = "$want" ] || fail "node $k: $path holds '$got', expected '$want'"
  done
}

trap stop_all EXIT
DK=$(mktemp -d /tmp/shoal-dk.XXXXXX)
chmod 755 "$DK"
# A host's mounts propagate into dockerd's namespace (systemd makes / shared); here / may be
# private, so the cluster lives in a shared mount of its own. Without it a node's mount made
# after dockerd started (a restarted daemon) would not reach dockerd.
mount --bind "$DK" "$DK"
mount --make-shared "$DK"
CLUSTER="$DK/cluster"
mkdir "$CLUSTER"
"$SHOAL" local up --nodes 3 --dir "$CLUSTER" --base-port $((10000 + RANDOM % 1000 * 10)) >/dev/null
SH="$SHOAL"
shoal1() { "$SH" "$@" --data "$CLUSTER/node-1/data"; }
mkdir -p "$DK"/rootfs/{bin,tmp,etc,proc,sys,dev,data}
cp /bin/busybox "$DK/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$DK/rootfs/bin/$applet"
done
# Debian's busybox has no flock applet: add util-linux's, with the libraries it loads.
cp /usr/bin/flock "$DK/rootfs/bin/flock"
for lib in $(ldd /usr/bin/flock | grep -o '/[^ ]*'); do
  mkdir -p "$DK/rootfs$(dirname "$lib")"
  cp -L "$lib" "$DK/rootfs$lib"
done
dockerd_up a 1
dockerd_up b 2

run_a() { d a run --rm --network none "$@"; }
run_b() { d b run --rm --network none "$@"; }

# --- 1. create with options, write in a container, the bytes on every node ---------------
d a volume create -d shoal -o replicas=2 -o size=1GiB data >/dev/null
run_a -v data:/data "$IMG" sh -c 'echo hi > /data/f'
in_every_mount volumes/data/f hi
d a volume ls --format '{{.Driver}} {{.Name}}' | grep -qx "shoal data" || fail "docker volume ls does not list 'shoal data'"
inspect=$(d a volume inspect data --format '{{.Driver}} {{.Scope}} {{index .Options "replicas"}} {{index .Options "size"}} {{.Status.replicas}}')
[ "$inspect" = "shoal global 2 1GiB 2" ] || fail "docker volume inspect data: '$inspect'"
pass "volume created with replicas=2,size=1GiB; a container's file is on all three nodes; ls/inspect show driver, scope and options"

# --- 2. a writer and a reader on two hosts, symlinks included ----------------------------
run_a -v data:/data "$IMG" sh -c 'mkdir -p /data/dir && echo from-a > /data/dir/a.txt && ln -s dir/a.txt /data/link-a'
got=$(run_b -v data:/data "$IMG" sh -c 'cat /data/link-a && readlink /data/link-a')
[ "$got" = "$(printf 'from-a\ndir/a.txt')" ] || fail "host B read '$got' through A's symlink"
run_b -v data:/data "$IMG" sh -c 'echo from-b > /data/dir/b.txt && ln -s dir/b.txt /data/link-b'
got=$(run_a -v data:/data "$IMG" cat /data/link-b)
[ "$got" = from-b ] || fail "host A read '$got' through B's symlink"
pass "containers on two hosts (two dockerds, nodes 1 and 2) see each other's files and follow each other's symlinks"

# --- 3. removal: refused while mounted elsewhere, then to the trash, the name free, restored --
d b run -d --name holder --network none -v data:/data "$IMG" sleep 600 >/dev/null
expect_failure "docker volume rm while mounted on host B" "in use on .*\(node 2, 127\.0\.0\.1:" d a volume rm data
d b rm -f holder >/dev/null
d a volume rm data >/dev/null
old_id=$(shoal1 volume ls | awk '$1 == "data" && $2 == "trash" {print $3}')
[ -n "$old_id" ] || fail "data is not in the trash: $(shoal1 volume ls)"
# The name is free at once (`docker compose down -v && docker compose up`): a new, empty volume.
got=$(run_a --volume-driver shoal -v data:/data "$IMG" ls -A /data)
[ -z "$got" ] || fail "the re-created data is not empty: $got"
expect_failure "restore over the live name" "restore data --as NEW" shoal1 volume restore data
d a volume rm data >/dev/null
expect_failure "purge of a name with two removed volumes" "say which with --id" shoal1 volume purge data
shoal1 volume restore data --id "$old_id" >/dev/null
got=$(run_a -v data:/data "$IMG" cat /data/f)
[ "$got" = hi ] || fail "restored volume holds '$got'"
shoal1 volume purge data >/dev/null
# `docker volume prune` on a host with no containers, while host A uses the volume.
d a run -d --name holder --network none -v data:/data "$IMG" sleep 600 >/dev/null
d b volume ls --format '{{.Name}}' | grep -qx data || fail "host B does not list data"
d b volume prune --all --force >/dev/null 2>&1 || d b volume prune --force >/dev/null
shoal1 volume ls | grep -E '^data +active' >/dev/null || fail "prune on host B removed data: $(shoal1 volume ls)"
[ "$(cat "$CLUSTER/node-2/mnt/volumes/data/f")" = hi ] || fail "data lost its file after a prune on host B"
d a rm -f holder >/dev/null
pass "rm refused while host B uses it (names its host and node 2); after that it goes to the trash and its name is free for a new empty volume; purge asks which of two; restore --id brings back the bytes; a prune on a host without containers leaves a volume used elsewhere"

# --- 4. quota ------------------------------------------------------------------------------
d a volume create -d shoal -o size=1MiB small >/dev/null
expect_failure "writing 2 MiB into a 1 MiB volume" "quota" \
  run_a -v small:/d "$IMG" dd if=/dev/zero of=/d/big bs=64k count=32
df=$(run_a -v small:/d "$IMG" df -kP /d | awk 'NR==2 {print $2}')
[ "$df" = 1024 ] || fail "df in the container shows $df KiB, expected the 1024 KiB quota"
run_a -v data:/data "$IMG" dd if=/dev/zero of=/data/two-mib bs=64k count=32 2>/dev/null
[ "$(stat -c %s "$CLUSTER/node-3/mnt/volumes/data/two-mib")" = 2097152 ] || fail "2 MiB in volume data did not land"
pass "a 1 MiB quota fails the write past it with EDQUOT in the container, df shows 1024 KiB, another volume takes 2 MiB"

# --- 5. bad input ------------------------------------------------------------------------
expect_failure "unknown option" "unknown option \"colour\"; valid options are replicas" d a volume create -d shoal -o colour=blue x1
expect_failure "bad replicas value" "replicas=\"two\" is not a number" d a volume create -d shoal -o replicas=two x2
expect_failure "more replicas than nodes" "replicas=5 but the cluster has 3 node" d a volume create -d shoal -o replicas=5 x3
expect_failure "placement nobody matches" "no node matches placement=storage==ssd" d a volume create -d shoal -o placement=storage==ssd x4
expect_failure "clone of a missing volume" "cannot clone volume nope into x5: no such volume" d a volume create -d shoal -o from=nope x5
expect_failure "invalid name" "invalid volume name" d a volume create -d shoal 'bad,name'
sock="$CLUSTER/node-1/plugin.sock"
post() { curl -s --max-time 10 --unix-socket "$sock" -H 'Content-Type: application/json' -d "$2" "http://shoal/VolumeDriver.$1"; }
for req in 'Create {not json' 'Create {"Name":""}' 'Create {"Name":7}' 'Mount {"Name":"nope","ID":"x"}' \
  'Remove {"Name":"../etc"}' 'Path {}' 'Unmount {"Name":"nope","ID":"x"}'; do
  out=$(post "${req%% *}" "${req#* }")
  echo "$out" | grep -q '"Err":"[^"]' || fail "plugin request '$req' got '$out', expected an error"
  echo "    $req → $out"
done
[ "$(post List '')" != "" ] || fail "the plugin stopped answering after bad requests"
shoal1 node ls >/dev/null || fail "node 1 is not healthy after bad requests"
pass "bad names, options, replica counts, placements and malformed plugin requests get clear errors; the daemon keeps serving"

# --- 6. Swarm: one volume per task slot -------------------------------------------------
d a swarm init --advertise-addr 127.0.0.1 >/dev/null
service() { d a service create --detach --no-resolve-image --quiet "$@" >/dev/null; }
running() { [ "$(d a service ps "$1" --filter desired-state=running --format '{{.CurrentState}}' | grep -c '^Running')" = "$2" ]; }
slot_mount='type=volume,volume-driver=shoal,source={{.Service.Name}}-{{.Task.Slot}}-vol,destination=/data'
service --name slots --replicas 3 --env 'SLOT={{.Task.Slot}}' --mount "$slot_mount" "$IMG" \
  sh -c 'echo $SLOT > /data/slot; sleep 600'
wait_for 120 running slots 3 || fail "the slots service did not get 3 running tasks: $(d a service ps slots)"
for s in 1 2 3; do
  wait_for 30 test -f "$CLUSTER/node-2/mnt/volumes/slots-$s-vol/slot" || fail "slot $s wrote nothing"
  in_every_mount "volumes/slots-$s-vol/slot" "$s"; done
d a service rm slots >/dev/null
wait_for 60 sh -c "[ -z \"\$(docker -H unix://$DK/a/sock ps -q)\" ]" || fail "the slots tasks did not stop"
service --name slots --replicas 3 --env 'SLOT={{.Task.Slot}}' --mount "$slot_mount" "$IMG" \
  sh -c '[ "$(cat /data/slot)" = "$SLOT" ] && echo found > /data/again; sleep 600'
wait_for 120 running slots 3 || fail "the second slots service did not run: $(d a service ps slots)"
for s in 1 2 3; do wait_for 30 test -f "$CLUSTER/node-3/mnt/volumes/slots-$s-vol/again" || fail "slot $s did not find its own file"; done
d a service rm slots >/dev/null
pass "a Swarm service with {{.Service.Name}}-{{.Task.Slot}}-vol gets one volume per slot, and a new service finds each slot's file in its slot"

# --- 7. one shared volume, appends under flock from 3 tasks and a container on host B -----
d a volume create -d shoal shared >/dev/null
append='for i in $(seq 1 40); do flock /data/lock sh -c "echo $ME-$i >> /data/log"; done; touch /data/done-$ME'
service --name appenders --replicas 3 --env 'ME=task{{.Task.Slot}}' \
  --mount type=volume,volume-driver=shoal,source=shared,destination=/data "$IMG" sh -c "$append; sleep 600"
run_b -v shared:/data -e ME=hostb "$IMG" sh -c "$append"
for me in task1 task2 task3 hostb; do
  wait_for 120 test -f "$CLUSTER/node-1/mnt/volumes/shared/done-$me" || fail "$me did not finish appending"
done
log="$CLUSTER/node-3/mnt/volumes/shared/log"
[ "$(wc -l < "$log")" = 160 ] || fail "the shared log has $(wc -l < "$log") lines, expected 160"
[ "$(sort -u "$log" | wc -l)" = 160 ] || fail "the shared log has repeated lines"
for me in task1 task2 task3 hostb; do
  [ "$(grep -c "^$me-" "$log")" = 40 ] || fail "$me has $(grep -c "^$me-" "$log") lines in the log"
done
d a service rm appenders >/dev/null
pass "3 Swarm tasks (node 1) and a container on host B (node 2) appended 160 lines under flock to one file: each exactly once"

# The pid of node K's daemon: the process holding its data directory's lock (a daemon that
# handed its mount over is not the one `local up` started).
daemon_pid() {
  local ino
  ino=$(stat -c %i "$CLUSTER/node-$1/data/LOCK")
  awk -v ino="$ino" '$2 == "FLOCK" { n = split($6, f, ":"); if (f[n] == ino) { print $5; exit } }' /proc/locks
}

# --- 8. the shoal daemon reloads (SIGHUP) twice under a running container -----------------------
# The container holds a flock on its volume and appends a numbered line every 20 ms with an
# fsync; any error ends it. Its node's daemon hands the mount to a successor twice.
d b run -d --name steady --network none -v data:/data "$IMG" \
  flock /data/steady.lock sh -c 'i=0; while :; do i=$((i+1)); echo $i >> /data/steady || exit 1; sync /data/steady || exit 1; ls /data >/dev/null || exit 1; sleep 0.02; done' >/dev/null
steady="$CLUSTER/node-1/mnt/volumes/data/steady"
wait_for 30 sh -c "[ -s $steady ] && [ \$(wc -l < $steady) -ge 20 ]" || fail "the steady container does not write"
for round in 1 2; do
  pid=$(daemon_pid 2)
  kill -HUP "$pid"
  wait_for 60 sh -c "! kill -0 $pid 2>/dev/null" || fail "node 2's daemon (pid $pid) did not hand over after SIGHUP"
  new=$(daemon_pid 2)
  [ -n "$new" ] && [ "$new" != "$pid" ] || fail "no successor holds node 2's data directory"
  before=$(wc -l < "$steady")
  wait_for 30 sh -c "[ \$(wc -l < $steady) -ge $((before + 20)) ]" || fail "the container stopped writing after hand-over $round: $(d b logs steady 2>&1 | tail -3)"
  echo "    hand-over $round: node 2's daemon $pid -> $new, the container wrote on"
done
[ "$(d b inspect -f '{{.State.Running}}' steady)" = true ] || fail "the steady container ended: $(d b logs steady 2>&1 | tail -3)"
d a run --rm --network none -v data:/data "$IMG" flock -n /data/steady.lock true 2>/dev/null \
  && fail "host A took the flock the container on host B holds"
d b rm -f steady >/dev/null
# Read on node 2, where it was written, once the writer is gone.
steady="$CLUSTER/node-2/mnt/volumes/data/steady"
n=$(wc -l < "$steady")
[ "$(seq 1 "$n" | cmp - "$steady" 2>&1)" = "" ] || fail "the container's lines are not 1..$n: $(seq 1 "$n" | cmp - "$steady" 2>&1)" 
pass "node 2's daemon handed its mount over twice (SIGHUP) under a running container: it kept writing, its flock held against host A, $n lines in order"

# --- 9. the shoal daemon stops and starts under a running container -------------------------
d b run -d --name runner --network none -v data:/data "$IMG" sleep 600 >/dev/null
pid=$(daemon_pid 2)
kill -TERM "$pid"
wait_for 30 sh -c "! kill -0 $pid"
"$SH" local up --nodes 3 --dir "$CLUSTER" >/dev/null
seen=$(d b exec runner ls /data 2>&1) && fail "a running container saw '$seen' after its node's daemon restarted"
echo "$seen" | grep -q "not connected" || fail "the running container got '$seen', expected ENOTCONN"
echo "    running container after its node's daemon restarted: $seen"
d b volume ls --format '{{.Name}}' | grep -qx data || fail "docker volume ls on host B lost data after the restart"
got=$(run_b -v data:/data "$IMG" cat /data/f)
[ "$got" = hi ] || fail "a container started after the restart reads '$got'"
d b rm -f runner >/dev/null
pass "after node 2's daemon stops and starts, Docker's List/Mount/Path work and new containers see the data; a container that was running gets ENOTCONN, never an empty directory"

# --- 10. a Swarm task with a healthcheck is replaced after its node's daemon restarts --------
d a volume create -d shoal beats >/dev/null
service --name beater --replicas 1 --health-cmd 'ls /data >/dev/null' --health-interval 1s \
  --health-retries 1 --health-timeout 2s --health-start-period 1s \
  --mount type=volume,volume-driver=shoal,source=beats,destination=/data "$IMG" \
  sh -c 'while :; do date +%s >> /data/beat; sleep 1; done'
beats="$CLUSTER/node-3/mnt/volumes/beats/beat"
wait_for 60 sh -c "[ \$(wc -l < $beats) -ge 3 ]" || fail "the beater task does not write"
pid=$(daemon_pid 1)
stopped=$(date +%s)
kill -TERM "$pid"
wait_for 30 sh -c "! kill -0 $pid"
"$SH" local up --nodes 3 --dir "$CLUSTER" >/dev/null
restarted=$(date +%s)
wait_for 120 sh -c "[ \$(tail -n 1 $beats) -gt $restarted ]" || fail "no task wrote again after node 1's daemon restarted: $(d a service ps beater)"
gap=$(awk 'NR > 1 && $1 - prev > max { max = $1 - prev } { prev = $1 } END { print max }' "$beats")
echo "    node 1's daemon down for $((restarted - stopped)) s; longest gap between heartbeats: $gap s"
d a service rm beater >/dev/null
pass "a Swarm task with a healthcheck on its volume is replaced after its node's daemon restarts: heartbeats resumed after a ${gap} s gap"

echo "docker scenarios passed"
