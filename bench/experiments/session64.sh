#!/usr/bin/env bash
# Session 64's steps for a GPU run: run from the repository root with bundle/ carried (built on
# aa2b04c, the last Rust change), e.g. `bash bench/experiments/session64.sh first`; any other step
# goes to session63.sh (and on to 62, 61, ...), whose setup runs first.
# `first`  on an H200: issue 12's whole table (`session61.sh h200full`); elsewhere the card's
#          crossover against the fixed 192 (`session63.sh crossbench`, two rounds).
# `second` the Rust linear and candle suites and the package's whole pytest (`session60.sh f32h`):
#          aa2b04c's in-place check and 33e9667's crossover under every test.
# `third`  on an H200: issue 13's soft-cap sweep (`session60.sh capsweep`); elsewhere nothing.
# `tn`     the weight gradient from xent's own GEMM where it runs alone (in place) at chunks of
#          at most 256 rows: the Rust in-place tests (the new one at 1024 classes takes it on
#          compute capability 9.0), then `xent_linear_small` (now taking it at 256-row chunks)
#          against `[cublas]` (XENT_GEMM_TN=0) at 8192 x 4096 x 128256, `ROUNDS` (1) rounds.
set -u
here=$(dirname "$0")
on_h200() { nvidia-smi -L; nvidia-smi -L | grep -q H200; }
for mode in "$@"; do
  case $mode in
    first)
      if on_h200; then TT=${TT:-540} bash "$here/session61.sh" h200full
      else bash "$here/session63.sh" crossbench; fi ;;
    second) bash "$here/session60.sh" f32h ;;
    third)
      if on_h200; then bash "$here/session60.sh" capsweep
      else echo "=== third: not an H200, nothing to run"; fi ;;
    tn)
      bash "$here/session60.sh"  # only its setup (bundle/bin unpacked, python/xent over the site)
      echo "=== $mode $(date +%T)"
      lt=$(python3 -c 'import glob, site
print(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/**/libcublasLt.so.*", recursive=True))[0])')
      XENT_CUBLASLT=$lt XENT_REQUIRE_GPU=1 timeout ${TR:-90} bundle/bin/linear in_place over_the_hidden_states \
        --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked|failed|weight gradient from|in place" | tail -12
      cp bench/linear_bench.py bundle/
      timeout ${TB:-120} bash bundle/run.sh linear --curve "" --rounds ${ROUNDS:-1} \
        --only "xent_linear_small,xent_linear_small[cublas]" --configs 8192:4096:128256 2>&1 |
        grep -E '^\| xent|Error|error' | tail -4 ;;
    *) bash "$here/session63.sh" "$mode" ;;
  esac
done
