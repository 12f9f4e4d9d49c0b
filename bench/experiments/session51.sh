#!/usr/bin/env bash
# Session 51's steps for a GPU run: run from the repository root with bundle/ carried, e.g.
# `bash bench/experiments/session51.sh overlay linear testhf example sft`; the steps run in the
# order given, and any other step goes to session50.sh.
# `linear` runs python/tests/test_linear.py whole (skip_ignored: only the scored rows through the
# GEMMs, against every row and the float64 reference, every label ignored, graph capture).
# `example` runs python/examples/linear.py (the skip_ignored part times it on and off).
# `rust` runs the Rust test binaries the entropy touches (XENT_TESTS below; `gpu` too), with
# XENT_REQUIRE_GPU=1. `pytest` runs the whole Python suite. `entropybench` times per-token
# log-probabilities with and without entropies (bench/entropy_bench.py) beside TRL 1.16's fused
# head, its wheel from bundle/wheels. `compileflaky` runs run 5's selection (test_linear.py and
# test_torch.py, -k "compile or entropy or skip") in one process ${N:-5} times, keeping every failure's whole message (run 5's reduce-overhead failure
# came after other compile tests in the same process; its message was cut).
set -u
here=$(dirname "$0")
for mode in "$@"; do
  case $mode in
    linear)
      echo "=== $mode $(date +%T)"
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-400} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_linear.py -rfEs 2>&1 | tail -6) ;;
    example)
      echo "=== $mode $(date +%T)"
      (cd bundle && PYTHONPATH="$PWD/python/site" timeout 120 python3 python/examples/linear.py 2>&1 | tail -12) ;;
    rust)
      echo "=== $mode $(date +%T)"
      XENT_TESTS=${XENT_TESTS:-"options linear two_phase vocab_parallel graph gpu"} XENT_REQUIRE_GPU=1 \
        timeout ${T:-500} bash bundle/run.sh test 2>&1 | grep -E "test result|cases|panicked|FAILED|failed|error" | tail -40 ;;
    pytest)
      echo "=== $mode $(date +%T)"
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-450} python3 -m pytest -q \
        -p no:cacheprovider python/tests -rfEs 2>&1 | tail -8) ;;
    entropybench)
      echo "=== $mode $(date +%T)"
      peers=/tmp/s51-peers
      [[ -d $peers ]] || python3 -m pip install -q --no-index --no-deps --target "$peers" bundle/wheels/*.whl
      PYTHONPATH="$PWD/bundle/python/site:$peers" timeout ${T:-300} python3 bench/entropy_bench.py ${ENT_ARGS:-} 2>&1 | tail -40 ;;
    compileflaky)
      echo "=== $mode $(date +%T)"
      for i in $(seq ${N:-5}); do
        (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-200} python3 -m pytest -q \
          -p no:cacheprovider python/tests/test_linear.py python/tests/test_torch.py -k "compile or entropy or skip" \
          -rfE > /tmp/s51-compile.log 2>&1)
        echo "--- try $i: $(tail -1 /tmp/s51-compile.log)"
        sed -n '/^=* FAILURES/,/^=* short test summary/p' /tmp/s51-compile.log | grep -v "^\s*$" | tail -80
      done ;;
    *) bash "$here/session50.sh" "$mode" ;;
  esac
done
