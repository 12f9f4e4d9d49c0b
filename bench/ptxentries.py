"""PTX files entry by entry, without rebuilding the kernels (session 33, bench/NOTES.md).

    python3 bench/ptxentries.py diff A.ptx B.ptx
        the entries whose code differs, after renumbering registers and labels in order of first
        use (a change that leaves the other kernels alone should list only its own)
    python3 bench/ptxentries.py splice BASE.ptx OTHER.ptx OUT.ptx REGEX
        BASE with the entries whose names match REGEX (Python `re.match`) taken from OTHER: one
        kernel family's variant measured beside the rest as they are, for `run.sh ab` (through
        `XENT_PTX`); both files must come from the same module layout (the same `.func`s)
    python3 bench/ptxentries.py extract VARIANT.ptx OUT.ptx REGEX
        only the entries of VARIANT whose names match REGEX: a variant that changes a few kernels
        travels to the GPU machine as those (tens of KB compressed, where a whole PTX file takes
        1-2 MB of the carry), for `take` there
    python3 bench/ptxentries.py take BASE.ptx ENTRIES.ptx OUT.ptx
        BASE with every entry ENTRIES holds put in place of its own (`extract`'s file spliced
        back: `take` gives VARIANT again where BASE is the PTX VARIANT was built beside);
        `run.sh ab` does this for `NAME.entries.ptx[.xz]` specs
    python3 bench/ptxentries.py f64div IN.ptx OUT.ptx
        every `div.rn.f32 d, a, b` and `rcp.rn.f32 d, a` done in f64 and rounded to f32: the same
        bits (53 >= 2 x 24 + 2 makes the double rounding innocuous), another subroutine for ptxas
        (session 33's run 7)
"""

import re
import sys

ENTRY = re.compile(r"\.visible \.entry (\w+)\(")


def spans(ptx):
    """{entry name: (start, end)} of each entry's text (to the next entry, or the end)."""
    found = list(ENTRY.finditer(ptx))
    return {
        m.group(1): (m.start(), found[i + 1].start() if i + 1 < len(found) else len(ptx))
        for i, m in enumerate(found)
    }


def normalized(text):
    """`text` with registers (`%r12`), labels (`$L__BB3_7`), local depots (`__local_depot12`) and
    call sequences (`callseq 7`) numbered in order of first use: the last two count over the
    module, so an entry added before others renumbers theirs."""
    names = {}

    def rename(m):
        return names.setdefault(m.group(0), "%s#%d" % (m.group(1), len(names)))

    # The next entry's `// .globl NAME` line ends an entry's span.
    text = re.sub(r"^\s*// \.globl\s+\S+\s*$", "", text, flags=re.M)
    text = re.sub(r"(%[a-z]+)\d+", rename, text)
    text = re.sub(r"(__local_depot)\d+", rename, text)
    text = re.sub(r"(callseq )\d+", rename, text)
    return re.sub(r"(\$L__BB)\d+_\d+", rename, text)


def diff(a, b):
    sa, sb = spans(a), spans(b)
    differ = [n for n in sa if n not in sb or normalized(a[slice(*sa[n])]) != normalized(b[slice(*sb[n])])]
    only_b = [n for n in sb if n not in sa]
    print("%d and %d entries; %d differ" % (len(sa), len(sb), len(differ)))
    for name in differ + only_b:
        print(name)


def splice(base, other, pattern):
    sb, so = spans(base), spans(other)
    take = sorted((n for n in sb if re.match(pattern, n)), key=lambda n: sb[n][0])
    missing = [n for n in take if n not in so]
    if missing:
        sys.exit("ptxentries.py: not in the other file: " + " ".join(missing))
    out, pos = [], 0
    for name in take:
        start, end = sb[name]
        out.append(base[pos:start])
        out.append(other[slice(*so[name])])
        pos = end
    out.append(base[pos:])
    print("%d entries taken: %s" % (len(take), " ".join(take)))
    return "".join(out)


def extract(ptx, pattern):
    found = spans(ptx)
    take = [n for n in found if re.match(pattern, n)]
    if not take:
        sys.exit("ptxentries.py: no entry matches " + pattern)
    print("%d entries extracted" % len(take))
    return "".join(ptx[slice(*found[n])] for n in take)


def take_all(base, entries):
    names = list(spans(entries))
    if not names:
        sys.exit("ptxentries.py: no entries in the entries file")
    missing = [n for n in names if n not in spans(base)]
    if missing:
        sys.exit("ptxentries.py: not in the base file: " + " ".join(missing))
    return splice(base, entries, "(?:%s)$" % "|".join(map(re.escape, names)))


def f64div(ptx):
    div = re.compile(r"\tdiv\.rn\.f32\s+(%r\d+), (%r\d+), (%r\d+);")
    rcp = re.compile(r"\trcp\.rn\.f32\s+(%r\d+), (%r\d+);")
    ptx, n_div = div.subn(
        lambda m: "\t{ .reg .f64 %%xa, %%xb; cvt.f64.f32 %%xa, %s; cvt.f64.f32 %%xb, %s; "
        "div.rn.f64 %%xa, %%xa, %%xb; cvt.rn.f32.f64 %s, %%xa; }" % (m.group(2), m.group(3), m.group(1)),
        ptx,
    )
    ptx, n_rcp = rcp.subn(
        lambda m: "\t{ .reg .f64 %%xa; cvt.f64.f32 %%xa, %s; rcp.rn.f64 %%xa, %%xa; "
        "cvt.rn.f32.f64 %s, %%xa; }" % (m.group(2), m.group(1)),
        ptx,
    )
    print("%d divisions and %d reciprocals in f64" % (n_div, n_rcp))
    return ptx


def main(args):
    read = lambda path: open(path).read()
    if len(args) == 3 and args[0] == "diff":
        diff(read(args[1]), read(args[2]))
    elif len(args) == 5 and args[0] == "splice":
        open(args[3], "w").write(splice(read(args[1]), read(args[2]), args[4]))
    elif len(args) == 4 and args[0] == "extract":
        open(args[2], "w").write(extract(read(args[1]), args[3]))
    elif len(args) == 4 and args[0] == "take":
        open(args[3], "w").write(take_all(read(args[1]), read(args[2])))
    elif len(args) == 3 and args[0] == "f64div":
        open(args[2], "w").write(f64div(read(args[1])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
