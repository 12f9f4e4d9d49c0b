#!/usr/bin/env bash
# Session 47's steps for the next GPU run: run from the repository root with bundle/ carried
# (7ea2b74's build or later), e.g. `bash bench/experiments/session47.sh suites pytest`; the steps
# run in the order given, and any other step (`tests`, `capacc-ab`, `wsm80-ab`, `rowsweep`,
# `capsweep`, ...) is passed on to session46.sh.
# `suites` runs the test binaries session 47 did not run on the committed build (it ran `options`
# on both arches); `pytest` the whole Python suite and its examples; `rowshapes` the per-row
# options' forced-shape sweep at the two other 16-bit shapes (session 47's `rowsweep` at 4096 x
# 262144 found 6 x 384 0.7-0.9 points above the automatic 6 x 512: does 384 also win elsewhere,
# so that a rule, not one shape, could take it?).
set -u
here=$(dirname "$0")
f() { grep -E "cases|test result|: ok|FAILED|panicked|failed|error|ERROR|passed" | grep -v "^{" | tail -${1:-40}; }
for mode in "$@"; do
  echo "=== $mode $(date +%T)"
  case $mode in
    suites)
      # `gpu` alone takes 134 s on the H200.
      XENT_TESTS="${TESTS:-gpu random two_phase linear graph concurrency cpu unit-xent}" \
        timeout ${T:-560} bash bundle/run.sh test 2>&1 | f 60 ;;
    pytest)
      timeout ${T:-560} bash bundle/run.sh python 2>&1 | f 20 ;;
    rowshapes)
      XENT_SWEEP_SIZES="3 4 5 6" XENT_SWEEP_THREADS="256 384 512" \
        XENT_BENCH_CONFIGS=${ROW_CONFIGS:-8192:128256:bf16,16384:151936:bf16} \
        timeout ${T:-400} bash bundle/run.sh sweep --options none,smoothing,z,weight 2>&1 | grep -v '^{' | tail -80 ;;
    *) bash "$here/session46.sh" "$mode" ;;
  esac
done
