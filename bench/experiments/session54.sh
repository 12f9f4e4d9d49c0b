#!/usr/bin/env bash
# Session 54's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session54.sh new lbench`; the steps run in the order given, and any
# other step goes to session53.sh (and on to 52, 51, ...). The tree's python/xent is copied over
# the bundle's site first (the wheel's extension is the bundle's build).
# `new` runs the vocabulary-parallel linear loss's tests: the Rust `linear` binary (its GPU test
# with P in {1, 2, 3} ranks as threads on one GPU against the whole head's arithmetic) and the
# `vocab_parallel` binary (the shard refusals), pytest over test_vocab_parallel.py and
# test_linear.py (a one-rank NCCL group against xt.linear_cross_entropy), and the Python example.
# `lbench` times the linear methods under a one-process torchrun at D = 4096: the whole head
# (world 1) and one rank's share of 2, 4 and 8-rank calls, xent against a Megatron-style peer,
# with the entropy bonus.
# `sanitize` runs the new Rust GPU test under compute-sanitizer memcheck.
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
      XENT_TESTS="linear vocab_parallel" XENT_REQUIRE_GPU=1 timeout 400 bash bundle/run.sh test 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error|against|differ" | tail -20
      PYTHONPATH="$PWD/$site" timeout 200 python3 python/examples/vocab_parallel_linear.py 2>&1 | tail -6
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-300} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_vocab_parallel.py python/tests/test_linear_parallel.py -rfEs 2>&1 | tail -8
      # xt.linear_cross_entropy's pass (its binding call changed): the options, upstreams, entropy.
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-300} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py -k "options_match or upstream or entropy_gradient or no_rows or bad_inputs" \
        -rfEs 2>&1 | tail -8 ;;
    lbench)
      echo "=== $mode $(date +%T)"
      PYTHONPATH="$PWD/$site" timeout 400 python3 -m torch.distributed.run --nproc_per_node=1 \
        bench/vocab_parallel_bench.py --linear ${LD:-4096} --entropy --as-worlds ${LW:-2,4,8} \
        --configs ${LC:-8192:128256} 2>&1 | grep -E '^\{|Error|error' | tail -30 ;;
    sanitize)
      echo "=== $mode $(date +%T)"
      XENT_TESTS=linear timeout 500 bash bundle/run.sh sanitize gpu_linear_vocab_parallel 2>&1 |
        grep -E "ERROR SUMMARY|test result|passed|failed|error" | tail -12 ;;
    *) bash "$here/session53.sh" "$mode" ;;
  esac
done
