"""Summarises a cluster-plan sweep (`run.sh sweep`): for each method (`xent`, `xent[softcap]`, ...)
and config, a table of % of copy bandwidth by cluster size (rows) and threads per CTA (columns),
from the JSON lines of xent's throughput bench, whose "plan" field names the launch; with
`--auto FILE` (the same bench without a forced plan), the automatic plan's shape and % of copy
beside the best forced one. Usage: python3 sweep.py [--auto AUTO.jsonl] SWEEP.jsonl"""
import re, sys

from table import json_lines

PLAN = re.compile(r"Cluster \{ threads: (\d+), chunk_len: (\d+), size: (\d+)")


def cluster_cells(paths, copies):
    """{(method, n, v, dtype): {(size, threads): (pct_of_copy, chunk_len)}} of the cluster plans."""
    cells = {}
    for d in json_lines(paths):
        if "copy_GBps" in d:
            copies.append(d["copy_GBps"])
            continue
        m = PLAN.search(d.get("plan", ""))
        if not str(d.get("method", "")).startswith("xent") or not m or "pct_of_copy" not in d:
            continue
        threads, chunk, size = (int(g) for g in m.groups())
        key = (d["method"], d["n"], d["v"], d["dtype"])
        cells.setdefault(key, {})[(size, threads)] = (d["pct_of_copy"], chunk)
    return cells


def main(argv):
    auto_paths = []
    while argv[:1] == ["--auto"]:
        auto_paths.append(argv[1])
        argv = argv[2:]
    copies = []
    cells = cluster_cells(argv, copies)
    auto = cluster_cells(auto_paths, copies) if auto_paths else {}
    if copies:
        print(f"copy bandwidth {min(copies)}-{max(copies)} GB/s over {len(copies)} processes")
    for (method, n, v, dtype), per in cells.items():
        sizes = sorted({s for s, _ in per})
        threads = sorted({t for _, t in per})
        best = max(per, key=lambda k: per[k][0])
        print(f"\n{method} {n} x {v} {dtype}: % of copy by cluster size (rows) and threads (columns); "
              f"best {per[best][0]} at size {best[0]}, {best[1]} threads")
        for (size, t), (pct, _) in auto.get((method, n, v, dtype), {}).items():
            print(f"automatic plan: size {size}, {t} threads: {pct} ({pct - per[best][0]:+.1f} against the best)")
        print("| size (chunk) | " + " | ".join(str(t) for t in threads) + " |")
        print("| --- |" + " --- |" * len(threads))
        for s in sizes:
            chunk = next(c for (sz, _), (_, c) in per.items() if sz == s)
            row = [f"{per[(s, t)][0]:.1f}" if (s, t) in per else "" for t in threads]
            print(f"| {s} ({chunk}) | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
