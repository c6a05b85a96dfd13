#!/usr/bin/env python3
"""Election time after a leader is killed with SIGKILL, on a `shoal local up` cluster.

Usage: bench/election.py SHOAL_BINARY CLUSTER_DIR BASE_PORT [ROUNDS]
Each round kills the current leader, measures until another node reports a new leader,
restarts the killed node with `shoal local up`, and waits until it is back. Bounded: a round
that takes longer than 30 s fails the run.
"""
import os, signal, statistics, subprocess, sys, time

import localcluster

shoal, d, base = sys.argv[1], sys.argv[2], sys.argv[3]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
nodes = sorted(int(n.split("-")[1]) for n in os.listdir(d) if n.startswith("node-"))


def status(k):
    return localcluster.status(shoal, d, k)


times = []
for r in range(rounds):
    s = status(nodes[0]) or status(nodes[1])
    leader = s["leader"]
    pid = int(open(f"{d}/node-{leader}/daemon.pid").read())
    other = next(k for k in nodes if k != leader)
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while True:
        s = status(other)
        if s and s["leader"] not in (None, leader):
            break
        if time.monotonic() - start > 30:
            raise SystemExit("no new leader within 30 s")
        time.sleep(0.01)
    ms = (time.monotonic() - start) * 1000
    times.append(ms)
    print(f"round {r + 1}: killed leader {leader}, node {s['leader']} leads after {ms:.0f} ms", flush=True)
    subprocess.run([shoal, "local", "up", "--nodes", str(len(nodes)), "--dir", d, "--base-port", base],
                   check=True, capture_output=True, timeout=90)
print(f"election after a leader kill: median {statistics.median(times):.0f} ms, max {max(times):.0f} ms")
