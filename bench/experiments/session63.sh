#!/usr/bin/env bash
# Session 63's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session63.sh auto`; any other step goes to session62.sh (and on to
# 61, 60, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `auto`   on an H200: issue 12's whole table (`session61.sh h200full`); on another card: the
#          package's f32-sum tests (`f32test`, session 62's adopted form never GPU-run) and the
#          scheme crossover of this card (`crossover`).
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    auto)
      nvidia-smi -L
      if nvidia-smi -L | grep -q H200; then
        bash "$here/session61.sh" h200full
      else
        bash "$here/session62.sh" f32test crossover
      fi ;;
    *) bash "$here/session62.sh" "$mode" ;;
  esac
done
