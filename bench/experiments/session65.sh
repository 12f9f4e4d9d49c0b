#!/usr/bin/env bash
# Session 65's steps for a GPU run: run from the repository root with bundle/ carried (built on
# 4aa398e or later), e.g. `bash bench/experiments/session65.sh issue13 second`; any other step goes
# to session64.sh (and on to 63, 62, ...).
# `issue13` issue 13's whole table on the current code, one run, every part of it:
#   - the options at the three large shapes in bf16 and f16, and 8192 x 128256 f32 (`options`);
#   - Liger and torch.compile with the same options (`peers_options.py`, in bf16);
#   - the sm_80 kernels under an A100's limits on 108 SMs, the plain loss (`sm80`);
#   - criterion's small calls: host time, GPU time in a graph, the launch and graph floors;
#   - the soft cap's error against float64, xent against Liger and PyTorch (`precision`).
# Each part's output goes to $OUT/s65-issue13-PART.*, and a summary of % of copy is printed.
set -u
here=$(dirname "$0")
out=${OUT:-/tmp}
mkdir -p "$out"
big=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16
pct() {
  python3 -c 'import json, sys
for l in sys.stdin:
    if l.startswith("{") and "pct_of_copy" in l:
        d = json.loads(l)
        print(d["method"], d["n"], d["v"], d["dtype"], d["ms_median"], d["pct_of_copy"], d.get("plan", "")[:48])
    elif l.startswith("{\"copy"):
        print(l.strip())'
}
for mode in "$@"; do
  case $mode in
    issue13)
      bash "$here/session60.sh"  # only its setup (bundle/bin unpacked, python/xent over the site)
      nvidia-smi -L
      echo "=== options $(date +%T)"
      (cd bundle && timeout ${TO:-300} ./bin/bench-throughput --bench \
        --configs "$big,8192:128256:f16,4096:262144:f16,16384:151936:f16,8192:128256:f32" \
        --options none,smoothing,z,weight,accuracy,softcap,softcap+accuracy,all) 2>&1 |
        tee "$out/s65-issue13-options.jsonl" | pct
      echo "=== sm80 (A100 limits, 108 SMs) $(date +%T)"
      (cd bundle && XENT_ARCH=sm_80 XENT_LIMITS=a100 XENT_GREEN_SMS=108 timeout ${TS:-200} \
        ./bin/bench-throughput --bench --configs "$big,8192:128256:f16,8192:128256:f32" --options none) 2>&1 |
        tee "$out/s65-issue13-sm80.jsonl" | pct
      echo "=== small $(date +%T)"
      (cd bundle && timeout ${TC:-240} ./bin/bench-criterion --bench small --warm-up-time 1 \
        --measurement-time 3) 2>&1 | tee "$out/s65-issue13-small.txt" | grep -E "small/|time:"
      echo "=== peers_options $(date +%T)"
      python3 -m pip install -q --no-index --no-deps --target /tmp/s65-peers bundle/wheels/*.whl 2>&1 | tail -2
      PYTHONPATH=/tmp/s65-peers timeout ${TP:-300} python3 bundle/peers_options.py --configs "$big" 2>&1 |
        tee "$out/s65-issue13-peers.jsonl" | pct
      echo "=== precision $(date +%T)"
      PYTHONPATH="$PWD/bundle/python/site:/tmp/s65-peers" timeout ${TE:-300} python3 bench/softcap_error.py 2>&1 |
        tee "$out/s65-issue13-precision.jsonl" | tail -40 ;;
    *) bash "$here/session64.sh" "$mode" ;;
  esac
done
