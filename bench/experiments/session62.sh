#!/usr/bin/env bash
# Session 62's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session62.sh first`; any other step goes to session61.sh (and on to
# 60, 59, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `first`  on an H200: issue 12's whole table (`full`); on another card: the Rust linear suite
#          (session 61's mend of its raw tests, never GPU-run), the candle-cuda suite and the
#          whole pytest (`f32h`).
# `second` on an H200: issue 13's soft-cap sweep (`capsweep`); elsewhere nothing.
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
    *) bash "$here/session61.sh" "$mode" ;;
  esac
done
