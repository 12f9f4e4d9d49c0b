#!/usr/bin/env bash
# Session 59's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session59.sh py memory full`; any other step goes to session57.sh (and
# on to 56, 55, ...). The tree's python/xent is copied over the bundle's site first.
# `full` issue 12's whole table in one run: every method of linear_bench.py (the peers CCE and
#   CCE exact included: bundle/wheels/ now carries cut-cross-entropy 25.1.1), both inputs, the
#   time-memory curve, at 8192 and 16384 rows (`LC=` other configs, `LR=` rounds, `CURVE=` budgets).
# `verify` the Rust linear suite and the Python tests of session 59's changes (the in-place
#   gradient, the split head's chunks);
# `quick` the least of `verify` (the in-place tests, the split head's thread test), then
#   `xent_linear_small` against Liger at 8192 rows;
# `skip` the GPU tests of session 59's change (`skip_ignored` keeps the copy of the scored rows
#   within the call's chunk budget; new functions in the extension, whose `_xent.abi3.so` travels
#   as bundle/s59/_xent.abi3.so.xz and replaces the bundle's before any step).
set -u
here=$(dirname "$0")
site=bundle/python/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash "$here/session56.sh"  # only its setup (bundle/bin unpacked, python/xent over the site)
if [[ -f bundle/s59/_xent.abi3.so.xz ]]; then
  xz -dc bundle/s59/_xent.abi3.so.xz > "$site/xent/_xent.abi3.so" && echo "session59.sh: the extension of session 59"
fi
for mode in "$@"; do
  case $mode in
    skip)
      echo "=== $mode $(date +%T)"
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-240} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py python/tests/test_hf.py python/tests/test_linear_parallel.py \
        -k "skip or budget or scored or parallel or every_gpu" -rfEs 2>&1 | tail -8 ;;
    verify)
      # Session 59's Rust (in place, the split head's chunks by its widest shard) and Python.
      echo "=== $mode $(date +%T)"
      XENT_TESTS=linear XENT_REQUIRE_GPU=1 timeout ${TR:-200} bash bundle/run.sh test 2>&1 |
        grep -E "test result|cases|in place|panicked|FAILED|failed|error|against|worst" | tail -20
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-150} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py python/tests/test_vocab_parallel.py \
        -k "skip or budget or copy or vocab_parallel_linear" -rfEs 2>&1 | tail -6 ;;
    quick)
      # The least that checks session 59's Rust and Python on a GPU, then Liger's memory in place.
      echo "=== $mode $(date +%T)"
      XENT_TESTS=linear XENT_REQUIRE_GPU=1 timeout ${TR:-150} bash bundle/run.sh test \
        gpu_linear_fused_pass gpu_linear_vocab_parallel_matches 2>&1 |
        grep -E "test result|cases|in place|panicked|FAILED|failed|error|against|worst" | tail -12
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-90} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py -k "over_its_copy or skip_ignored_computes or budget" -rfEs 2>&1 | tail -4
      echo "=== small $(date +%T)"
      cp bench/linear_bench.py bundle/
      timeout ${TT:-100} bash bundle/run.sh linear --configs 8192:4096:128256 \
        --only xent_linear,xent_linear_small,liger_flce --curve "" 2>&1 | grep -E '^\||Error|error' | tail -8 ;;
    skipvp)
      # The vocabulary-split head's skip path (changed in session 59; not in `skip`'s selection).
      echo "=== $mode $(date +%T)"
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-120} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_vocab_parallel.py -k "vocab_parallel_linear" -rfEs 2>&1 | tail -4 ;;
    full)
      echo "=== $mode $(date +%T)"
      cp bench/linear_bench.py bundle/
      timeout ${TT:-560} bash bundle/run.sh linear --configs ${LC:-8192:4096:128256,16384:4096:128256} \
        --rounds ${LR:-1} --curve "${CURVE-256,512,1024,2048}" 2>&1 |
        grep -E '^\{|Error|error|summary|\|' | tail -80 ;;
    *) bash "$here/session57.sh" "$mode" ;;
  esac
done
