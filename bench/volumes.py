#!/usr/bin/python3
"""Volume operations on a three-node loopback cluster (`shoal local up`).

Usage: bench/volumes.py [--files N] [--out DIR]

Measures, and prints as a markdown table (also written to DIR/<date>-<host>-volumes.md):
  clone        `shoal volume create copy -o from=src` of a volume holding N files of 64 KiB
               and one 256 MiB file: wall time of the command (3 clones, median), and the
               block files on all nodes before and after (a clone must add none).
  plugin       the Docker plugin's Mount+Unmount pair over its unix socket, on the leader and
               on a follower (100 pairs each, median and p99), as dockerd sends them.
  quota        sequential write of 256 MiB (1 MiB writes, fsync at the end) into a volume with
               a 10 GiB quota and into one without (3 runs each, median MB/s): the cost of
               checking the quota at every write.
Needs root and /dev/fuse, and target/release/shoal (cargo build --release).
"""
import argparse
import datetime
import hashlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOAL = os.path.join(ROOT, "target", "release", "shoal")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("plugin")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def plugin(sock, call, body):
    c = UnixHTTP(sock)
    c.request("POST", "/VolumeDriver." + call, json.dumps(body),
              {"Content-Type": "application/vnd.docker.plugins.v1.2+json"})
    r = json.loads(c.getresponse().read())
    c.close()
    if r.get("Err"):
        raise RuntimeError(f"{call}: {r['Err']}")
    return r


def shoal(d, k, *args):
    out = subprocess.run([SHOAL, *args, "--data", f"{d}/node-{k}/data"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"shoal {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def block_files(d):
    n = 0
    for k in (1, 2, 3):
        for root, _, files in os.walk(f"{d}/node-{k}/data/blocks"):
            n += len(files)
    return n


def leader(d):
    nodes = json.loads(shoal(d, 1, "node", "ls", "--json"))
    return next(n["id"] for n in nodes if n["role"] == "leader")


def write_file(path, data, chunk=1 << 20):
    """Writes data in 1 MiB writes and fsyncs. Callers pass fresh random bytes: repeated
    content would be stored once (blocks are named by their hash) and flatter the figure."""
    view = memoryview(data)
    with open(path, "wb") as f:
        for at in range(0, len(data), chunk):
            f.write(view[at:at + chunk])
        f.flush()
        os.fsync(f.fileno())


def sha(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    if not os.access(SHOAL, os.X_OK):
        sys.exit(f"{SHOAL} is missing: run cargo build --release first")
    d = tempfile.mkdtemp(prefix="shoal-vol-bench.")
    port = 30000 + os.getpid() % 20000
    subprocess.run([SHOAL, "local", "up", "--nodes", "3", "--dir", d, "--base-port", str(port)],
                   check=True, stdout=subprocess.DEVNULL)
    rows = []
    try:
        mnt = f"{d}/node-1/mnt"
        # --- clone
        shoal(d, 1, "volume", "create", "src")
        src = f"{mnt}/volumes/src"
        print(f"writing {a.files} files of 64 KiB and one of 256 MiB into volume src", file=sys.stderr)
        for i in range(a.files):
            with open(f"{src}/f{i:05}", "wb") as f:
                f.write(os.urandom(64 << 10))
        write_file(f"{src}/big", os.urandom(256 << 20))
        time.sleep(1)
        before = block_files(d)
        times = []
        for n in range(3):
            t = time.monotonic()
            shoal(d, 2, "volume", "create", f"copy{n}", "-o", "from=src")
            times.append(time.monotonic() - t)
        after = block_files(d)
        same = sha(f"{d}/node-3/mnt/volumes/copy0/big") == sha(f"{src}/big")
        entries = a.files + 1
        rows.append(("clone of a volume with %d files, 381 MiB" % entries,
                     f"{statistics.median(times) * 1000:.0f} ms (runs: {', '.join(f'{x * 1000:.0f}' for x in times)})",
                     f"block files {before} → {after}; clone's 256 MiB file identical: {same}"))
        # --- plugin Mount+Unmount
        shoal(d, 1, "volume", "create", "m")
        lead = leader(d)
        follower = next(k for k in (1, 2, 3) if k != lead)
        for k, what in ((lead, "leader"), (follower, "follower")):
            sock = f"{d}/node-{k}/plugin.sock"
            lat = []
            for i in range(100):
                t = time.monotonic()
                plugin(sock, "Mount", {"Name": "m", "ID": f"b{i}"})
                plugin(sock, "Unmount", {"Name": "m", "ID": f"b{i}"})
                lat.append((time.monotonic() - t) * 1000)
            lat.sort()
            rows.append((f"plugin Mount+Unmount on the {what} (node {k})",
                         f"{statistics.median(lat):.2f} ms median, {lat[98]:.2f} ms p99",
                         "each is one Raft entry; Mount also waits for a read barrier and the directory"))
        # --- quota check cost
        shoal(d, 1, "volume", "create", "capped", "-o", "size=10GiB")
        shoal(d, 1, "volume", "create", "open")
        speeds = {}
        for vol in ("capped", "open"):
            runs = []
            for n in range(3):
                p = f"{mnt}/volumes/{vol}/w{n}"
                data = os.urandom(256 << 20)
                t = time.monotonic()
                write_file(p, data)
                runs.append(256 * 1.048576 / (time.monotonic() - t))
                os.unlink(p)
            speeds[vol] = runs
        for vol, label in (("capped", "with a 10 GiB quota"), ("open", "without a quota")):
            rows.append((f"seq write 256 MiB into a volume {label}",
                         f"{statistics.median(speeds[vol]):.0f} MB/s (runs: {', '.join(f'{x:.0f}' for x in speeds[vol])})",
                         "1 MiB writes, fsync at the end, replicas 3"))
    finally:
        subprocess.run([SHOAL, "local", "down", "--dir", d], stdout=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", d])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    lines = ["| measurement | result | notes |", "|---|---|---|"]
    lines += [f"| {m} | {r} | {n} |" for m, r, n in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{stamp}-{socket.gethostname()}-volumes.md")
    with open(path, "w") as f:
        f.write(f"# bench/volumes.py, {stamp} UTC, {a.files} files\n\n{text}")
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
