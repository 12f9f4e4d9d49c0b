#!/usr/bin/env bash
# Session 68's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session68.sh stalls`; any other step goes to session67.sh (and on to
# 66, 65, ...).
# `stalls` ncu (`run.sh profile`: speed of light, occupancy, warp states) on the main kernel at
#   `STALL_CONFIGS` (8192:128256:bf16) under the option sets in `STALL_OPTIONS` (all, softcap,
#   softcap+accuracy): all five run at 47-57% of copy on the H200 against 75, yet their two
#   passes' SASS counts about 33 instructions a logit, which at copy rate would need no more than
#   the SMs' issue rate (`cargo xtask sass xent_cluster_capacc_bf16_i32`: 985 instructions a
#   64-logit first-pass iteration, 284 a 16-logit gradient one), so something other than issue
#   slots holds them; the warp states say what.
set -u
here=$(dirname "$0")
out=${OUT:-/tmp}
mkdir -p "$out"
for mode in "$@"; do
  case $mode in
    stalls)
      bash "$here/session60.sh"  # only its setup
      for opts in ${STALL_OPTIONS:-all softcap softcap+accuracy}; do
        echo "=== $mode $opts $(date +%T)"
        (cd bundle && XENT_BENCH_CONFIGS=${STALL_CONFIGS:-8192:128256:bf16} \
          timeout ${TS:-120} bash run.sh profile --options "$opts") 2>&1 | tee -a "$out/s68-stalls-$opts.txt" \
          | grep -E "Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occ|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall|stall|Active Warps Per|Eligible Warps" | head -40
      done ;;
    *) bash "$here/session67.sh" "$mode" ;;
  esac
done
