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
# `small8`  issue 13's 8 rows (8.003 µs on the H200 against its 8): criterion's small/gpu_graph at
#   `ROWS` (6,8,12,16) rows under forced cluster plans beside the automatic one (which takes a
#   cluster of 8 x 256 a row from 5 to 31 rows; session 20 measured that before the small-call
#   kernels existed). `PLANS` (space-separated) replaces the list of plans.
# `allfive` all five at 16384 x 151936 (46.8% of copy in bf16 in session 65's one round against
#   52.8 in session 47's) and 8192 x 128256, bf16 and f16, `ROUNDS` (2) rounds.
# `inplace` the Rust in-place linear tests after 734b646 (which GEMM the card takes in place is
#   printed: cuBLASLt on an H200, xent's on an H100).
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
    small8)
      bash "$here/session60.sh"  # only its setup
      echo "=== $mode $(date +%T)"
      for plan in ${PLANS:-auto cluster:16:128 cluster:8:128 cluster:8:256 cluster:16:256 cluster:4:256}; do
        echo "--- XENT_SMALL_PLAN=$plan"
        (cd bundle && XENT_SMALL_PLAN=$plan XENT_SMALL_ROWS=${ROWS:-6,8,12,16} timeout ${TC:-120} \
          ./bin/bench-criterion --bench small/gpu_graph --warm-up-time 1 --measurement-time 2) 2>&1 |
          tee -a "$out/s65-small8.txt" | grep -E "small/|time:" | grep -v Benchmarking
      done ;;
    allfive)
      bash "$here/session60.sh"  # only its setup
      echo "=== $mode $(date +%T)"
      for round in $(seq ${ROUNDS:-2}); do
        echo "--- round $round"
        (cd bundle && timeout ${TO:-200} ./bin/bench-throughput --bench \
          --configs 16384:151936:bf16,16384:151936:f16,8192:128256:bf16,8192:128256:f16 \
          --options softcap+accuracy,all) 2>&1 | tee -a "$out/s65-allfive.jsonl" | pct
      done ;;
    inplace)
      bash "$here/session60.sh"  # only its setup
      echo "=== $mode $(date +%T)"
      lt=$(python3 -c 'import glob, site
print(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/**/libcublasLt.so.*", recursive=True))[0])')
      XENT_CUBLASLT=$lt XENT_REQUIRE_GPU=1 timeout ${TR:-90} bundle/bin/linear in_place over_the_hidden_states \
        --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked|failed|weight gradient from" | tail -12 ;;
    *) bash "$here/session64.sh" "$mode" ;;
  esac
done
