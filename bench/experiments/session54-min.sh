#!/usr/bin/env bash
# Session 54's shortest GPU check (little device time left): the two new Rust GPU tests (threads on
# one GPU, and NCCL with one rank), the vocab_parallel refusals, and the one-rank NCCL pytest of
# xt.vocab_parallel_linear_cross_entropy. Run from the repository root with bundle/ carried.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 XENT_REQUIRE_GPU=1
cp -r python/xent/. bundle/python/site/xent/
cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; }
XENT_CUBLASLT=$(python3 -c 'import glob, os, torch
root = os.path.dirname(os.path.dirname(torch.__file__))
print(sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcublasLt.so.*"), recursive=True))[-1])')
export XENT_CUBLASLT LD_LIBRARY_PATH="$(dirname "$XENT_CUBLASLT")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 ./bin/linear vocab_parallel --test-threads=1 --nocapture 2>&1 | grep -E "cases|rank|test result|panicked|FAILED|differ|against" | tail -12
timeout 60 ./bin/vocab_parallel 2>&1 | grep -E "test result|panicked" | tail -3
PYTHONPATH="$PWD/python/site" timeout 90 python3 -m pytest -q -p no:cacheprovider ../python/tests/test_vocab_parallel.py \
  -k "linear" -rfEs 2>&1 | tail -6
