#!/usr/bin/env bash
# Session 53's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session53.sh new sanitize vbench`; the steps run in the order given, and
# any other step goes to session52.sh (and on to 51, 50, ...).
# `new` runs the vocabulary-parallel entropies' tests: the Rust `vocab_parallel` binary (P shards
# on one GPU against the whole vocabulary's reference, the entropies and their gradient among the
# option sets), the Rust and Python examples, and pytest over test_vocab_parallel.py (simulated
# ranks, a one-rank NCCL group, torch.compile), with XENT_REQUIRE_GPU=1.
# `sanitize` runs the `gpu_shards` test under compute-sanitizer's four tools (the new kernels).
# `vbench` times one rank's kernels with and without the entropies (vocab_parallel_bench.py
# --entropy), then the entropy bonus against a Megatron + verl-style PyTorch peer under a
# one-process torchrun (world 1); `vdist` only the latter.
# `nccl` runs the Rust NCCL tests (one rank here: a communicator per GPU, one thread and one
# process per GPU, every option set, the entropies with two of them, CUDA graph replays).
set -u
here=$(dirname "$0")
site=bundle/python/site
for mode in "$@"; do
  case $mode in
    new)
      echo "=== $mode $(date +%T)"
      (cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; })
      XENT_TESTS=vocab_parallel XENT_REQUIRE_GPU=1 timeout 300 bash bundle/run.sh test 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error|against|differ" | tail -20
      (cd bundle && timeout 120 ./bin/example-vocab_parallel 2>&1 | tail -3)
      (export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
       PYTHONPATH="$PWD/$site" timeout 200 python3 python/examples/vocab_parallel.py 2>&1 | tail -5
       cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-400} python3 -m pytest -q \
         -p no:cacheprovider python/tests/test_vocab_parallel.py -rfEs 2>&1 | tail -14) ;;
    sanitize)
      echo "=== $mode $(date +%T)"
      XENT_TESTS=vocab_parallel timeout 500 bash bundle/run.sh sanitize gpu_shards 2>&1 |
        grep -E "ERROR SUMMARY|test result|passed|failed|error" | tail -12 ;;
    vbench)
      echo "=== $mode $(date +%T)"
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      PYTHONPATH="$PWD/$site" timeout 300 python3 bench/vocab_parallel_bench.py --entropy \
        --configs ${VB_CONFIGS:-8192:128256,16384:151936} --worlds ${VB_WORLDS:-1,2,4,8} 2>&1 | tail -20
      PYTHONPATH="$PWD/$site" timeout 300 python3 -m torch.distributed.run --nproc_per_node=1 \
        bench/vocab_parallel_bench.py --distributed --entropy --configs ${VD_CONFIGS:-8192:128256} 2>&1 |
        grep -E '^\{|Error|error' | tail -12 ;;
    nccl)
      echo "=== $mode $(date +%T)"
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      XENT_TESTS=nccl XENT_REQUIRE_GPU=1 timeout 300 bash bundle/run.sh test 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error|against|differ" | tail -12 ;;
    vdist)
      echo "=== $mode $(date +%T)"
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      PYTHONPATH="$PWD/$site" timeout 300 python3 -m torch.distributed.run --nproc_per_node=1 \
        bench/vocab_parallel_bench.py --distributed --entropy --configs ${VD_CONFIGS:-8192:128256} 2>&1 |
        grep -E '^\{|Error|error' | tail -12 ;;
    *) bash "$here/session52.sh" "$mode" ;;
  esac
done
