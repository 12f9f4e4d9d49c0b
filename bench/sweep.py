"""Summarises a cluster-plan sweep (`run.sh sweep`): for each config, a table of % of copy
bandwidth by cluster size (rows) and threads per CTA (columns), from the JSON lines of xent's
throughput bench, whose "plan" field names the launch. Usage: python3 sweep.py SWEEP.jsonl"""
import re, sys

from table import json_lines

cells, copies = {}, []
for d in json_lines(sys.argv[1:]):
    if "copy_GBps" in d:
        copies.append(d["copy_GBps"])
        continue
    m = re.search(r"Cluster \{ threads: (\d+), chunk_len: (\d+), size: (\d+)", d.get("plan", ""))
    if d.get("method") != "xent" or not m or "pct_of_copy" not in d:
        continue
    threads, chunk, size = (int(g) for g in m.groups())
    key = (d["n"], d["v"], d["dtype"])
    cells.setdefault(key, {})[(size, threads)] = (d["pct_of_copy"], chunk)

if copies:
    print(f"copy bandwidth {min(copies)}-{max(copies)} GB/s over {len(copies)} processes")
for (n, v, dtype), per in cells.items():
    sizes = sorted({s for s, _ in per})
    threads = sorted({t for _, t in per})
    best = max(per, key=lambda k: per[k][0])
    print(f"\n{n} x {v} {dtype}: % of copy by cluster size (rows) and threads (columns); "
          f"best {per[best][0]} at size {best[0]}, {best[1]} threads")
    print("| size (chunk) | " + " | ".join(str(t) for t in threads) + " |")
    print("| --- |" + " --- |" * len(threads))
    for s in sizes:
        chunk = next(c for (sz, _), (_, c) in per.items() if sz == s)
        row = [f"{per[(s, t)][0]:.1f}" if (s, t) in per else "" for t in threads]
        print(f"| {s} ({chunk}) | " + " | ".join(row) + " |")
