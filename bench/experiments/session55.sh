#!/usr/bin/env bash
# Session 55's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session55.sh new lbench`; any other step goes to session54.sh (and on
# to 53, 52, ...). The tree's python/xent is copied over the bundle's site first.
# `new` runs the split head's tests (the Rust `linear` and `vocab_parallel` binaries; pytest over
# test_vocab_parallel.py, with the compiled split head and skip_ignored, and test_linear_parallel.py;
# the example) and the linear path's tests its shared backward touches (upstreams, entropy
# gradient, compile). `sanitize` runs the thread test under the four compute-sanitizer tools.
set -u
here=$(dirname "$0")
site=bundle/python/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; })
cp -r python/xent/. "$site/xent/"
for mode in "$@"; do
  case $mode in
    new)
      echo "=== $mode $(date +%T)"
      XENT_TESTS="linear vocab_parallel" XENT_REQUIRE_GPU=1 timeout 300 bash bundle/run.sh test 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error|against|differ" | tail -20
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-240} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_vocab_parallel.py python/tests/test_linear_parallel.py -rfEs 2>&1 | tail -12
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-240} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py -k "options_match or upstream or entropy_gradient or no_rows or bad_inputs or compile" \
        -rfEs 2>&1 | tail -8
      PYTHONPATH="$PWD/$site" timeout 120 python3 python/examples/vocab_parallel_linear.py 2>&1 | tail -6 ;;
    sanitize)
      # The thread test alone: under memcheck NCCL's communicator init probes kernels for other
      # GPUs (64 cudaErrorNoKernelImageForDevice API errors, session 55), which the sanitizer counts.
      echo "=== $mode $(date +%T)"
      XENT_TESTS=linear timeout 580 bash bundle/run.sh sanitize gpu_linear_vocab_parallel_matches 2>&1 |
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|exit code" | tail -12 ;;
    *) bash "$here/session54.sh" "$mode" ;;
  esac
done
