#!/usr/bin/env bash
# Session 52's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session52.sh overlay new sanitize rust pytest entropybench`; the steps
# run in the order given, and any other step goes to session51.sh (and on to 50, 49, ...).
# `new` runs the differentiable entropy's tests alone: the Rust `options` binary's entropy tests
# (the GPU backward with the entropies' gradient against the CPU reference) and pytest -k
# "entropy" over test_torch.py and test_linear.py, with XENT_REQUIRE_GPU=1.
# `sanitize` runs `gpu_entropy_gradient` under compute-sanitizer's four tools (the `opt_`
# backward kernels' new loads).
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    new)
      echo "=== $mode $(date +%T)"
      (cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; })
      XENT_TESTS=options XENT_REQUIRE_GPU=1 timeout 200 bash bundle/run.sh test entropy 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error|mismatch" | tail -20
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-300} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_torch.py python/tests/test_linear.py -k entropy -rfEs 2>&1 | tail -12) ;;
    sanitize)
      echo "=== $mode $(date +%T)"
      XENT_TESTS=options timeout 400 bash bundle/run.sh sanitize gpu_entropy_gradient 2>&1 |
        grep -E "ERROR SUMMARY|test result|passed|failed|error" | tail -12 ;;
    rustex)
      echo "=== $mode $(date +%T)"
      (cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; } && timeout 120 ./bin/example-two_phase 2>&1 | tail -6)
      XENT_TESTS="options two_phase" XENT_REQUIRE_GPU=1 timeout 200 bash bundle/run.sh test entropy two_phase misused 2>&1 |
        grep -E "test result|cases|panicked|FAILED|failed|error" | tail -12 ;;
    trl)
      echo "=== $mode $(date +%T)"
      peers=/tmp/s51-peers
      [[ -d $peers ]] || python3 -m pip install -q --no-index --no-deps --target "$peers" bundle/wheels/*.whl
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site:$peers" timeout ${T:-200} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_trl.py -rfEs 2>&1 | tail -12) ;;
    *) bash "$here/session51.sh" "$mode" ;;
  esac
done
