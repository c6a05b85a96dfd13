#!/usr/bin/env python3
"""What one node down costs the others: write+fsync latency on a three-node cluster.

Usage: bench/node_down.py [--shoal PATH] [--ops N] [--size BYTES]

Starts its own `shoal local up --nodes 3` in a temp dir (random ports on 127.0.0.1), writes
N files of SIZE bytes with fsync from a follower's mount and times each
create+write+fsync+close:
  healthy      all three nodes up
  frozen       another follower stopped with SIGSTOP (alive to the kernel, silent on the
               network: what a partition or a stalled host looks like)
  killed       the same follower killed with SIGKILL, before its session lease ends
  after lease  the same, once its lease has ended (more than 5 s later)
  leader killed  the leader killed; a follower's first write+fsync started right after
and how long the killed follower takes to serve again when restarted. Then stops the cluster. Each operation is bounded (60 s); the run takes about a minute.
"""
import argparse, os, random, signal, statistics, subprocess, sys, tempfile, time

import localcluster

p = argparse.ArgumentParser()
p.add_argument("--shoal", default="target/release/shoal")
p.add_argument("--ops", type=int, default=100)
p.add_argument("--size", type=int, default=64 * 1024)
a = p.parse_args()
shoal = os.path.abspath(a.shoal)
d = tempfile.mkdtemp(prefix="shoal-node-down.")
base = str(20000 + random.randrange(0, 2000) * 10)


def up():
    subprocess.run([shoal, "local", "up", "--nodes", "3", "--dir", d, "--base-port", base],
                   check=True, capture_output=True, timeout=120)


def status(k):
    return localcluster.status(shoal, d, k)


def pid(k):
    return int(open(f"{d}/node-{k}/daemon.pid").read())


def leader():
    for _ in range(300):
        s = status(1)
        if s and s.get("leader"):
            return s["leader"]
        time.sleep(0.1)
    raise SystemExit("no leader")


body = os.urandom(a.size)
seq = 0


def one_write(k):
    """Creates a file on node k, writes it, fsyncs, closes: returns milliseconds."""
    global seq
    seq += 1
    path = f"{d}/node-{k}/mnt/f{seq}"
    t = time.monotonic()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, body[:8] + seq.to_bytes(8, "little") + body[16:])
    os.fsync(fd)
    os.close(fd)
    ms = (time.monotonic() - t) * 1000
    if ms > 60_000:
        raise SystemExit(f"a write took {ms:.0f} ms")
    return ms


def phase(name, n):
    times = [one_write(writer) for _ in range(n)]
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    row = (name, len(times), statistics.median(times), p99, times[-1])
    print(f"{name:12} {row[1]:4} ops  p50 {row[2]:8.1f} ms  p99 {row[3]:8.1f} ms  max {row[4]:8.1f} ms",
          flush=True)
    return row


rows = []
try:
    up()
    lead = leader()
    writer, victim = [k for k in (1, 2, 3) if k != lead]
    print(f"leader is node {lead}; writing from node {writer}; node {victim} is the follower taken down",
          flush=True)
    phase("warm-up", 10)
    rows.append(phase("healthy", a.ops))
    os.kill(pid(victim), signal.SIGSTOP)
    try:
        rows.append(phase("frozen", a.ops))
    finally:
        os.kill(pid(victim), signal.SIGCONT)
    time.sleep(2)
    victim_pid = pid(victim)
    os.kill(victim_pid, signal.SIGKILL)
    rows.append(phase("killed", a.ops))
    time.sleep(6)
    rows.append(phase("after lease", a.ops))
    t = time.monotonic()
    up()
    restart = (time.monotonic() - t) * 1000
    print(f"restart      node {victim} killed, started again and serving after {restart:.0f} ms", flush=True)
    time.sleep(2)
    lead = leader()
    writer = next(k for k in (1, 2, 3) if k != lead)
    os.kill(pid(lead), signal.SIGKILL)
    first = one_write(writer)
    rows.append(("leader killed", 1, first, first, first))
    print(f"leader kill  node {writer}'s first write+fsync after killing the leader (node {lead}): "
          f"{first:.1f} ms", flush=True)
    print()
    print(f"| a follower writes {a.size // 1024} KiB + fsync | ops | p50 | p99 | max |")
    print("|---|---|---|---|---|")
    for name, n, p50, p99, mx in rows:
        print(f"| {name} | {n} | {p50:.1f} ms | {p99:.1f} ms | {mx:.1f} ms |")
    print(f"\nrestart of the killed follower (`shoal local up` until it serves): {restart:.0f} ms")
finally:
    subprocess.run([shoal, "local", "down", "--dir", d], capture_output=True, timeout=120)
    subprocess.run(["rm", "-rf", d])
