#!/usr/bin/env bash
# Session 63's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session63.sh auto`; any other step goes to session62.sh (and on to
# 61, 60, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `auto`   on an H200: issue 12's whole table (`session61.sh h200full`); on another card: the
#          package's f32-sum tests (`f32test`, session 62's adopted form never GPU-run) and the
#          scheme crossover of this card (`crossover`).
# `second` on an H200: issue 12's whole table (`session61.sh h200full`); elsewhere `crossbench`
#          then `suites`.
# `crossbench` the card's crossover (33e9667: 282 rows on an H100 SXM, 192 on an H200) against
#          the fixed 192 (`XENT_ROW_SCHEME_MIN_ROWS=192`, the behaviour before) at the default
#          budget where its chunks hold 192-282 rows (1024 and 2048 x 4096 x 128256, 2048 x 4096 x
#          151936), and `xent_linear_small` at 8192 x 4096 x 128256 (in place at 256 rows: the
#          row scheme on any card), two rounds alternating; `liger_flce` once.
# `suites` the Rust linear suite and the package's linear tests (`K`: a pytest -k filter).
# `short` `second` for a budget under ten minutes: crossbench at 1024 and 2048 rows (the small
#          method in round 1 only), then the suites with the package's tests of the schemes.
# `tiny`   the suites' scheme tests, then one round of crossbench at 1024 rows.
set -u
here=$(dirname "$0")
# Issue 12's whole table on an H200; elsewhere the steps given.
h200_table_else() {
  nvidia-smi -L
  if nvidia-smi -L | grep -q H200; then
    bash "$here/session61.sh" h200full
  else
    "$@"
  fi
}
# `short`'s steps off an H200: a shorter `second` for a device budget under ten minutes.
short_steps() {
  LC=${LC:-1024:4096:128256,2048:4096:128256} NOSMALL=1 bash "$0" crossbench
  K="row_scheme or skip_ignored or f32_sum or in_place or budget or accum" bash "$0" suites
}
for mode in "$@"; do
  case $mode in
    auto) h200_table_else bash "$here/session62.sh" f32test crossover ;;
    second) h200_table_else bash "$0" crossbench suites ;;
    crossbench)
      bash "$here/session60.sh"
      echo "=== $mode $(date +%T)"
      cp bench/linear_bench.py bundle/
      for round in $(seq ${ROUNDS:-2}); do
        for side in card fixed192; do
          echo "--- round $round $side"
          env_192=""
          [[ $side == fixed192 ]] && env_192="XENT_ROW_SCHEME_MIN_ROWS=192"
          only=xent_linear
          [[ $round == 1 && $side == card ]] && only=xent_linear,liger_flce
          env $env_192 timeout ${TB:-150} bash bundle/run.sh linear --curve "" --only $only \
            --configs ${LC:-1024:4096:128256,2048:4096:128256,2048:4096:151936} 2>&1 |
            grep -E '^#|^\| (xent|liger)|Error|error' | tail -12
          [[ -n ${NOSMALL:-} && $round == 2 ]] && continue
          env $env_192 timeout ${TB:-150} bash bundle/run.sh linear --curve "" --only xent_linear_small \
            --configs 8192:4096:128256 2>&1 | grep -E '^\| xent|Error|error' | tail -3
        done
      done ;;
    short) h200_table_else short_steps ;;
    tiny)
      # The suites' scheme tests first, then one round of crossbench at 1024 rows.
      K="row_scheme or skip_ignored or f32_sum or in_place or accum" bash "$0" suites
      LC=1024:4096:128256 NOSMALL=1 ROUNDS=1 bash "$0" crossbench ;;
    suites)
      bash "$here/session60.sh"
      echo "=== $mode $(date +%T)"
      XENT_TESTS=linear XENT_REQUIRE_GPU=1 timeout ${TR:-200} bash bundle/run.sh test 2>&1 |
        grep -E "test result|panicked|FAILED|failed|error" | tail -12
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/bundle/python/site" timeout ${TP:-200} python3 -m pytest -q -s \
        -p no:cacheprovider python/tests/test_linear.py -rfE ${K:+-k "$K"} 2>&1 | grep -E "row scheme from|passed|failed|Error" | tail -8 ;;
    *) bash "$here/session62.sh" "$mode" ;;
  esac
done
