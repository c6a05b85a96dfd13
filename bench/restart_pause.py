#!/usr/bin/env python3
"""How long processes using a mount wait while its node's daemon restarts without unmounting.

Usage (root, from the repository root, release build in target/release):
    bench/restart_pause.py [--rounds 5] [--dir /var/tmp]

A three-node `shoal local up` cluster. A probe thread on each node's mount loops: append 64
bytes to a file, fsync, stat. Each round restarts node K's daemon one way and records the
longest probe operation around it on node K (the pause its processes see) and on the other
nodes, and every error (a probe reopens its file after one):
- `reload, follower`: SIGHUP to a node that is not the Raft leader (`systemctl reload`): the
  daemon hands its FUSE connection to the successor it starts.
- `reload, leader`: the same on the leader's node; the others elect a new leader meanwhile.
- `kill -9, fd store`: kill -9 of a follower's daemon, restarted at once with the connection
  this script kept for it, the way systemd's fd store does (the unit waits RestartSec=2s first,
  which adds to the pause).
Prints a Markdown table and writes it to bench/results/<date>-restart-pause.md.
"""
import argparse
import array
import datetime
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import multiprocessing
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from localcluster import status  # noqa: E402
from scale import SHOAL, REPO, free_port_base  # noqa: E402


def lock_holder(data):
    """The pid holding DATA/LOCK (the node's daemon), from /proc/locks."""
    ino = os.stat(os.path.join(data, "LOCK")).st_ino
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(ino):
                return int(fields[4])
    return None


def probe_loop(path, stop, conn):
    """Appends, fsyncs and stats in a loop until `stop` is set; sends [(start, seconds, error)].
    A process of its own: the process restarting daemons must hold no file of the mount (its
    children would close it at exec, which waits for the daemon being restarted)."""
    ops, fd = [], None
    while not stop.is_set():
        t = time.time()
        err = None
        try:
            if fd is None:
                fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            os.write(fd, b"x" * 63 + b"\n")
            os.fsync(fd)
            os.stat(path)
        except OSError as e:
            err = e.strerror
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            fd = None
        ops.append((t, time.time() - t, err))
        time.sleep(0.005)
    conn.send(ops)


class Probe:
    def __init__(self, path):
        self.stop = multiprocessing.Event()
        self.recv, send = multiprocessing.Pipe(duplex=False)
        self.proc = multiprocessing.Process(target=probe_loop, args=(path, self.stop, send))
        self.proc.start()
        self.ops = []

    def finish(self):
        self.stop.set()
        self.ops = self.recv.recv()
        self.proc.join()


class FdStore(threading.Thread):
    """The fake service manager's notify socket: keeps the latest fd each mount stored."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.fds = {}  # fd name → fd
        self.cond = threading.Condition()

    def run(self):
        while True:
            msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
            text = msg.decode()
            names = [l[7:] for l in text.splitlines() if l.startswith("FDNAME=")]
            if fds and "FDSTORE=1" in text and names:
                with self.cond:
                    old = self.fds.get(names[0])
                    self.fds[names[0]] = fds[0]
                    if old is not None:
                        os.close(old)
                    self.cond.notify_all()
                fds = fds[1:]
            for fd in fds:
                os.close(fd)

    def wait(self, n):
        with self.cond:
            self.cond.wait_for(lambda: len(self.fds) >= n, timeout=60)

    def get(self, dev):
        with self.cond:
            name = f"fuse-{dev}"
            return self.fds[name], name


def leader(shoal, d):
    for _ in range(100):
        s = status(shoal, d, 1)
        if s and s.get("leader"):
            return s["leader"]
        time.sleep(0.1)
    raise SystemExit("no leader")


def wait_successor(shoal, d, k, old):
    data = f"{d}/node-{k}/data"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            new = lock_holder(data)
        except OSError:
            new = None
        if new and new != old and status(shoal, d, k):
            return new
        time.sleep(0.01)
    raise SystemExit(f"node {k}: no successor within 60 s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--shoal", default=SHOAL)
    ap.add_argument("--cases", default="reload, follower;reload, leader;kill -9, fd store",
                    help="which cases, separated by ';'")
    args = ap.parse_args()
    shoal = args.shoal
    if os.geteuid() != 0:
        raise SystemExit("bench/restart_pause.py: run as root (FUSE mounts)")
    if not os.path.exists(shoal):
        subprocess.run(["cargo", "build", "--release", "-p", "shoal-fs", "--bin", "shoal"],
                       check=True, cwd=REPO)
    d = tempfile.mkdtemp(prefix="shoal-restart.", dir=args.dir)
    base = free_port_base(30)
    notify_path = os.path.join(d, "notify.sock")
    store = FdStore(notify_path)
    store.start()
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    up = [shoal, "local", "up", "--nodes", "3", "--dir", d, "--base-port", str(base)]
    subprocess.run(up, check=True, stdout=subprocess.DEVNULL, env=env)
    rows = []
    children = []
    try:
        store.wait(3)
        for case in args.cases.split(";"):
            pauses, others, errors, baseline = [], [], 0, []
            for r in range(args.rounds):
                lead = leader(shoal, d)
                k = lead if case == "reload, leader" else (lead % 3) + 1
                mnt = f"{d}/node-{k}/mnt"
                # One probe on each node: the restarted one, and the others.
                probes = {j: Probe(f"{d}/node-{j}/mnt/probe-{j}") for j in (1, 2, 3)}
                time.sleep(1.0)
                old = lock_holder(f"{d}/node-{k}/data")
                t0 = time.time()
                if case.startswith("reload"):
                    os.kill(old, signal.SIGHUP)
                else:
                    cmd = open(f"/proc/{old}/cmdline", "rb").read().split(b"\0")[:-1]
                    dev = str(os.stat(mnt).st_dev)
                    fd, name = store.get(dev)
                    os.kill(old, signal.SIGKILL)
                    while os.path.exists(f"/proc/{old}") and open(f"/proc/{old}/stat").read().split(") ")[1][0] not in "ZX":
                        time.sleep(0.001)
                    log = open(f"{d}/node-{k}/daemon.log", "ab")
                    child = subprocess.Popen(
                        ["python3", "-c",
                         "import os,sys; os.dup2(int(sys.argv[1]), 3); "
                         "os.environ['LISTEN_PID'] = str(os.getpid()); "
                         "os.execvp(sys.argv[2], sys.argv[2:])", str(fd)] + [c.decode() for c in cmd],
                        env=dict(env, LISTEN_FDS="1", LISTEN_FDNAMES=name),
                        stdout=log, stderr=log, stdin=subprocess.DEVNULL, pass_fds=[fd])
                    children.append(child)
                wait_successor(shoal, d, k, old)
                time.sleep(1.5)
                for p in probes.values():
                    p.finish()

                def longest(ops):
                    around = [s for (t, s, e) in ops if t >= t0 - 0.1]
                    return max(around, default=0.0)

                probe = probes[k]
                baseline += [s for (t, s, e) in probe.ops if t < t0 - 0.1 and not e]
                pauses.append(longest(probe.ops))
                others.append(max(longest(probes[j].ops) for j in probes if j != k))
                errs = [(j, round(t - t0, 3), e) for j, p in probes.items() for (t, s, e) in p.ops if e]
                errors += len(errs)
                if errs:
                    print(f"{case} round {r}: errors {errs}")
            rows.append((case, args.rounds, statistics.median(baseline) * 1000,
                         statistics.median(pauses) * 1000, max(pauses) * 1000,
                         statistics.median(others) * 1000, max(others) * 1000, errors))
    finally:
        subprocess.run([shoal, "local", "down", "--dir", d], stdout=subprocess.DEVNULL)
        for c in children:
            c.wait()
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                         text=True, cwd=REPO).stdout.strip()
    lines = [
        f"Restart pause, 3 nodes on loopback, {args.rounds} rounds per case, shoal {rev} "
        f"({datetime.datetime.now():%Y-%m-%d %H:%M}). Probe: append 64 B + fsync + stat in a loop.",
        "",
        "| case | rounds | op p50 before (ms) | longest op on the restarted node: median / max (ms) "
        "| longest op on the other nodes: median / max (ms) | errors (all probes) |",
        "|---|---|---|---|---|---|",
    ]
    for case, n, p50, med, mx, omed, omx, errs in rows:
        lines.append(f"| {case} | {n} | {p50:.1f} | {med:.0f} / {mx:.0f} | {omed:.0f} / {omx:.0f} | {errs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(REPO, "bench", "results",
                       f"{datetime.datetime.now():%Y-%m-%d-%H%M}-restart-pause.md")
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
