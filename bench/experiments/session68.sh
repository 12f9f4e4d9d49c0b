#!/usr/bin/env bash
# Session 68's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session68.sh stalls`; any other step goes to session67.sh (and on to
# 66, 65, ...).
# `stalls` ncu (`run.sh profile`, with `XENT_NCU_SECTIONS` adding the instruction and compute
#   sections) on the main kernel at `STALL_CONFIGS` (8192:128256:bf16) under each option set of
#   `STALL_OPTIONS` (all, softcap, softcap+accuracy): all five run at 47-57% of copy on the H200
#   against 75, the soft cap alone at 79-83 against 85. Are they bound by issue slots
#   (instructions executed a logit, the schedulers' issue rate near one a cycle) or by waits
#   (long scoreboard on the class weights' loads, barriers)? The static SASS cannot say: the
#   passes' loops hold every polynomial tier and NaN path (`cargo xtask sass
#   xent_cluster_capacc_bf16_i32`: 538 instructions and 43 branches in one first-pass loop), of
#   which a vector runs one.
# `first` the first call of a session that gets a machine, in one command of at most 590 s (the
#   device's limit is 600): the head's linear suite (`XENT_TESTS=linear`, never run on an H200
#   since 734b646's GEMM rule), `session67.sh trace small8b`, then `stalls` for all five and the
#   soft cap, each under its own `timeout`; a summary on stdout, every log in one
#   `$OUT/s68-first.tar.xz` (the device brings back at most 8 files).
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
        (cd bundle && OUT=$out XENT_BENCH_CONFIGS=${STALL_CONFIGS:-8192:128256:bf16} \
          XENT_NCU_SECTIONS="InstructionStats ComputeWorkloadAnalysis" \
          timeout ${TS:-120} bash run.sh profile --options "$opts") 2>&1 |
          grep -E "xent_|Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occ|Block Limit|Warp Cycles Per Issued|Issued Warp|Issue Slots|No Eligible|Executed Instructions|Executed Ipc|Stall|stall|Active Warps Per|Eligible Warps" | head -40
      done ;;
    first)
      logs=/tmp/s68-first
      mkdir -p "$logs"
      nvidia-smi --query-gpu=name,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
      OUT=$logs XENT_TESTS=linear XENT_REQUIRE_GPU=1 timeout 170 bash bundle/run.sh test > "$logs/s68-linear.txt" 2>&1
      grep -aE "test result|FAILED|panicked|: ok|cases" "$logs/s68-linear.txt" | tail -20
      OUT=$logs timeout 210 bash "$here/session67.sh" trace small8b > "$logs/s68-a.txt" 2>&1
      tail -60 "$logs/s68-a.txt"
      OUT=$logs STALL_OPTIONS="all softcap" TS=80 timeout 170 bash "$0" stalls 2>&1 | tail -60
      tar -C "$logs" -cJf "$out/s68-first.tar.xz" . ;;
    *) bash "$here/session67.sh" "$mode" ;;
  esac
done
