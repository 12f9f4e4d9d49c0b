#!/usr/bin/env bash
# Session 46's device steps: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session46.sh capab4`; the steps run in the order given, and the
# session 45 steps (`explain`, `tests`, `rowsweep`, ...) are passed on to session45.sh.
# `capab4` is one A/B of four builds, all through XENT_PTX (no embedded-against-file bias): the
# committed PTX, the same with the soft cap's 128-thread candidate (XENT_CAP_FEW_THREADS=1), the
# `capacc_` kernels' divisions in f64 (bench/experiments/capacc-f64.sm_90.entries.ptx.xz:
# `ptxentries.py f64div` of the committed PTX, only `xent_cluster_capacc_` taken; ptxas spills
# 8 + 4 bytes instead of 24 + 24 in bf16 i32, 24 + 24 instead of 36 + 116 in bf16 i64), and both.
# (capab4 was run 1 of session 46, on 4c6394e: its entries file takes that PTX, which run.sh checks.)
# `capacc-ab` times the committed build against the same PTX with the f32 divisions put back;
# `wsm80-ab` the sm_80 split plan's class-weighted smoothing with its divisions in f64.
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    capab4)
      echo "=== $mode $(date +%T)"
      main=host/ptx/sm_90.ptx f64=bench/experiments/capacc-f64.sm_90.entries.ptx.xz
      XENT_AB_ROUNDS=${ROUNDS:-2} XENT_AB_OPTIONS=${OPTIONS:-softcap,softcap+accuracy,all} \
        XENT_BENCH_CONFIGS=${CAP_CONFIGS:-8192:128256:bf16,8192:128256:f16,16384:151936:bf16,4096:262144:bf16} \
        timeout ${T:-300} bash bundle/run.sh ab $main $main+XENT_CAP_FEW_THREADS=1 $f64 $f64+XENT_CAP_FEW_THREADS=1 2>&1 |
        grep -v '^{' | grep -E "^\||error|no file|not the PTX" ;;
    capacc-ab)
      # The committed build (e0f2218 on: the `capacc_` divisions in f64) against the same PTX with
      # 4c6394e's `capacc_` cluster and fused entries (f32 divisions) put back.
      echo "=== $mode $(date +%T)"
      main=host/ptx/sm_90.ptx old=bench/experiments/capacc-f32div.sm_90.entries.ptx.xz
      XENT_AB_ROUNDS=${ROUNDS:-2} XENT_AB_OPTIONS=${OPTIONS:-softcap+accuracy,all} \
        XENT_BENCH_CONFIGS=${CAP_CONFIGS:-8192:128256:bf16,8192:128256:f16,16384:151936:bf16,4096:262144:bf16,8192:128256:f32,8192:32000:bf16} \
        timeout ${T:-300} bash bundle/run.sh ab $old $main 2>&1 |
        grep -v '^{' | grep -E "^\||error|no file|not the PTX" ;;
    wsm80-ab)
      # sm_80 under the A100's limits: the committed PTX against the same with the split plan's
      # class-weighted smoothing kernels' divisions in f64 (bench/experiments/
      # split-wsm-f64.sm_80.entries.ptx.xz: ptxas spills 36 + 24 bytes instead of 48 + 28 in bf16
      # i64, at their cap of 80).
      echo "=== $mode $(date +%T)"
      main=host/ptx/sm_80.ptx new=bench/experiments/split-wsm-f64.sm_80.entries.ptx.xz
      XENT_ARCH=sm_80 XENT_LIMITS=a100 XENT_GREEN_SMS=108 XENT_AB_ROUNDS=${ROUNDS:-2} \
        XENT_AB_OPTIONS=${OPTIONS:-smoothing+weight} \
        XENT_BENCH_CONFIGS=${W80_CONFIGS:-8192:128256:bf16,4096:262144:bf16,16384:151936:bf16,8192:128256:f16,8192:128256:f32} \
        timeout ${T:-300} bash bundle/run.sh ab $main $new 2>&1 |
        grep -v '^{' | grep -E "^\||error|no file|not the PTX" ;;
    *) bash "$here/session45.sh" "$mode" ;;
  esac
done
