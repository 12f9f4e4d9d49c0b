#!/usr/bin/env bash
# Session 50's steps for a GPU run: run from the repository root with bundle/ carried (7ea2b74's
# build or later), e.g. `bash bench/experiments/session50.sh overlay testhf hfmodel sft`; the steps
# run in the order given, and any other step goes to session49.sh.
# `testhf` runs python/tests/test_hf.py whole (the two-rank FSDP2 layouts on the machine's CPU,
# the one-rank ones with NCCL, the scored rows). `sft` times the model step with half of each
# sequence's labels ignored (a fine-tuning batch whose prompts are masked: `xent_fused` computes
# only the scored rows, `xent_fused[all rows]` every row).
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    testhf)
      echo "=== $mode $(date +%T)"
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-400} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_hf.py -rfEs 2>&1 | tail -4) ;;
    sft)
      HF_ARGS="--prompt 0.5" bash "$here/session49.sh" hfmodel ;;
    *) bash "$here/session49.sh" "$mode" ;;
  esac
done
