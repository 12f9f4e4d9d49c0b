"""Combines the JSON lines of xent's throughput bench and shared/bench/peers.py (one run, one GPU)
into one markdown table: per config, each method's median ms and % of copy bandwidth, and xent's
speed-up over the fastest peer. Usage: python3 table.py RESULTS.jsonl [...]"""
import json, sys


def json_lines(paths):
    """The JSON objects of the lines that hold one, from `paths` ("-" or none: stdin); other
    lines (logs, headers) are skipped."""
    for path in paths or ["-"]:
        for line in (sys.stdin if path == "-" else open(path)):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue


def main():
    rows, copy = {}, None
    for d in json_lines(sys.argv[1:]):
        if "copy_GBps" in d:
            copy = copy or d["copy_GBps"]
        elif "method" in d:
            rows.setdefault((d["n"], d["v"], d["dtype"]), {})[d["method"]] = d
    print_table(rows, copy)


def print_table(rows, copy):
    methods = []
    for per in rows.values():
        for m in per:
            if m not in methods:
                methods.append(m)
    # Ours first (`xent`, then `xent[OPTION]`: the same call with a loss option on), then the peers.
    methods.sort(key=lambda m: (m != "xent", not m.startswith("xent"), m))
    print(f"copy bandwidth {copy} GB/s (read + write); cells: median ms (% of copy); peak extra MiB\n")
    print("| N x V, dtype | " + " | ".join(methods) + " | xent vs fastest peer |")
    print("| --- |" + " --- |" * (len(methods) + 1))
    for (n, v, dtype), per in rows.items():
        cells = []
        for m in methods:
            d = per.get(m)
            if d is None:
                cells.append("")
            elif "error" in d:
                cells.append("error")
            else:
                cells.append(f'{d["ms_median"]:.3f} ({d["pct_of_copy"]:.0f}%) {d["extra_peak_MiB"]}')
        peers = [d["ms_median"] for m, d in per.items() if not m.startswith("xent") and "ms_median" in d]
        ours = per.get("xent", {}).get("ms_median")
        ratio = f"{min(peers) / ours:.2f}x" if peers and ours else ""
        print(f"| {n} x {v} {dtype} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
