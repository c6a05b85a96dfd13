#!/usr/bin/env python3
"""Cross-node visibility: how long after a change on mount A does mount B show it?

Usage: bench/visibility.py MOUNT_A MOUNT_B [ROUNDS]

Measures five cases, each ROUNDS times (median reported, in ms):
  open-new     A creates and closes a file; B polls open+read until it has the bytes.
  open-over    B has read a file; A overwrites it; B polls open+read until it has the new bytes.
  stat-append  B has stat'ed a file; A appends; B polls stat until the size grows.
  ls-new       B has listed a directory; A creates an entry; B polls listdir until it is there.
  stat-unlink  B has stat'ed a file; A unlinks it; B polls stat until it fails.
B polls every 0.2 ms for up to 5 s; a case that never becomes visible counts as 5 s and is
reported as stale. `bench/run` imports `measure`.
"""
import os
import statistics
import sys
import time

CASES = ["open-new", "open-over", "stat-append", "ls-new", "stat-unlink"]
LIMIT_S = 5.0


def poll(check):
    """Milliseconds until check() holds; LIMIT_S * 1000 if it never does."""
    start = time.monotonic()
    while time.monotonic() - start < LIMIT_S:
        try:
            if check():
                return (time.monotonic() - start) * 1000
        except OSError:
            pass
        time.sleep(0.0002)
    return LIMIT_S * 1000


def read(p):
    with open(p, "rb") as f:
        return f.read()


def write(p, data, mode="wb"):
    with open(p, mode) as f:
        f.write(data)


def gone(p):
    try:
        os.stat(p)
        return False
    except FileNotFoundError:
        return True


def measure(a, b, rounds):
    """{case: [ms, ...]} for changes made under mount a and watched from mount b."""
    work_a, work_b = os.path.join(a, "visibility"), os.path.join(b, "visibility")
    os.makedirs(work_a, exist_ok=True)
    poll(lambda: os.path.isdir(work_b))
    results = {k: [] for k in CASES}
    for i in range(rounds):
        tag = f"{os.getpid()}-{i}"

        def pair(name):
            return os.path.join(work_a, f"{name}-{tag}"), os.path.join(work_b, f"{name}-{tag}")

        p_a, p_b = pair("new")
        write(p_a, b"new")
        results["open-new"].append(poll(lambda: read(p_b) == b"new"))

        p_a, p_b = pair("over")
        write(p_a, b"old")
        poll(lambda: read(p_b) == b"old")
        write(p_a, b"NEW")
        results["open-over"].append(poll(lambda: read(p_b) == b"NEW"))

        p_a, p_b = pair("app")
        write(p_a, b"x")
        poll(lambda: os.stat(p_b).st_size == 1)
        write(p_a, b"more", "ab")
        results["stat-append"].append(poll(lambda: os.stat(p_b).st_size == 5))

        d_a, d_b = pair("dir")
        os.mkdir(d_a)
        poll(lambda: os.listdir(d_b) == [])
        open(os.path.join(d_a, "entry"), "wb").close()
        results["ls-new"].append(poll(lambda: os.listdir(d_b) == ["entry"]))

        p_a, p_b = pair("del")
        open(p_a, "wb").close()
        poll(lambda: os.stat(p_b) is not None)
        os.unlink(p_a)
        results["stat-unlink"].append(poll(lambda: gone(p_b)))
    return results


def main():
    a, b = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    for k, v in measure(a, b, rounds).items():
        stale = " (stale: never visible)" if max(v) >= LIMIT_S * 1000 else ""
        print(
            f"{k:12} median {statistics.median(v):7.2f} ms   max {max(v):7.2f} ms"
            f"   ({len(v)} rounds){stale}"
        )


if __name__ == "__main__":
    main()
