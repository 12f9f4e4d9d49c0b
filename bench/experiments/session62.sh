#!/usr/bin/env bash
# Session 62's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session62.sh first`; any other step goes to session61.sh (and on to
# 60, 59, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `first`  on an H200: issue 12's whole table (`full`); on another card: the Rust linear suite
#          (session 61's mend of its raw tests, never GPU-run), the candle-cuda suite and the
#          whole pytest (`f32h`).
# `second` on an H200: issue 13's soft-cap sweep (`capsweep`); elsewhere nothing.
# `table-or-f32sum` on an H200 issue 12's whole table (`full`), elsewhere `f32sum`.
# `f32test` f32sum's tests alone.
# `crossover` where the row scheme and the vocabulary-blocked backward cross on this card
#          (`XENT_ROW_SCHEME_MIN_ROWS` through linear_bench.py's `:scheme=S`): chunks of exactly
#          R rows in both schemes, R from 112 to 512, at 8192 x 4096 x 128256 and 1000 x 4096 x
#          256000 bf16, two rounds. Needs a bundle from a build with the knob (after session 62).
# `f32sum` the fused pass's f32 sum of grad_hidden over vocabulary blocks (the tree's package)
#          against the same with it refused (linear_bench_no_f32sum.py): `xent_linear` at the
#          default budget where its 64 MiB floor makes the blocks, two rounds alternating; then
#          the package's tests of those sums (`NOTEST=1` skips them). Run 4's third side, the
#          f32 buffer beside the chunks rather than taken out of their budget, is what the
#          package does since (`_f32_sum_fits`).
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    first) bash "$here/session61.sh" first ;;
    second)
      nvidia-smi -L
      if nvidia-smi -L | grep -q H200; then
        TT=${TT:-500} bash "$here/session60.sh" capsweep
      fi ;;
    table-or-f32sum)
      if nvidia-smi -L | grep -q H200; then
        bash "$here/session61.sh" h200full
      else
        bash "$0" f32sum
      fi ;;
    f32sum)
      bash "$here/session60.sh"  # its setup alone: bundle/bin, python/xent over the site
      echo "=== $mode $(date +%T)"
      cp bench/linear_bench.py bench/experiments/linear_bench_no_f32sum.py bundle/
      for round in 1 2; do
        for build in ${BUILDS:-before after}; do
          script=linear_bench.py
          [[ $build == before ]] && script=linear_bench_no_f32sum.py
          echo "--- round $round $build"
          (cd bundle && PYTHONPATH="$PWD/python/site" timeout ${TB:-150} python3 $script \
            --configs ${LC:-1000:4096:256000,1535:4096:256000,600:2304:256000} --only xent_linear --curve "") 2>&1 |
            grep -E '^\| xent|Error|error' | tail -8
        done
      done
      [[ -n ${NOTEST:-} ]] && continue
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/bundle/python/site" timeout ${TP:-200} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_linear.py -rfE -k "f32_sum or blocks_in_f32 or accum or budget" 2>&1 | tail -6 ;;
    crossover)
      bash "$here/session60.sh"
      echo "=== $mode $(date +%T)"
      cp bench/linear_bench.py bundle/
      curve=""
      for r in ${CROSS_ROWS:-112 160 224 256 320 448 512}; do
        curve="$curve,=$r:scheme=1,=$r:scheme=100000"
      done
      timeout ${TT:-500} bash bundle/run.sh linear --configs ${LC:-8192:4096:128256,1000:4096:256000} \
        --rounds ${LR:-2} --only xent_linear --curve "${curve#,}" 2>&1 | grep -E '^\||Error|error' | tail -60 ;;
    f32test)
      # f32sum's tests alone (the package's tests of the sums over vocabulary blocks).
      bash "$here/session60.sh"
      echo "=== $mode $(date +%T)"
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/bundle/python/site" timeout ${TP:-120} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_linear.py -rfE -k "f32_sum or blocks_in_f32 or accum or budget" 2>&1 | tail -6 ;;
    *) bash "$here/session61.sh" "$mode" ;;
  esac
done
