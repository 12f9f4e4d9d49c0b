#!/usr/bin/env bash
# Session 60's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session60.sh full capsweep`; any other step goes to session59.sh (and
# on to 57, 56, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `capsweep` issue 13's soft cap on the card at hand: the cluster plans of 4, 8 and 16 CTAs of 128
#   and 256 threads against the automatic plan, at the four 16-bit shapes of issue 13, with the
#   soft cap alone, with token accuracy, and all five (`CFG=` other configs, `SIZES=`, `THREADS=`,
#   `OPTS=`). Session 44 measured 8 x 128 on an H100 at +5 points at 8192 x 128256; the H200 was
#   never swept at 128 threads.
# `capauto` the automatic plan with `XENT_CAP_FEW_THREADS=1` (the planner also weighs 128 threads
#   for the soft cap's 16-bit kernels) against without, two rounds each, alternating.
# `f32h` the Rust linear (and candle) suites and the whole pytest, for the f32 grad_hidden.
# `last` `full` on an H200, else the two-phase (`[dft]`) rows at 8192 rows, two rounds.
# `h200orpytest` `capsweep` on an H200, else the package's whole pytest (`TP=` its timeout).
set -u
here=$(dirname "$0")
cfg=${CFG:-8192:128256:bf16,4096:262144:bf16,16384:151936:bf16,8192:128256:f16}
opts=${OPTS:-softcap,softcap+accuracy,all}
bash "$here/session59.sh"  # only its setup
for mode in "$@"; do
  case $mode in
    capsweep)
      echo "=== $mode $(date +%T)"
      (cd bundle && XENT_BENCH_CONFIGS=$cfg XENT_SWEEP_SIZES="${SIZES:-4 8 16}" \
        XENT_SWEEP_THREADS="${THREADS:-128 256}" timeout ${TT:-400} ./run.sh sweep --options "$opts") 2>&1 |
        grep -vE '^\{' | tail -70 ;;
    capauto)
      echo "=== $mode $(date +%T)"
      for round in 1 2; do
        for few in 0 1; do
          echo "--- round $round XENT_CAP_FEW_THREADS=$few"
          (cd bundle && XENT_CAP_FEW_THREADS=$few timeout ${TT:-120} ./bin/bench-throughput --bench \
            --configs "$cfg" --options "$opts") 2>&1 | tee -a "${OUT:-/tmp}/capauto.jsonl" |
            python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{") and "pct_of_copy" in l:
        d = json.loads(l); print(d["method"], d["n"], d["v"], d["dtype"], d["pct_of_copy"], d["plan"][:60])'
        done
      done ;;
    f32h)
      # The f32 grad_hidden (branch f32-grad-hidden): the Rust linear suite (and candle's, which
      # builds its RawLinearGrads), then the package's whole pytest.
      echo "=== $mode $(date +%T)"
      names=linear
      [[ -x bundle/bin/candle_cuda ]] && names="linear candle_cuda"
      XENT_TESTS=$names XENT_REQUIRE_GPU=1 timeout ${TR:-200} bash bundle/run.sh test 2>&1 |
        grep -E "test result|grad_hidden by blocks|in place|panicked|FAILED|failed|error" | tail -24
      python3 -m pip install -q --no-index --no-deps --target /tmp/s60-peers bundle/wheels/*.whl 2>&1 | tail -2
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/bundle/python/site:/tmp/s60-peers" timeout ${TP:-330} python3 -m pytest -q \
        -p no:cacheprovider python/tests -rfE 2>&1 | tail -8 ;;
    last)
      # The last call: issue 12's table where the card is an H200; else the two-phase rows
      # (`xent_linear[dft]`, whose backward now writes grad_hidden in f32) beside the default.
      if nvidia-smi -L | grep -q H200; then
        TT=${TT:-420} bash "$0" full
      else
        echo "=== dft (not an H200) $(date +%T)"
        cp bench/linear_bench.py bundle/
        timeout ${TT:-200} bash bundle/run.sh linear --configs 8192:4096:128256 --rounds 2 --curve "" \
          --only "xent_linear,xent_linear[dft],liger_flce[dft]" 2>&1 | grep -E '^\{|^\||Error|error' | tail -20
      fi ;;
    h200orpytest)
      # Issue 13's sweep needs the H200 (the issue's card); on another card, the whole pytest.
      if nvidia-smi -L | grep -q H200; then
        bash "$0" capsweep
      else
        echo "=== pytest (not an H200) $(date +%T)"
        python3 -m pip install -q --no-index --no-deps --target /tmp/s60-peers bundle/wheels/*.whl 2>&1 | tail -2
        XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/bundle/python/site:/tmp/s60-peers" timeout ${TP:-420} python3 -m pytest -q \
          -p no:cacheprovider python/tests -rfE 2>&1 | tail -15
      fi ;;
    *) bash "$here/session59.sh" "$mode" ;;
  esac
done
