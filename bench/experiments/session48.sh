#!/usr/bin/env bash
# Session 48's steps for the next GPU run: run from the repository root with bundle/ carried
# (7ea2b74's build or later), e.g. `bash bench/experiments/session48.sh overlay pytest-new hfbench`;
# the steps run in the order given, and any other step goes to session47.sh.
# `overlay` unpacks the bundle and copies the current python/xent, python/tests and
# python/examples over its wheel (session 48 changed only Python: autocast in
# linear_cross_entropy, xt.ForCausalLMLoss, vocabulary-parallel under torch.compile).
# `pytest-new` runs the tests session 48 could only run on the CPU (autocast, Transformers'
# loss), then the whole Python suite. `hfbench` times xt.ForCausalLMLoss against Transformers'
# ForCausalLMLoss written out (bench/torch_bench.py's `transformers_causal_lm` and
# `xent_torch[transformers]` rows, with time and extra peak memory) at 8192 x 128256 bf16.
set -u
here=$(dirname "$0")
site=bundle/python/site
for mode in "$@"; do
  echo "=== $mode $(date +%T)"
  case $mode in
    overlay)
      (cd bundle && { [[ -d bin ]] || tar -xJf bin.tar.xz; }) &&
        cp python/xent/*.py "$site/xent/" && cp python/xent/torch/*.py "$site/xent/torch/" &&
        rm -rf bundle/python/tests bundle/python/examples &&
        cp -r python/tests python/examples bundle/python/ && echo "overlay: ok" ;;
    pytest-new)
      (cd bundle && XENT_REQUIRE_GPU=1 PYTHONPATH="$PWD/python/site" timeout ${T:-300} python3 -m pytest -q \
        -p no:cacheprovider python/tests/test_hf.py python/tests/test_linear.py -k "autocast or hf or causal_lm" -rfEs 2>&1 | tail -8)
      T=${T2:-500} bash "$here/session47.sh" pytest ;;
    hfbench)
      PYTHONPATH="$PWD/$site" timeout ${T:-300} python3 bench/torch_bench.py --configs ${HF_CONFIGS:-8192:128256:bf16,4096:262144:bf16} \
        --host-iters 200 2>&1 | grep -E "copy_GBps|transformers|xent_torch" ;;
    *) bash "$here/session47.sh" "$mode" ;;
  esac
done
