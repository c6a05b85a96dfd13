#!/usr/bin/env python3
"""Metadata at scale: how create, stat, readdir and unlink rates, a node's memory and its Raft
snapshot grow with the number of files, on a one-node `shoal local up` cluster.

Usage (root, from the repository root, release build in target/release):
    bench/scale.py [--sizes 10000,100000,1000000] [--dir /var/tmp] [--workers 4]

Files are empty and created by WORKERS processes at once, each in directories of its own of
10,000 files. At each size S the script measures, on the cluster grown to S files:
  create     files/s of the last 10,000 creates before reaching S (all workers);
  create 1   median latency of 500 creates by one process (a create is one Raft entry:
             flush, apply, reply), and its 99th percentile;
  stat       stats/s of 10,000 random existing files, after the kernel's caches are dropped
             (so each is a lookup answered by the daemon);
  readdir    entries/s listing 10 directories of 10,000 entries, caches dropped;
  unlink     unlinks/s of 5,000 random files (one process; they are created again after);
  rss        the daemon's resident memory, and its growth per inode since the previous size;
  metadata   the size of the metadata database on disk.
At the largest size it also adds a second node and measures the snapshot the leader sends it
(bytes, from the new node's log) and the time until the new node has applied everything.
Prints a Markdown table and writes it, with a CSV, to bench/results/<date>-scale.{md,csv}.
"""
import argparse
import csv
import datetime
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import localcluster  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOAL = os.path.join(REPO, "target", "release", "shoal")
PER_DIR = 10_000


def free_port_base(n):
    for _ in range(50):
        base = random.randrange(20000, 60000, 10)
        ok = True
        for p in range(base, base + n):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("no free ports")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def path_of(mnt, worker, i):
    return os.path.join(mnt, f"w{worker}", f"d{i // PER_DIR:04}", f"f{i:07}")


def create_range(mnt, worker, start, end):
    for i in range(start, end):
        if i % PER_DIR == 0 or i == start:
            os.makedirs(os.path.dirname(path_of(mnt, worker, i)), exist_ok=True)
        os.close(os.open(path_of(mnt, worker, i), os.O_CREAT | os.O_WRONLY, 0o644))


def grow(mnt, workers, have, want):
    """Each worker creates its share of files [have, want); returns the seconds it took."""
    per_have, per_want = have // workers, want // workers
    procs = [Process(target=create_range, args=(mnt, w, per_have, per_want)) for w in range(workers)]
    t = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a creator failed (exit {p.exitcode})")
    return time.monotonic() - t


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def measure(mnt, workers, size, pid, data):
    per = size // workers
    sample = [(random.randrange(workers), random.randrange(per)) for _ in range(10_000)]
    drop_caches()
    t = time.monotonic()
    for w, i in sample:
        os.stat(path_of(mnt, w, i))
    stat_rate = len(sample) / (time.monotonic() - t)

    dirs = sorted({os.path.dirname(path_of(mnt, w, i)) for w, i in sample})[:10]
    drop_caches()
    t = time.monotonic()
    entries = sum(len(os.listdir(d)) for d in dirs)
    readdir_rate = entries / (time.monotonic() - t)

    lat = []
    extra = os.path.join(mnt, "latency")
    os.makedirs(extra, exist_ok=True)
    for i in range(500):
        p = os.path.join(extra, f"s{size}-{i}")
        t = time.monotonic()
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        lat.append(time.monotonic() - t)
    for i in range(500):
        os.unlink(os.path.join(extra, f"s{size}-{i}"))
    lat.sort()

    victims = list(dict.fromkeys(sample))[:5000]
    t = time.monotonic()
    for w, i in victims:
        os.unlink(path_of(mnt, w, i))
    unlink_rate = len(victims) / (time.monotonic() - t)
    for w, i in victims:
        os.close(os.open(path_of(mnt, w, i), os.O_CREAT | os.O_WRONLY, 0o644))

    return {
        "stat": stat_rate,
        "readdir": readdir_rate,
        "unlink": unlink_rate,
        "create1_p50_ms": lat[len(lat) // 2] * 1e3,
        "create1_p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
        "rss": rss_bytes(pid),
        "metadata": du(os.path.join(data, "meta")),
    }


def add_node(d, base, leader_status):
    """Adds node 2; returns (snapshot bytes it installed, seconds until it applied everything)."""
    target = leader_status["last_applied"]
    t = time.monotonic()
    subprocess.run([SHOAL, "local", "up", "--nodes", "2", "--dir", d, "--base-port", str(base)],
                   check=True, stdout=subprocess.DEVNULL)
    while True:
        s = localcluster.status(SHOAL, d, 2)
        if s and (s.get("last_applied") or 0) >= target:
            break
        if time.monotonic() - t > 1800:
            raise SystemExit("node 2 never caught up")
        time.sleep(0.2)
    took = time.monotonic() - t
    log = open(os.path.join(d, "node-2", "daemon.log")).read()
    sizes = [int(m.group(1)) for line in log.splitlines() if "installed a snapshot" in line
             for m in [re.search(r"bytes=(\d+)", line)] if m]
    return (max(sizes) if sizes else None), took


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--no-join", action="store_true", help="skip adding a second node at the end")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        raise SystemExit("bench/scale.py: run as root (FUSE mounts, drop_caches)")
    if not os.path.exists(SHOAL):
        subprocess.run(["cargo", "build", "--release", "-p", "shoal-fs", "--bin", "shoal"], check=True, cwd=REPO)

    d = tempfile.mkdtemp(prefix="shoal-scale.", dir=args.dir)
    base = free_port_base(30)
    subprocess.run([SHOAL, "local", "up", "--nodes", "1", "--dir", d, "--base-port", str(base)],
                   check=True, stdout=subprocess.DEVNULL)
    mnt = os.path.join(d, "node-1", "mnt")
    data = os.path.join(d, "node-1", "data")
    pid = int(open(os.path.join(d, "node-1", "daemon.pid")).read())
    rows = []
    try:
        have = 0
        rss_before, inodes_before = rss_bytes(pid), 0
        started = time.monotonic()
        for size in sizes:
            if size - have > 10_000:
                grow(mnt, args.workers, have, size - 10_000)
                have = size - 10_000
            secs = grow(mnt, args.workers, have, size)
            create_rate = (size - have) / secs
            have = size
            r = measure(mnt, args.workers, size, pid, data)
            r["size"] = size
            r["create"] = create_rate
            r["rss_per_inode"] = (r["rss"] - rss_before) / max(1, size - inodes_before)
            rss_before, inodes_before = r["rss"], size
            r["elapsed_s"] = time.monotonic() - started
            rows.append(r)
            print(f"{size:>9} files: create {create_rate:,.0f}/s, stat {r['stat']:,.0f}/s, "
                  f"readdir {r['readdir']:,.0f}/s, unlink {r['unlink']:,.0f}/s, "
                  f"create p50 {r['create1_p50_ms']:.2f} ms p99 {r['create1_p99_ms']:.2f} ms, "
                  f"rss {human(r['rss'])} (+{r['rss_per_inode']:.0f} B/inode), "
                  f"metadata {human(r['metadata'])}, {r['elapsed_s']:.0f} s in", flush=True)
        snap = None
        if not args.no_join:
            st = localcluster.status(SHOAL, d, 1)
            try:
                snap = add_node(d, base, st)
                print(f"new node: snapshot {human(snap[0]) if snap[0] else 'not logged'}, caught up in {snap[1]:.1f} s", flush=True)
            except subprocess.CalledProcessError as e:
                snap = None
                print(f"adding a node failed: {e}", flush=True)
    finally:
        subprocess.run([SHOAL, "local", "down", "--dir", d], stdout=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = os.path.join(REPO, "bench", "results", f"{stamp}-scale")
    lines = [
        "| files | create/s (4 procs) | create latency p50 / p99 | stat/s (cold) | readdir entries/s (cold) | unlink/s | daemon RSS | RSS growth per inode | metadata on disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']:,} | {r['create']:,.0f} | {r['create1_p50_ms']:.2f} / {r['create1_p99_ms']:.2f} ms | "
            f"{r['stat']:,.0f} | {r['readdir']:,.0f} | {r['unlink']:,.0f} | {human(r['rss'])} | "
            f"{r['rss_per_inode']:.0f} B | {human(r['metadata'])} |"
        )
    if snap:
        lines.append("")
        lines.append(f"A second node joined at {sizes[-1]:,} files: snapshot "
                     f"{human(snap[0]) if snap[0] else '(size not logged)'}, applied everything "
                     f"{snap[1]:.1f} s after `shoal local up --nodes 2`.")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    with open(out + ".md", "w") as f:
        f.write(table)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"written {out}.md and .csv")


if __name__ == "__main__":
    main()
