#!/usr/bin/env bash
# Session 61's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session61.sh first`; any other step goes to session60.sh (and on to
# 59, 57, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `first`  on an H200: issue 12's whole table (`full`); on another card: the Rust linear suite
#          and the whole pytest (`f32h`: session 60's typed f32 grad_hidden test, never GPU-run).
# `candle` the candle-cuda suite (the two-phase backward's f32 grad_hidden) when its binaries
#          travel in the bundle.
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    first)
      nvidia-smi -L
      if nvidia-smi -L | grep -q H200; then
        TT=${TT:-420} bash "$here/session60.sh" full
      else
        bash "$here/session60.sh" f32h
      fi ;;
    candle)
      bash "$here/session59.sh"  # only its setup
      echo "=== $mode $(date +%T)"
      XENT_TESTS=candle_cuda XENT_REQUIRE_GPU=1 timeout ${TR:-200} bash bundle/run.sh test 2>&1 |
        grep -E "test result|panicked|FAILED|failed|error|grad_hidden" | tail -24 ;;
    *) bash "$here/session60.sh" "$mode" ;;
  esac
done
