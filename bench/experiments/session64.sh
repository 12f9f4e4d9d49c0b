#!/usr/bin/env bash
# Session 64's steps for a GPU run: run from the repository root with bundle/ carried (built on
# aa2b04c, the last Rust change), e.g. `bash bench/experiments/session64.sh first`; any other step
# goes to session63.sh (and on to 62, 61, ...), whose setup runs first.
# `first`  on an H200: issue 12's whole table (`session61.sh h200full`); elsewhere the card's
#          crossover against the fixed 192 (`session63.sh crossbench`, two rounds).
# `second` the Rust linear and candle suites and the package's whole pytest (`session60.sh f32h`):
#          aa2b04c's in-place check and 33e9667's crossover under every test.
# `third`  on an H200: issue 13's soft-cap sweep (`session60.sh capsweep`); elsewhere nothing.
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
    *) bash "$here/session63.sh" "$mode" ;;
  esac
done
