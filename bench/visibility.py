#!/usr/bin/env python3
"""Cross-node visibility: how long after a change on mount A does mount B show it?

Usage: bench/visibility.py MOUNT_A MOUNT_B [ROUNDS]

Measures five cases, each ROUNDS times (median reported, in ms):
  open-new     A creates and closes a file; B polls open+read until it has the bytes.
  open-over    B has read a file; A overwrites it; B polls open+read until it has the new bytes.
  stat-append  B has stat'ed a file; A appends; B polls stat until the size grows.
  ls-new       B has listed a directory; A creates an entry; B polls listdir until it is there.
  stat-unlink  B has stat'ed a file; A unlinks it; B polls stat until it fails.
B polls every 0.2 ms for up to 5 s; a case that never becomes visible is reported as a failure.
"""
import os, statistics, sys, time

a, b = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 20
work_a, work_b = os.path.join(a, "visibility"), os.path.join(b, "visibility")
os.makedirs(work_a, exist_ok=True)


def poll(check):
    start = time.monotonic()
    while time.monotonic() - start < 5:
        try:
            if check():
                return (time.monotonic() - start) * 1000
        except OSError:
            pass
        time.sleep(0.0002)
    raise SystemExit("never became visible")


def read(p):
    with open(p, "rb") as f:
        return f.read()


def wait_exists_b(name):
    poll(lambda: os.path.exists(os.path.join(work_b, name)))


results = {k: [] for k in ["open-new", "open-over", "stat-append", "ls-new", "stat-unlink"]}
for i in range(rounds):
    tag = f"{os.getpid()}-{i}"
    # open-new
    with open(os.path.join(work_a, f"new-{tag}"), "wb") as f:
        f.write(b"new")
    t0 = time.monotonic()
    results["open-new"].append(poll(lambda: read(os.path.join(work_b, f"new-{tag}")) == b"new"))
    # open-over
    p_a, p_b = os.path.join(work_a, f"over-{tag}"), os.path.join(work_b, f"over-{tag}")
    with open(p_a, "wb") as f:
        f.write(b"old")
    poll(lambda: read(p_b) == b"old")
    with open(p_a, "wb") as f:
        f.write(b"NEW")
    results["open-over"].append(poll(lambda: read(p_b) == b"NEW"))
    # stat-append
    p_a, p_b = os.path.join(work_a, f"app-{tag}"), os.path.join(work_b, f"app-{tag}")
    with open(p_a, "wb") as f:
        f.write(b"x")
    poll(lambda: os.stat(p_b).st_size == 1)
    with open(p_a, "ab") as f:
        f.write(b"more")
    results["stat-append"].append(poll(lambda: os.stat(p_b).st_size == 5))
    # ls-new
    d_a, d_b = os.path.join(work_a, f"dir-{tag}"), os.path.join(work_b, f"dir-{tag}")
    os.mkdir(d_a)
    poll(lambda: os.listdir(d_b) == [])
    open(os.path.join(d_a, "entry"), "wb").close()
    results["ls-new"].append(poll(lambda: os.listdir(d_b) == ["entry"]))
    # stat-unlink
    p_a, p_b = os.path.join(work_a, f"del-{tag}"), os.path.join(work_b, f"del-{tag}")
    open(p_a, "wb").close()
    poll(lambda: os.stat(p_b) is not None)
    os.unlink(p_a)

    def gone():
        try:
            os.stat(p_b)
            return False
        except FileNotFoundError:
            return True

    results["stat-unlink"].append(poll(gone))

for k, v in results.items():
    print(f"{k:12} median {statistics.median(v):7.2f} ms   max {max(v):7.2f} ms   ({len(v)} rounds)")
