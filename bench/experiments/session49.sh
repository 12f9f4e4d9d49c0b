#!/usr/bin/env bash
# Session 49's steps for the next GPU run: run from the repository root with bundle/ carried
# (7ea2b74's build or later), e.g. `bash bench/experiments/session49.sh overlay pytest-new hfmodel`;
# the steps run in the order given, and any other step goes to session48.sh.
# `pytest-new` runs session 49's new tests (xt.fuse_linear_cross_entropy on five architectures,
# the loss changed in place), then the whole Python suite (the loss is a copy now, everywhere).
# `flaky` repeats the reduce-overhead tests (one failed once in session 49's run 6).
# `hfmodel` times a Transformers model's training step with each loss (bench/hf_bench.py), with
# the peers' wheels on the path for Liger.
set -u
here=$(dirname "$0")
for mode in "$@"; do
  echo "=== $mode $(date +%T)"
  case $mode in
    pytest-new)
      python3 -c "import transformers; print('transformers', transformers.__version__)"
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-300} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_hf.py python/tests/test_torch.py -k "hf or fuse or fused or changed_in_place" -rfEs 2>&1 | tail -8)
      T=${T2:-500} bash "$here/session47.sh" pytest ;;
    hfmodel)
      peers=/tmp/s49-peers
      [[ -d $peers ]] || python3 -m pip install -q --no-index --no-deps --target "$peers" bundle/wheels/*.whl
      PYTHONPATH="$PWD/bundle/python/site:$peers" timeout ${T:-400} python3 bench/hf_bench.py ${HF_ARGS:-} 2>&1 | grep -v Warning | tail -30 ;;
    flaky)
      # Run 6's one failure (H100, the whole pytest): the reduce-overhead test's step 0 gradient,
      # cross_entropy-fused; it passed in runs 2, 3 and 7. ${N:-10} runs of the three fused and
      # two-phase cases, each in a fresh process.
      for i in $(seq ${N:-10}); do
        (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout 120 python3 -m pytest -q -p no:cacheprovider \
          python/tests/test_torch.py -k "reduce_overhead" 2>&1 | grep -E "^E  .*step|passed|failed" | tail -4)
      done ;;
    *) bash "$here/session48.sh" "$mode" ;;
  esac
done
