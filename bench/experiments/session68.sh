#!/usr/bin/env bash
# Session 68's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session68.sh stalls`; any other step goes to session67.sh (and on to
# 66, 65, ...).
# `stalls` ncu on the main kernel (one launch after four, at the GPU's own clocks, as `run.sh
#   profile`, with the instruction and compute sections too) at `STALL_CONFIGS` (8192:128256:bf16)
#   under each option set of `STALL_OPTIONS` (all, softcap, softcap+accuracy): all five run at
#   47-57% of copy on the H200 against 75, the soft cap alone at 79-83 against 85. Are they bound
#   by issue slots (instructions executed a logit, the schedulers' issue rate near one a cycle)
#   or by waits (long scoreboard on the class weights' loads, barriers)? The static SASS cannot
#   say: the passes' loops hold every polynomial tier and NaN path (`cargo xtask sass
#   xent_cluster_capacc_bf16_i32`: 538 instructions and 43 branches in one first-pass loop), of
#   which a vector runs one.
# `first` the first call of a session that gets a machine, in one command of at most 590 s (the
#   device's limit is 600): the head's linear suite (`XENT_TESTS=linear`, never run on an H200
#   since 734b646's GEMM rule), `session67.sh trace small8b`, then `stalls` for all five and the
#   soft cap, each under its own `timeout`, their logs in `$OUT` (`s68-linear.txt`, `s68-a.txt`,
#   `s68-stalls-*.txt`), a summary on stdout.
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
        ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
        (cd bundle && timeout ${TS:-120} "$ncu" --clock-control none \
          --kernel-name regex:'xent_(cluster|fused|chunk|split)' --launch-skip 4 --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section SchedulerStats \
          --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis \
          ./bin/bench-throughput --bench --iters 5 --configs "${STALL_CONFIGS:-8192:128256:bf16}" \
          --options "$opts") 2>&1 | tee -a "$out/s68-stalls-$opts.txt" |
          grep -E "xent_|Duration|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occ|Block Limit|Warp Cycles Per Issued|Issued Warp|Issue Slots|No Eligible|Executed Instructions|Executed Ipc|Stall|stall|Active Warps Per|Eligible Warps" | head -40
      done ;;
    first)
      nvidia-smi --query-gpu=name,clocks.max.sm --format=csv | tee "$out/gpu.txt"
      XENT_TESTS=linear XENT_REQUIRE_GPU=1 timeout 170 bash bundle/run.sh test > "$out/s68-linear.txt" 2>&1
      grep -aE "test result|FAILED|panicked|: ok|cases" "$out/s68-linear.txt" | tail -20
      OUT=$out timeout 210 bash "$here/session67.sh" trace small8b > "$out/s68-a.txt" 2>&1
      tail -60 "$out/s68-a.txt"
      OUT=$out STALL_OPTIONS="all softcap" TS=80 timeout 170 bash "$0" stalls 2>&1 | tail -60 ;;
    *) bash "$here/session67.sh" "$mode" ;;
  esac
done
