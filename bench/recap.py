"""Register caps without rebuilding the kernels: a copy of a PTX file with the `.maxnreg` of
chosen entries changed, for `run.sh ab` (through `XENT_PTX`).

    python3 bench/recap.py host/ptx/sm_90.ptx /tmp/acc64.ptx xent_cluster_capacc_bf16_=64 ...

Each PREFIX=CAP sets the cap of every entry whose name starts with PREFIX (the first rule that
matches wins); entries without a `.maxnreg` (uncapped) get none. Prints what it changed. See
where the spills land before measuring: `ptxas -v` and `nvdisasm` on the copy (session 32,
bench/NOTES.md)."""

import sys

from ptxentries import spans


def recap(ptx, rules):
    """`ptx` with the caps of `rules` ((prefix, cap) pairs); returns (text, {entry: cap})."""
    out, pos, changed = [], 0, {}
    for name, (start, end) in spans(ptx).items():
        cap = next((c for p, c in rules if name.startswith(p)), None)
        if cap is None:
            continue
        j = ptx.find(".maxnreg", start, end)
        if j < 0:
            continue
        k = ptx.index("\n", j)
        out.append(ptx[pos:j])
        out.append(".maxnreg %d" % cap)
        pos = k
        changed[name] = cap
    out.append(ptx[pos:])
    return "".join(out), changed


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    src, dst, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
    rules = []
    for spec in specs:
        prefix, _, cap = spec.partition("=")
        if not prefix or not cap.isdigit():
            sys.exit(f"recap.py: {spec}: expected PREFIX=CAP")
        rules.append((prefix, int(cap)))
    with open(src) as f:
        text, changed = recap(f.read(), rules)
    if not changed:
        sys.exit("recap.py: no capped entry matches")
    with open(dst, "w") as f:
        f.write(text)
    for name, cap in sorted(changed.items()):
        print(name, cap)


if __name__ == "__main__":
    main()
