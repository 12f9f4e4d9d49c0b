#!/usr/bin/env bash
# Sessions 43-44's device steps for session 45 (bench/NOTES.md, "To run first"): run from the repository
# root with bundle/ carried, e.g. `bash bench/experiments/session45.sh abtag w16 capsweep absplit`;
# the steps run in the order given.
set -u
S5=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16,8192:128256:f16,8192:128256:f32
A100="XENT_ARCH=sm_80 XENT_LIMITS=a100 XENT_GREEN_SMS=108"
# The tagged-options branch's 42 sm_80 entries; the weights' 16-bit probe (sm_90); the 4 sm_80 kernels
# the module split (fa1d5bc) left with the same instructions in other registers, as they were before it.
TE=bench/experiments/split-tagged-options.sm_80.entries.ptx.xz
W16=bench/experiments/weights16-probe.sm_90.entries.ptx.xz
PRE=bench/experiments/xent-module-split-before.sm_80.entries.ptx.xz
f() { grep -E "cases|test result|: ok|FAILED|panicked|failed|error|ERROR|run," | grep -v "^{" | tail -${1:-30}; }
table() { grep -v '^{' | grep "^|"; }
mktag() { xz -dc $TE > /tmp/te.ptx && python3 bundle/ptxentries.py take host/ptx/sm_80.ptx /tmp/te.ptx /tmp/tag.ptx >/dev/null; }
for mode in "$@"; do
  echo "=== $mode $(date +%T)"
  case $mode in
    tests)
      XENT_ARCH=sm_80 XENT_TESTS="gpu options random" timeout ${T:-420} bash bundle/run.sh test 2>&1 | f 60 ;;
    abtag)
      env $A100 XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=none,smoothing,smoothing+weight,accuracy,softcap,softcap+accuracy,all \
        XENT_BENCH_CONFIGS=$S5 timeout ${T:-300} bash bundle/run.sh ab embedded $TE 2>&1 | table ;;
    tagtests)
      mktag && XENT_PTX=/tmp/tag.ptx XENT_ARCH=sm_80 XENT_TESTS="gpu options random" timeout ${T:-420} \
        bash bundle/run.sh test 2>&1 | f 60 ;;
    tagsan)
      mktag && XENT_PTX=/tmp/tag.ptx XENT_ARCH=sm_80 XENT_TESTS=gpu timeout ${T:-300} \
        bash bundle/run.sh sanitize split_plan_walks 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases|test result|==" | tail -20 ;;
    w16)
      XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=smoothing+weight,softcap+accuracy,all XENT_BENCH_CONFIGS=$S5 \
        timeout ${T:-300} bash bundle/run.sh ab embedded $W16 2>&1 | table ;;
    capsweep)
      XENT_SWEEP_SIZES="4 8 16" XENT_SWEEP_THREADS="128 256" XENT_BENCH_CONFIGS=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16 \
        timeout ${T:-400} bash bundle/run.sh sweep --options softcap 2>&1 | grep -v '^{' | tail -40 ;;
    absplit)
      env $A100 XENT_AB_ROUNDS=2 XENT_AB_OPTIONS=softcap+accuracy,all XENT_BENCH_CONFIGS=$S5 \
        timeout ${T:-200} bash bundle/run.sh ab embedded $PRE 2>&1 | table ;;
    *) echo "session45.sh: unknown step $mode (tests abtag tagtests tagsan w16 capsweep absplit)" >&2 ;;
  esac
done
