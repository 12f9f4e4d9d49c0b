#!/usr/bin/env bash
# Session 61's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session61.sh first`; any other step goes to session60.sh (and on to
# 59, 57, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `first`  on an H200: issue 12's whole table (`full`); on another card: the Rust linear suite
#          and the whole pytest (`f32h`: session 60's typed f32 grad_hidden test, never GPU-run).
# `h200full` issue 12's whole table (`full`) where the card is an H200; elsewhere nothing.
# `candle` the candle-cuda suite (the two-phase backward's f32 grad_hidden) when its binaries
#          travel in the bundle.
# `candlebench` bench-candle's linear rows (the fused path, whose grad_hidden is now an f32 sum)
#          against the build before it, two rounds alternating.
# `candleab` the candle-cuda suite of the change (bundle/c61b.tar.xz), then its new test against
#          the library before the change (`candle_cuda-base`: the same test source, the 16-bit
#          sums), which it should fail.
set -u
here=$(dirname "$0")
# The candle-cuda binaries link cuBLAS, cuRAND and NVRTC by soname: PyTorch's CUDA wheels have
# them beside cuBLASLt.
cuda_libs() {
  local lt
  lt=$(python3 -c 'import glob, site
print(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/**/libcublasLt.so.*", recursive=True))[0])')
  export XENT_CUBLASLT=$lt LD_LIBRARY_PATH="$(dirname "$lt")"
}
for mode in "$@"; do
  case $mode in
    first)
      nvidia-smi -L
      if nvidia-smi -L | grep -q H200; then
        TT=${TT:-420} bash "$here/session60.sh" full
      else
        bash "$here/session60.sh" f32h
      fi ;;
    h200full)
      nvidia-smi -L
      if nvidia-smi -L | grep -q H200; then
        TT=${TT:-500} bash "$here/session60.sh" full
      fi ;;
    candle|candlebench)
      # The candle-cuda binaries travel alone in bundle/c61.tar.xz (the whole bin.tar.xz and
      # the tracked tree together are over the carry): the new build's test, bench and example,
      # and bench-candle-base, the bench of the build before the change.
      echo "=== $mode $(date +%T)"
      [[ -x /tmp/c61/bin/candle_cuda ]] || { mkdir -p /tmp/c61 && xz -dc bundle/c61.tar.xz | tar -x -C /tmp/c61; }
      cuda_libs
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      if [[ $mode == candle ]]; then
        XENT_REQUIRE_GPU=1 timeout ${TR:-240} /tmp/c61/bin/candle_cuda --test-threads=1 --nocapture 2>&1 |
          grep -E "^test |test result|panicked|FAILED|failed|error|^blocks" | tail -30
        timeout 120 /tmp/c61/bin/example-candle_train 2>&1 | tail -6
      else
        for round in 1 2; do
          for build in base new; do
            bin=/tmp/c61/bin/bench-candle
            [[ $build == base ]] && bin=/tmp/c61/bin/bench-candle-base
            echo "--- round $round $build"
            timeout ${TB:-120} "$bin" --bench --configs 8192:128256:bf16 \
              --linear-configs 4096:4096:128256:bf16,8192:4096:128256:bf16 2>&1 | tail -8
          done
        done
      fi ;;
    candleab)
      echo "=== $mode $(date +%T)"
      [[ -x /tmp/c61b/bin/candle_cuda ]] || { mkdir -p /tmp/c61b && xz -dc bundle/c61b.tar.xz | tar -x -C /tmp/c61b; }
      cuda_libs
      for build in candle_cuda candle_cuda-base; do
        echo "--- $build"
        args=(--test-threads=1 --nocapture)
        [[ $build == candle_cuda-base ]] && args+=(--exact cuda_linear_cross_entropy_sums_grad_hidden_over_vocabulary_blocks_in_f32)
        XENT_REQUIRE_GPU=1 timeout ${TR:-240} /tmp/c61b/bin/$build "${args[@]}" 2>&1 |
          grep -E "^test |test result|panicked|FAILED|^by blocks|apart" | tail -30
      done ;;
    *) bash "$here/session60.sh" "$mode" ;;
  esac
done
