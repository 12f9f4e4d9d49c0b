#!/usr/bin/env bash
# Session 45's device steps (bench/NOTES.md, "To run first"): run from the repository root with bundle/
# carried, e.g. `bash bench/experiments/session45.sh cap8 capsweep`; the steps run in the order given.
# (Session 44 ran its tagged-options, weights16 and module-split steps on an H100: bench/experiments/README.md.)
set -u
f() { grep -E "cases|test result|: ok|FAILED|panicked|failed|error|ERROR|run," | grep -v "^{" | tail -${1:-30}; }
for mode in "$@"; do
  echo "=== $mode $(date +%T)"
  case $mode in
    tests)
      XENT_TESTS="gpu options random" timeout ${T:-420} bash bundle/run.sh test 2>&1 | f 60 ;;
    cap8)
      XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=none,softcap,softcap+accuracy,all \
        XENT_BENCH_CONFIGS=8192:128256:bf16,8192:128256:f16,16384:151936:bf16,4096:262144:bf16 \
        timeout ${T:-300} bash bundle/run.sh ab embedded embedded+XENT_BENCH_PLAN=cluster:8:128 2>&1 | grep -v '^{' | grep "^|" ;;
    capsweep)
      XENT_SWEEP_SIZES="4 8 16" XENT_SWEEP_THREADS="128 256" XENT_BENCH_CONFIGS=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16 \
        timeout ${T:-400} bash bundle/run.sh sweep --options softcap 2>&1 | grep -v '^{' | tail -40 ;;
    *) echo "session45.sh: unknown step $mode (tests cap8 capsweep)" >&2 ;;
  esac
done
