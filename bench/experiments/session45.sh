#!/usr/bin/env bash
# Session 45's device steps (no device came in session 45: run them in the next session; see
# bench/NOTES.md, "To run first"): run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session45.sh explain capab tests`; the steps run in the order given.
# `capab` is the A/B of the soft cap's 128-thread candidate (plan::CLUSTER_CAP_FEW_THREADS) on
# (XENT_CAP_FEW_THREADS=1) against the default; `explain` lists the launches the automatic plan
# weighs for the soft cap's kernels with it on, with the driver's answers; `rowsweep` times the
# per-row options (issue 13's 90% of copy) at 4096 x 262144 in forced shapes beside the automatic
# one; `TESTS="options"` narrows the `tests` step.
# (Session 44 ran its tagged-options, weights16 and module-split steps on an H100: bench/experiments/README.md.)
set -u
f() { grep -E "cases|test result|: ok|FAILED|panicked|failed|error|ERROR|run," | grep -v "^{" | tail -${1:-30}; }
for mode in "$@"; do
  echo "=== $mode $(date +%T)"
  case $mode in
    tests)
      XENT_TESTS="${TESTS:-gpu options random}" timeout ${T:-420} bash bundle/run.sh test 2>&1 | f 60 ;;
    cap8)
      XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=none,softcap,softcap+accuracy,all \
        XENT_BENCH_CONFIGS=8192:128256:bf16,8192:128256:f16,16384:151936:bf16,4096:262144:bf16 \
        timeout ${T:-300} bash bundle/run.sh ab embedded embedded+XENT_BENCH_PLAN=cluster:8:128 2>&1 | grep -v '^{' | grep "^|" ;;
    capab)
      XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=softcap,softcap+accuracy,all \
        XENT_BENCH_CONFIGS=${CAP_CONFIGS:-8192:128256:bf16,8192:128256:f16,16384:151936:bf16,4096:262144:bf16} \
        timeout ${T:-300} bash bundle/run.sh ab embedded embedded+XENT_CAP_FEW_THREADS=1 2>&1 | grep -v '^{' | grep "^|" ;;
    explain)
      [[ -d bundle/bin ]] || (cd bundle && tar -xJf bin.tar.xz)
      (cd bundle && XENT_CAP_FEW_THREADS=1 timeout ${T:-200} ./bin/bench-throughput --bench --iters 5 --explain --options softcap,softcap+accuracy \
        --configs ${CAP_CONFIGS:-8192:128256:bf16,8192:128256:f16,16384:151936:bf16,4096:262144:bf16,8192:32000:bf16}) 2>&1 |
        tee ${OUT:-/tmp}/explain.jsonl | grep -E '"chosen": true|"method"' | cut -c1-300 ;;
    capsweep)
      XENT_SWEEP_SIZES="4 8 16" XENT_SWEEP_THREADS="128 256" XENT_BENCH_CONFIGS=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16 \
        timeout ${T:-400} bash bundle/run.sh sweep --options softcap 2>&1 | grep -v '^{' | tail -40 ;;
    rowsweep)
      XENT_SWEEP_SIZES="4 5 6 7 8" XENT_SWEEP_THREADS="256 384 512" XENT_BENCH_CONFIGS=4096:262144:bf16 \
        timeout ${T:-300} bash bundle/run.sh sweep --options none,smoothing,z,weight 2>&1 | grep -v '^{' | tail -40 ;;
    *) echo "session45.sh: unknown step $mode (tests cap8 capab explain capsweep rowsweep)" >&2 ;;
  esac
done
