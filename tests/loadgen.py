"""A bounded HTTP load from a second process, for the fault tests.

    python loadgen.py ADDRESS --seconds 8 --concurrency 10 [--writes FOLDERS] --out result.json

Reads fetch ``/``.  With ``--writes N``, thread k adds new folders, one
after the other, inside the existing folder ``f{k % N}``: every thread
writes to its own container, so writes do not conflict by design, and
every acknowledged write names an object that must exist afterwards.

The result (JSON) counts requests sent, acknowledged and failed by cause,
and lists the acknowledged writes with the time each was sent.
"""

import argparse
import base64
import http.client
import json
import sys
import threading
import time
import urllib.parse
from collections import Counter

AUTH = "Basic " + base64.b64encode(b"admin:admin").decode()


def send(address, method, path, body=None, timeout=60):
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    headers = {"Connection": "close", "Authorization": AUTH}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--writes", type=int, default=0, metavar="FOLDERS")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    start = time.monotonic()
    deadline = start + args.seconds
    lock = threading.Lock()
    outcomes = Counter()
    acked, timeline = [], []
    budget = [args.max_requests]

    def worker(k):
        seq = 0
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            sent_at = time.monotonic() - start
            if args.writes:
                seq += 1
                folder, oid = f"f{k % args.writes}", f"t{k}w{seq}"
                path = f"/{folder}/manage_addProduct/OFSP/manage_addFolder"
                body = urllib.parse.urlencode({"id": oid})
                method = "POST"
            else:
                path, body, method = "/", None, "GET"
            try:
                status = send(args.address, method, path, body)
                outcome = str(status)
            except (OSError, http.client.HTTPException) as exc:
                # refused, reset, timed out; or cut off: no status line
                # (RemoteDisconnected), a body cut short (IncompleteRead)
                status, outcome = None, type(exc).__name__
            ok = status is not None and 200 <= status < 400
            with lock:
                outcomes[outcome] += 1
                timeline.append((round(sent_at, 3), ok))
                if ok and args.writes:
                    acked.append(f"{folder}/{oid}")
            if not ok:
                time.sleep(0.05)  # do not spin while the server is away

    crashed = []  # a thread that died would leave its requests uncounted
    threading.excepthook = lambda hook: crashed.append(hook.exc_value)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if crashed:
        sys.exit(f"loadgen: {len(crashed)} of its threads crashed: {crashed[0]!r}")

    ok = sum(n for outcome, n in outcomes.items() if outcome[0] in "23")
    result = {
        "sent": sum(outcomes.values()),
        "ok": ok,
        "failed": sum(outcomes.values()) - ok,
        "outcomes": dict(outcomes),
        "acked_writes": acked,
        "timeline": sorted(timeline),
        "seconds": round(time.monotonic() - start, 2),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
