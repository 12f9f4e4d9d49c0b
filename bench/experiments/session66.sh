#!/usr/bin/env bash
# Session 66's steps for a GPU run: run from the repository root with bundle/ carried (built on
# session 66's head: its `bench-throughput` prints the partition's streaming rate), e.g.
# `bash bench/experiments/session66.sh first sm80both`; any other step goes to session65.sh (and
# on to 64, 63, ...), whose setup (bundle/bin unpacked, python/xent over the site) runs first.
# `first`    session 65's next call: `inplace allfive small8` (the in-place linear tests after
#            734b646, never GPU-run; all five at 16384 x 151936 again; forced plans at 6-16 rows).
# `sm80both` issue 13's sm_80 rows two ways, `ROUNDS` (2) rounds, plain loss: under the A100's
#            limits on a partition of 108 SMs (`XENT_GREEN_SMS=108`, the faithful emulation since
#            session 36, which the issue table's rows used) and under the limits on the planner
#            only (the issue's own words: 108 SMs' worth of resident blocks, on every SM; last
#            measured in session 37, before the tagged handshake and the 256-byte chunks). The
#            first line of each process now has `scale_GBps` (xent's scale kernel, one read and one
#            write a value, on the 108 SMs) and `scale_GBps_device` (the same on every SM): what a
#            plain streaming kernel reaches on that many SMs, against the whole device's copy.
set -u
here=$(dirname "$0")
out=${OUT:-/tmp}
mkdir -p "$out"
for mode in "$@"; do
  case $mode in
    first) bash "$here/session65.sh" inplace allfive small8 ;;
    sm80both)
      bash "$here/session60.sh"  # only its setup
      nvidia-smi -L
      cfg=8192:128256:bf16,4096:262144:bf16,16384:151936:bf16,8192:128256:f16,8192:128256:f32
      for round in $(seq ${ROUNDS:-2}); do
        for green in 108 none; do
          echo "--- round $round XENT_GREEN_SMS=$green $(date +%T)"
          env_green=(XENT_GREEN_SMS=$green)
          [[ $green == none ]] && env_green=()
          (cd bundle && env "${env_green[@]}" XENT_ARCH=sm_80 XENT_LIMITS=a100 timeout ${TS:-200} \
            ./bin/bench-throughput --bench --configs "$cfg" --options none) 2>&1 |
            tee -a "$out/s66-sm80both.jsonl" | python3 -c 'import json, sys
for l in sys.stdin:
    if not l.startswith("{"):
        print(l.rstrip()); continue
    d = json.loads(l)
    if "copy_GBps" in d:
        print(l.strip()); continue
    if "pct_of_copy" in d:
        print(d["n"], d["v"], d["dtype"], d["ms_median"], d["eff_GBps"], d["pct_of_copy"], d["plan"][:40])'
        done
      done ;;
    *) bash "$here/session65.sh" "$mode" ;;
  esac
done
