#!/usr/bin/env bash
# Session 56's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session56.sh verify sanck`; any other step goes to session55.sh (and on
# to 54, 53, ...). The tree's python/xent is copied over the bundle's site first.
# `verify` runs the Rust tests of the linear path (whole head and split: their checks and setup are
#   shared since session 56), the Python tests of the split head, the linear path and the
#   Transformers integration, and the split head's example;
# `sanck` the split head's thread test under initcheck and synccheck (session 55 ran memcheck and
#   racecheck; its initcheck was cut off by the run's limit);
# `table` issue 12's table: linear_bench.py's main methods at 8192 and 16384 rows, two rounds;
# `memory` one step of xent_linear, xent_linear_small and torch.compile's under the allocator's
#   history (linear_bench.py --memory): what each holds at its peak.
set -u
here=$(dirname "$0")
site=bundle/python/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; })
cp -r python/xent/. "$site/xent/"
for mode in "$@"; do
  case $mode in
    verify)
      echo "=== $mode $(date +%T)"
      XENT_TESTS="${VT:-linear vocab_parallel gemm}" XENT_REQUIRE_GPU=1 timeout ${TR:-240} bash bundle/run.sh test 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error|against|differ" | tail -20
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-200} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_vocab_parallel.py python/tests/test_linear_parallel.py -rfEs 2>&1 | tail -8
      # (about 125 s on an H100, session 56)
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${TL:-260} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py python/tests/test_hf.py -rfEs 2>&1 | tail -8
      PYTHONPATH="$PWD/$site" timeout 120 python3 python/examples/vocab_parallel_linear.py 2>&1 | tail -6 ;;
    sanck)
      echo "=== $mode $(date +%T)"
      XENT_SANITIZE_TOOLS="initcheck synccheck" XENT_TESTS=linear timeout ${TS:-400} bash bundle/run.sh sanitize \
        gpu_linear_vocab_parallel_matches 2>&1 | grep -E "ERROR SUMMARY|SUMMARY|test result|exit code" | tail -12 ;;
    memory)
      # Where the H100's extra 13 and 46 MiB (session 56) come from: one step of each under the
      # allocator's history.
      echo "=== $mode $(date +%T)"
      cp bench/linear_bench.py bundle/
      timeout ${TT:-300} bash bundle/run.sh linear --configs 8192:4096:128256 \
        --only xent_linear,xent_linear_small,torch_compile_linear --curve "" --memory 2>&1 |
        grep -E '^\{|^####|MiB|Error|error' | tail -40 ;;
    table)
      echo "=== $mode $(date +%T)"
      cp bench/linear_bench.py bundle/
      timeout ${TT:-540} bash bundle/run.sh linear --configs ${LC:-8192:4096:128256,16384:4096:128256} \
        --only xent_linear,xent_linear_small,xent_unfused,torch_compile_linear,liger_flce --rounds ${LR:-2} --curve "" 2>&1 |
        grep -E '^\{|Error|error|summary|\|' | tail -60 ;;
    *) bash "$here/session55.sh" "$mode" ;;
  esac
done
