"""Helpers shared by the benchmark scripts that drive a `shoal local up` cluster."""
import json, subprocess


def status(shoal, d, k):
    """`shoal status --json` of node k of the cluster in directory d, or None if it does not answer."""
    try:
        out = subprocess.run([shoal, "status", "--json", "--data", f"{d}/node-{k}/data"],
                             capture_output=True, timeout=3).stdout
        return json.loads(out)
    except Exception:
        return None
