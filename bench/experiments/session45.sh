#!/usr/bin/env bash
# Sessions 43-44's device steps for session 45 (bench/NOTES.md, "To run first"): run from the repository
# root with bundle/ carried, e.g. `bash bench/experiments/session45.sh abtag w16 capsweep`.
set -u
S5=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16,8192:128256:f16,8192:128256:f32
A100="XENT_ARCH=sm_80 XENT_LIMITS=a100 XENT_GREEN_SMS=108"
TE=bench/experiments/split-tagged-options.sm_80.entries.ptx.xz
f() { grep -E "cases|test result|: ok|FAILED|panicked|failed|error|ERROR|run," | grep -v "^{" | tail -${1:-30}; }
mktag() { xz -dc $TE > /tmp/te.ptx && python3 bundle/ptxentries.py take host/ptx/sm_80.ptx /tmp/te.ptx /tmp/tag.ptx >/dev/null; }
for mode in "$@"; do
echo "=== $mode $(date +%T)"
case $mode in
  tests)
    XENT_ARCH=sm_80 XENT_TESTS="gpu options random" timeout ${T:-420} bash bundle/run.sh test 2>&1 | f 60 ;;
  abtag)
    env $A100 XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=none,smoothing,smoothing+weight,accuracy,softcap,softcap+accuracy,all XENT_BENCH_CONFIGS=$S5 \
      timeout ${T:-300} bash bundle/run.sh ab embedded $TE 2>&1 | grep -v '^{' | grep "^|" ;;
  tagtests)
    mktag; XENT_PTX=/tmp/tag.ptx XENT_ARCH=sm_80 XENT_TESTS="gpu options random" timeout ${T:-420} bash bundle/run.sh test 2>&1 | f 60 ;;
  tagsan)
    mktag; XENT_PTX=/tmp/tag.ptx XENT_ARCH=sm_80 XENT_TESTS=gpu timeout ${T:-300} bash bundle/run.sh sanitize split_plan_walks 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases|test result|==" | tail -20 ;;
esac
done
# (second block)
W16=bench/experiments/weights16-probe.sm_90.entries.ptx.xz
for mode in "$@"; do
case $mode in
  w16)
    echo "=== w16 $(date +%T)"
    XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=smoothing+weight,softcap+accuracy,all XENT_BENCH_CONFIGS=$S5 \
      timeout ${T:-300} bash bundle/run.sh ab embedded $W16 2>&1 | grep -v '^{' | grep "^|" ;;
  capsweep)
    echo "=== capsweep $(date +%T)"
    XENT_SWEEP_SIZES="4 8 16" XENT_SWEEP_THREADS="128 256" XENT_BENCH_CONFIGS=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16 \
      timeout ${T:-400} bash bundle/run.sh sweep --options softcap 2>&1 | grep -v '^{' | tail -40 ;;
esac
done
# (third block) The module split (fa1d5bc) left 4 sm_80 kernels with the same instructions in other
# registers: their entries from before it against the bundle's own (a bundle built at fa1d5bc or later).
PRE=bench/experiments/xent-module-split-before.sm_80.entries.ptx.xz
for mode in "$@"; do
case $mode in
  absplit)
    echo "=== absplit $(date +%T)"
    env $A100 XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=softcap+accuracy,all XENT_BENCH_CONFIGS=$S5 \
      timeout ${T:-200} bash bundle/run.sh ab embedded $PRE 2>&1 | grep -v '^{' | grep "^|" ;;
esac
done
