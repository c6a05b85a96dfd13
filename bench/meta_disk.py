#!/usr/bin/env python3
"""What small fsyncs cost on the metadata disk: how big each node's metadata database
(DATA/meta: the Raft log, the state machine, its snapshot) grows while applications write and
fsync small files for a while, and what it comes back to once they stop.

Usage (root, from the repository root, release build in target/release):
    bench/meta_disk.py [--nodes 3] [--seconds 120] [--size 16384] [--writers 3] [--dir /var/tmp]

WRITERS processes, spread over the nodes' mounts, each loop: create a file of SIZE bytes,
fsync it, close it, and delete the file it wrote 100 files earlier, so the live data stays
small (100 files per writer) while the bytes written grow: the pattern of temporary files, a
mail spool or a queue. Every 2 s the script records the size of every node's DATA/meta; after
the writers stop it waits SETTLE seconds (the small commits are written out as block files and
the log compacted) and records it again. Prints a Markdown table and writes it to
bench/results/<date>-meta-disk.md.
"""
import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Process, Value

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import SHOAL, REPO, du, free_port_base, human  # noqa: E402

KEEP = 100


def writer(mnt, w, size, until, count):
    d = os.path.join(mnt, f"w{w}")
    os.makedirs(d, exist_ok=True)
    data = os.urandom(size)
    i = 0
    while time.time() < until:
        p = os.path.join(d, f"f{i:08}")
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data[i % 64:] + data[: i % 64])
        os.fsync(fd)
        os.close(fd)
        if i >= KEEP:
            os.unlink(os.path.join(d, f"f{i - KEEP:08}"))
        i += 1
        with count.get_lock():
            count.value += 1


def meta_sizes(d, nodes):
    return [du(os.path.join(d, f"node-{k}", "data", "meta")) for k in range(1, nodes + 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--settle", type=int, default=60)
    ap.add_argument("--size", type=int, default=16 << 10)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--shoal", default=SHOAL, help="the binary to run (default: the release build)")
    ap.add_argument("--label", help="what the binary is, for the table (default: git describe)")
    args = ap.parse_args()
    shoal = args.shoal
    if os.geteuid() != 0:
        raise SystemExit("bench/meta_disk.py: run as root (FUSE mounts)")
    if not os.path.exists(shoal):
        subprocess.run(["cargo", "build", "--release", "-p", "shoal-fs", "--bin", "shoal"],
                       check=True, cwd=REPO)
    d = tempfile.mkdtemp(prefix="shoal-meta-disk.", dir=args.dir)
    base = free_port_base(10 * args.nodes)
    subprocess.run([shoal, "local", "up", "--nodes", str(args.nodes), "--dir", d,
                    "--base-port", str(base)], check=True, stdout=subprocess.DEVNULL)
    count = Value("q", 0)
    samples = []
    try:
        start = meta_sizes(d, args.nodes)
        until = time.time() + args.seconds
        procs = [Process(target=writer, args=(os.path.join(d, f"node-{w % args.nodes + 1}", "mnt"),
                                              w, args.size, until, count))
                 for w in range(args.writers)]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        while any(p.is_alive() for p in procs):
            time.sleep(2)
            sizes = meta_sizes(d, args.nodes)
            samples.append((time.monotonic() - t0, count.value, sizes))
            print(f"{samples[-1][0]:6.0f} s  {count.value:>7} files  metadata "
                  + " ".join(human(s) for s in sizes), flush=True)
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"a writer failed (exit {p.exitcode})")
        written = count.value
        time.sleep(args.settle)
        end = meta_sizes(d, args.nodes)
    finally:
        subprocess.run([shoal, "local", "down", "--dir", d], stdout=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)

    peak = [max(s[2][k] for s in samples) for k in range(args.nodes)]
    rev = args.label or subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                       text=True, cwd=REPO).stdout.strip()
    lines = [
        f"{args.nodes} nodes, {args.writers} writers, {args.seconds} s of {human(args.size)} files "
        f"created, fsynced and deleted 100 files later ({rev}): {written:,} files, "
        f"{human(written * args.size)} written, {written / args.seconds:,.0f} files/s.",
        "",
        "| node | metadata before | peak while writing | " + f"{args.settle} s after |",
        "|---|---|---|---|",
    ]
    for k in range(args.nodes):
        lines.append(f"| {k + 1} | {human(start[k])} | {human(peak[k])} | {human(end[k])} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = os.path.join(REPO, "bench", "results", f"{stamp}-meta-disk.md")
    with open(out, "w") as f:
        f.write(table)
    print(f"written {out}")


if __name__ == "__main__":
    main()
