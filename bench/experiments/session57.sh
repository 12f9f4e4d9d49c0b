#!/usr/bin/env bash
# Session 57's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session57.sh py memory`; any other step goes to session56.sh (and on to
# 55, 54, ...). The tree's python/xent is copied over the bundle's site first.
# `py` runs the Python tests of the linear path, the split head and the Transformers integration,
#   and the split head's example: session 57 folded the split head's autograd Function and custom
#   operators into the linear path's (Python only: the Rust is ad81645's, verified in session 56);
# `pyshort` the split head's tests and the whole head's compiled ones only (about 4 minutes).
# `pytiny` the split head's linear tests alone (eager and compiled, one rank over NCCL; about 2 minutes).
set -u
here=$(dirname "$0")
site=bundle/python/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash "$here/session56.sh"  # no step: only its setup (bundle/bin unpacked, python/xent over the site)
for mode in "$@"; do
  case $mode in
    py)
      echo "=== $mode $(date +%T)"
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-200} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_vocab_parallel.py python/tests/test_linear_parallel.py -rfEs 2>&1 | tail -8
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${TL:-260} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py python/tests/test_hf.py -rfEs 2>&1 | tail -8
      PYTHONPATH="$PWD/$site" timeout 120 python3 python/examples/vocab_parallel_linear.py 2>&1 | tail -6 ;;
    pyshort)
      # What fits a short run: the split head's files whole, then the whole head's compiled tests.
      echo "=== $mode $(date +%T)"
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-170} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_vocab_parallel.py python/tests/test_linear_parallel.py -rfEs 2>&1 | tail -8
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${TL:-100} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_linear.py -k "compile" -rfEs 2>&1 | tail -8 ;;
    pytiny)
      # The least that runs the folded split head on a GPU, eager and compiled (about 2 minutes).
      echo "=== $mode $(date +%T)"
      XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/$site" timeout ${T:-120} python3 -m pytest -q -p no:cacheprovider \
        python/tests/test_vocab_parallel.py python/tests/test_linear_parallel.py -k "linear or head" -rfEs 2>&1 | tail -8 ;;
    *) bash "$here/session56.sh" "$mode" ;;
  esac
done
