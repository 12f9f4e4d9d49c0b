"""The table of an A/B run of PTX variants (`run.sh ab`): one row per shape, dtype and method,
each variant's % of copy in every round and their median, and the difference of medians from
the first variant.

    python3 ab.py ab.jsonl

Reads the JSON lines `bench-throughput --bench` wrote, each tagged with `variant` and `round` by
`run.sh ab`; lines that are not JSON objects with a `method` are skipped."""

import collections
import json
import statistics
import sys


def main(path):
    cells = collections.defaultdict(list)
    variants = []
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "method" not in row or "pct_of_copy" not in row:
            continue
        variant = row.get("variant", "?")
        if variant not in variants:
            variants.append(variant)
        key = (row["n"], row["v"], row["dtype"], row["method"])
        cells[key, variant].append((row.get("round", 0), row["pct_of_copy"]))
    if not variants:
        print("ab.py: no benchmark rows in", path)
        return 1
    base = variants[0]
    header = ["shape", "dtype", "method"] + variants + [f"{v} - {base}" for v in variants[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for key in sorted({k for k, _ in cells}):
        n, v, dtype, method = key
        medians = {}
        row = [f"{n} x {v}", dtype, method]
        for variant in variants:
            values = [pct for _, pct in sorted(cells.get((key, variant), []))]
            if values:
                medians[variant] = statistics.median(values)
                row.append(" ".join(f"{x:.1f}" for x in values) + f" (~{medians[variant]:.1f})")
            else:
                row.append("")
        for variant in variants[1:]:
            if variant in medians and base in medians:
                row.append(f"{medians[variant] - medians[base]:+.1f}")
            else:
                row.append("")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
