#!/usr/bin/env bash
# Session 67's steps for a GPU run: run from the repository root with bundle/ carried (built on
# 79a5ef1 or later), e.g. `bash bench/experiments/session67.sh trace`; any other step goes to
# session66.sh (and on to 65, 64, ...).
# `trace` the small-call kernels' phase timeline (`xent_cluster_small_*`, the default at 1-64
#   rows since session 37, never traced: session 34's timeline was the cluster kernels'), at
#   `TRACE_ROWS` (1,8,64) rows of 128256 bf16, from `cargo xtask ptx-trace`'s PTX carried as
#   `bundle/trace-sm_90.ptx.xz`; then the same with `XENT_SMALL_KERNEL=0` (the cluster kernels)
#   for comparison with session 34's.
# `small8b` criterion's small/gpu_graph at `ROWS` (8) rows under cluster sizes between the 8 and
#   16 that `session65.sh small8` forced (any size up to 16 runs: `random` draws them): a CTA's
#   share of the row's exponentials (two a logit, 16 a clock an SM) is about 1 µs at 8 CTAs a row
#   of 128256, and 12 CTAs a row (96 CTAs) would still leave one cluster a GPC; `auto` first and
#   last as the control (`session65.sh small8` with these `PLANS`).
set -u
here=$(dirname "$0")
out=${OUT:-/tmp}
mkdir -p "$out"
for mode in "$@"; do
  case $mode in
    trace)
      bash "$here/session60.sh"  # only its setup
      echo "=== $mode $(date +%T)"
      xz -dc bundle/trace-sm_90.ptx.xz > /tmp/s67-trace-sm_90.ptx || exit 1
      for small in 1 0; do
        echo "--- XENT_SMALL_KERNEL=$small"
        (cd bundle && XENT_SMALL_KERNEL=$small XENT_PTX=/tmp/s67-trace-sm_90.ptx TRACE_ROWS=${TRACE_ROWS:-1,8,64} \
          timeout ${TT:-120} ./bin/example-small_trace) 2>&1 | tee -a "$out/s67-trace.txt"
      done ;;
    small8b)
      PLANS="auto cluster:12:256 cluster:12:128 cluster:10:256 cluster:11:256 cluster:14:128 auto" \
        ROWS=${ROWS:-8} TC=${TC:-60} bash "$here/session65.sh" small8 ;;
    *) bash "$here/session66.sh" "$mode" ;;
  esac
done
