#!/usr/bin/env bash
# Runs xent's bundled binaries on a GPU machine that has no Rust toolchain.
# Written by `cargo xtask bundle`; copy the whole bundle/ folder and run it from anywhere:
#
#   run.sh [test] [ARGS...]     every test binary in bin/ (ARGS go to each test harness, e.g. a
#                               filter), then every example (bin/example-*), then the Python
#                               package's tests and examples (python/: its wheel installed into a
#                               scratch folder beside the machine's PyTorch); XENT_TESTS="options
#                               linear" runs only those binaries (here and in sanitize mode)
#   run.sh python [ARGS...]     only the Python package's tests (ARGS go to pytest) and examples
#   run.sh bench [ARGS...]      the same as test, then every bin/bench-* with --bench ARGS, then
#                               peers.py and torch_bench.py (the Python package's rows)
#                               (XENT_BENCH=1 run.sh does the same as run.sh bench)
#   run.sh linear [ARGS...]     linear + cross-entropy: linear_bench.py (xent's methods and
#                               peers_linear.py's, one process; ARGS go to it) into linear.log
#   run.sh vocab [ARGS...]      vocabulary-parallel, one GPU: vocab_parallel_bench.py (one rank's
#                               shard kernels per world size, % of their traffic bound)
#   run.sh multi [ARGS...]      vocabulary-parallel over every GPU of the machine: bin/nccl's
#                               tests and bin/linear's split-head NCCL test with XENT_NCCL_WORLD
#                               2, 4, 8 (as many as there are GPUs), the PyTorch split head's
#                               test on every GPU (test_linear_parallel.py), then torchrun
#                               vocab_parallel_bench.py --distributed, and again with --linear
#                               $XENT_MULTI_LINEAR (default 4096; 0: not) --entropy (NVLink
#                               multicast off)
#   run.sh jit                  the driver's compile of the PTX, timed with its cache off
#                               (CUDA_CACHE_DISABLE=1): bin/example-quickstart with the kernels
#                               loaded as one module when the handle is made (XENT_LAZY_MODULES=0),
#                               then with each kernel a module of its own on its first use (the
#                               default, XENT_LAZY_MODULES=1); then the same for the Python
#                               package's quickstart
#   run.sh precision [ARGS...]  the soft cap's error against float64: softcap_error.py (xent,
#                               Liger, PyTorch; ARGS go to it) into precision.log
#   run.sh sanitize [ARGS...]   the test binaries under compute-sanitizer: memcheck, racecheck,
#                               initcheck, synccheck (XENT_SANITIZE=1 is set for them;
#                               XENT_SANITIZE_TOOLS="initcheck synccheck" runs only those)
#   run.sh sweep [ARGS...]      bin/bench-throughput over forced cluster plans: sizes
#                               $XENT_SWEEP_SIZES (4-8) x threads per CTA $XENT_SWEEP_THREADS
#                               (auto 256 384 512) on $XENT_BENCH_CONFIGS (default: configs.txt),
#                               after the automatic plan, then sweep.py's tables (% of copy by
#                               size and threads, per option set: ARGS such as --options softcap)
#   run.sh ab PTX PTX...        an A/B of kernel builds on bin/bench-throughput: each PTX file
#                               (plain or .xz; `embedded`: the binaries' own) through XENT_PTX,
#                               `NAME.entries.ptx[.xz]` the committed PTX with those entries
#                               (bench/ptxentries.py extract/take),
#                               `PTX+VAR=VALUE+...` with those variables set too,
#                               $XENT_AB_ROUNDS rounds (default 2) whose order alternates (odd
#                               rounds as given, even rounds reversed: the second process of a
#                               pair reads up to a point lower), on $XENT_BENCH_CONFIGS (default:
#                               configs.txt) with --options $XENT_AB_OPTIONS (default
#                               none,softcap,softcap+accuracy,all); every row, tagged with its
#                               variant and round, appended to $OUT/ab.jsonl as each
#                               process ends (every A/B of a call), then ab.py's table of this one
#   run.sh small PTX PTX...     the same A/B for small calls: bin/bench-criterion's
#                               small/gpu_graph (µs a call in a graph; XENT_SMALL_ROWS for other
#                               row counts), rounds alternating as above, into small.log and a
#                               table; then, with XENT_TRACE_PTX (`cargo xtask ptx-trace`'s file),
#                               bin/example-small_trace's phase timeline from it
#   run.sh profile [ARGS...]    ncu on the main kernel (xent_cluster_*, xent_fused_*, xent_split_* or
#                               xent_chunk_*) of bin/bench-throughput on $XENT_BENCH_CONFIGS
#                               (default 8192:128256:bf16): speed of light, memory, occupancy,
#                               warp stalls, at the GPU's own clocks (--clock-control none);
#                               ARGS go to the bench (e.g. --plan cluster:8:256);
#                               XENT_NCU_SECTIONS adds ncu sections (e.g. "InstructionStats
#                               ComputeWorkloadAnalysis")
#
# Every binary runs under `timeout`, so a hung kernel costs minutes, not the machine. When OUT is
# set, output is also appended to $OUT/tests.log (bench.log, sanitize.log). Ends with the lines a
# note quotes (case counts, `test result:`, pytest's tally, each panic and the 4 lines after it)
# and one line per binary,
# `NAME: ok` or `NAME: FAILED(exit code)`, and exits 1 if any failed.
set -uo pipefail

mode=test
case "${1:-}" in
  test | python | bench | linear | vocab | multi | jit | precision | sanitize | sweep | profile | ab | small) mode=$1; shift ;;
esac
if [[ $mode == test && ${XENT_BENCH:-0} == 1 ]]; then mode=bench; fi
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi
caller_dir=$PWD
cd "$(dirname "$0")" || exit 2
export XENT_REQUIRE_GPU=1
# NVLink multicast stays off on the shared machines, for every NCCL user this script starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# cuBLASLt for the linear + cross-entropy GEMMs (tests/gemm.rs): PyTorch's own wheel's, when the
# caller has not pointed XENT_CUBLASLT elsewhere.
if [[ -z ${XENT_CUBLASLT:-} ]] && command -v python3 > /dev/null; then
  XENT_CUBLASLT=$(python3 -c '
import glob, os, site
for root in site.getsitepackages():
    hits = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcublasLt.so.*"), recursive=True))
    if hits:
        print(hits[0])
        break
' 2> /dev/null)
  export XENT_CUBLASLT
fi
# The candle-cuda binaries link cuBLAS, cuRAND and NVRTC by soname: PyTorch's wheels have them
# beside cuBLASLt (the driver provides libcuda).
if [[ -n ${XENT_CUBLASLT:-} && -f $XENT_CUBLASLT ]]; then
  export LD_LIBRARY_PATH="$(dirname "$XENT_CUBLASLT")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# `cargo xtask bundle` packs the binaries (they embed the PTX text, which compresses well).
if [[ ! -d bin && -f bin.tar.xz ]]; then
  # Python's tarfile when tar has no xz at hand.
  tar -xJf bin.tar.xz 2> /dev/null ||
    python3 -c 'import tarfile; tarfile.open("bin.tar.xz").extractall()' || exit 2
fi
shopt -s nullglob

names=() codes=() notes=()
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# to_log FILE: copies stdin to stdout, and appends it to $OUT/FILE when OUT is set.
to_log() {
  if [[ -n ${OUT:-} ]]; then tee -a "$OUT/$1"; else cat; fi
}

# run_one NAME LOG CMD...: runs CMD with its output streamed (and logged), records its exit code.
run_one() {
  local name=$1 log=$2; shift 2
  echo "=== $name: $*" | to_log "$log"
  "$@" 2>&1 | tee "$scratch/last.out" | to_log "$log"
  local rc=${PIPESTATUS[0]}
  # The lines a closing note quotes: case counts, harness results, pytest's tally, panics.
  { grep -a -E "cases|test result:|[0-9]+ passed|[0-9]+ failed" "$scratch/last.out"
    grep -a -A4 "panicked" "$scratch/last.out"; } | sed "s|^|$name: |" >> "$scratch/highlights"
  names+=("$name") codes+=("$rc") notes+=("")
  echo "=== $name: exit code $rc" | to_log "$log"
}

# variants MODE SPEC...: the builds an A/B compares, from `PTX`, `PTX.xz`, `embedded` and
# `PTX+VAR=VALUE+...` specs, into ab_names, ab_paths ("" for the binaries' own) and ab_envs.
variants() {
  local what=$1
  shift
  if (($# < 2)); then echo "run.sh $what: name two or more PTX files (or embedded)" >&2; exit 2; fi
  ab_names=() ab_paths=() ab_envs=()
  local spec env_spec name taken
  for spec in "$@"; do
    # `PTX+VAR=VALUE+...`: that build with those variables set (e.g. embedded+XENT_PERSIST=1).
    env_spec=
    if [[ $spec == *+* ]]; then env_spec=${spec#*+} spec=${spec%%+*}; fi
    ab_envs+=("${env_spec//+/ }")
    if [[ $spec == embedded ]]; then
      ab_names+=("embedded${env_spec:++$env_spec}") ab_paths+=("")
      continue
    fi
    [[ $spec == /* ]] || spec=$caller_dir/$spec
    if [[ ! -f $spec ]]; then echo "run.sh $what: no file $spec" >&2; exit 2; fi
    name=$(basename "$spec" .xz)
    name=${name%.ptx}${env_spec:++$env_spec}
    # Two files of one name (a/sm_90.ptx, b/sm_90.ptx) keep apart: the later one is numbered.
    for taken in "${ab_names[@]}"; do
      if [[ $taken == "$name" ]]; then name=$name-${#ab_names[@]}; break; fi
    done
    if [[ $spec == *.xz ]]; then
      xz -dc "$spec" > "$scratch/ab-${#ab_names[@]}.ptx" || exit 2
      spec=$scratch/ab-${#ab_names[@]}.ptx
    fi
    # `NAME.entries.ptx[.xz]` (`ptxentries.py extract`'s file): those entries put into the
    # committed PTX of the architecture run (XENT_ARCH, else sm_90), which must be the one the
    # binaries embed (ptx.sha256, written with the bundle).
    if [[ $name == *.entries* ]]; then
      name=${name/.entries/}
      local arch=${XENT_ARCH:-sm_90} sums=$PWD/ptx.sha256
      if ! (cd "$caller_dir" && grep " host/ptx/$arch.ptx\$" "$sums" | sha256sum -c --quiet -); then
        echo "run.sh $what: $caller_dir/host/ptx/$arch.ptx is not the PTX the bundle's binaries embed" >&2
        exit 2
      fi
      python3 ptxentries.py take "$caller_dir/host/ptx/$arch.ptx" "$spec" \
        "$scratch/ab-${#ab_names[@]}-whole.ptx" || exit 2
      spec=$scratch/ab-${#ab_names[@]}-whole.ptx
    fi
    ab_names+=("$name") ab_paths+=("$spec")
  done
}

# variant_env I: env(1)'s arguments that run variant I (its XENT_PTX and variables), in ptx_env.
variant_env() {
  ptx_env=(-u XENT_PTX)
  [[ -n ${ab_paths[$1]} ]] && ptx_env=(XENT_PTX="${ab_paths[$1]}")
  # shellcheck disable=SC2206 # the variables are words: VAR=VALUE
  ptx_env+=(${ab_envs[$1]})
}

# round_order ROUND: the variants' indices in ROUND's order (odd rounds as given, even reversed:
# the second process of a pair reads up to a point lower), in order.
round_order() {
  order=("${!ab_names[@]}")
  if (($1 % 2 == 0)); then
    order=()
    for ((i = ${#ab_names[@]} - 1; i >= 0; i--)); do order+=("$i"); done
  fi
}

tests=()
for bin in bin/*; do
  case ${bin#bin/} in example-* | bench-*) ;; *) tests+=("${bin#bin/}") ;; esac
done
if [[ ${#tests[@]} == 0 ]]; then echo "run.sh: no test binaries in $PWD/bin" >&2; exit 2; fi
# XENT_TESTS="options linear": only those test binaries (and, in test mode, no examples or Python).
if [[ -n ${XENT_TESTS:-} ]]; then
  for name in $XENT_TESTS; do
    [[ -x bin/$name ]] || { echo "run.sh: XENT_TESTS names $name, not a test binary in bin/" >&2; exit 2; }
  done
  read -r -a tests <<< "$XENT_TESTS"
fi

log=tests.log
case $mode in sanitize | sweep | profile | linear | vocab | multi | jit | precision | ab | small) log=$mode.log ;; esac

# The Python package, importable beside the machine's PyTorch: the wheel unpacked by the bundle
# (python/site/, from bin.tar.xz), or a wheel installed into a scratch folder.
install_xent_wheel() {
  if [[ -d python/site/xent ]]; then
    export PYTHONPATH="$PWD/python/site${PYTHONPATH:+:$PYTHONPATH}"
    return 0
  fi
  local wheels=(python/xent-*.whl)
  if [[ ${#wheels[@]} == 0 ]]; then echo "run.sh: no python/site/ or python/xent-*.whl in the bundle" >&2; return 1; fi
  python3 -m pip install -q --no-index --no-deps --target "$scratch/xent" "${wheels[@]}" &&
    export PYTHONPATH="$scratch/xent${PYTHONPATH:+:$PYTHONPATH}"
}

# run_python ARGS...: the Python package's tests (ARGS go to pytest), then its examples.
run_python() {
  if ! install_xent_wheel; then
    names+=("python wheel") codes+=(2) notes+=("")
    return
  fi
  # The peers' wheels too, where the bundle has them, so that the tests comparing with a peer
  # (Liger's token scaling) run instead of skipping.
  install_peer_wheels
  run_one "pytest python/tests" "$log" timeout 900 python3 -m pytest -q -p no:cacheprovider \
    python/tests "$@"
  for example in python/examples/*.py; do
    run_one "$example" "$log" timeout 120 python3 "$example"
  done
}

# The pure-Python peers travel as wheels (bundle/wheels/, from `pip download`).
install_peer_wheels() {
  local wheels=(wheels/*.whl)
  # (nullglob: no wheels is an empty list, which `set -u` refuses to index.)
  if ((${#wheels[@]} > 0)) && [[ ! -d $scratch/site ]]; then
    python3 -m pip install -q --no-index --no-deps --target "$scratch/site" "${wheels[@]}" &&
      export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

# run_peer_script SCRIPT SECONDS ARGS...: a Python script beside the peers' wheels and xent's.
run_peer_script() {
  local script=$1 seconds=$2; shift 2
  install_peer_wheels
  if install_xent_wheel; then
    run_one "$script" "$log" timeout "$seconds" python3 "$script" "$@"
  else
    names+=("python wheel") codes+=(2) notes+=("")
  fi
}

if [[ $mode == python ]]; then
  run_python "$@"
elif [[ $mode == vocab ]]; then
  run_peer_script vocab_parallel_bench.py 900 "$@"
elif [[ $mode == multi ]]; then
  gpus=$(nvidia-smi -L 2> /dev/null | wc -l)
  # The NCCL tests (one thread per GPU, one process per GPU) at each world size the machine has,
  # from 2 on, and the split LM head's linear + cross-entropy over NCCL (bin/linear's test, one
  # thread per GPU); then the benchmark over every GPU, the loss on logits and (XENT_MULTI_LINEAR,
  # default 4096: the hidden states' D; 0 skips it) linear + cross-entropy over the split head.
  for world in 2 4 8; do
    if ((world <= gpus)); then
      XENT_NCCL_WORLD=$world run_one "nccl x$world" "$log" timeout 900 ./bin/nccl --test-threads=1
      XENT_NCCL_WORLD=$world run_one "linear x$world" "$log" timeout 900 ./bin/linear --test-threads=1 \
        gpu_linear_vocab_parallel_over_nccl
    fi
  done
  install_peer_wheels
  if install_xent_wheel; then
    # The PyTorch split head, one process a GPU over NCCL, against the whole head.
    run_one "pytest split head x$gpus" "$log" timeout 600 python3 -m pytest -q -p no:cacheprovider \
      python/tests/test_linear_parallel.py -k every_gpu -rs
    run_one "torchrun x$gpus vocab_parallel_bench.py" "$log" timeout 1800 \
      python3 -m torch.distributed.run --standalone --nproc_per_node="${XENT_GPUS:-$gpus}" \
      vocab_parallel_bench.py --distributed "$@"
    if ((${XENT_MULTI_LINEAR:-4096} > 0)); then
      run_one "torchrun x$gpus vocab_parallel_bench.py --linear" "$log" timeout 1800 \
        python3 -m torch.distributed.run --standalone --nproc_per_node="${XENT_GPUS:-$gpus}" \
        vocab_parallel_bench.py --distributed --linear "${XENT_MULTI_LINEAR:-4096}" --entropy "$@"
    fi
  else
    names+=("python wheel") codes+=(2) notes+=("")
  fi
elif [[ $mode == jit ]]; then
  for lazy in 0 1; do
    start=$(date +%s.%N)
    CUDA_CACHE_DISABLE=1 XENT_LAZY_MODULES=$lazy run_one "example-quickstart (cache off, XENT_LAZY_MODULES=$lazy)" \
      "$log" timeout 600 ./bin/example-quickstart
    notes[-1]="$(awk "BEGIN { printf \"%.1f s\", $(date +%s.%N) - $start }")"
  done
  # The same for the Python package's quickstart (PyTorch's own start-up included in both).
  if [[ -f python/examples/quickstart.py ]] && install_xent_wheel; then
    for lazy in 0 1; do
      start=$(date +%s.%N)
      CUDA_CACHE_DISABLE=1 XENT_LAZY_MODULES=$lazy run_one "python/examples/quickstart.py (cache off, XENT_LAZY_MODULES=$lazy)" \
        "$log" timeout 600 python3 python/examples/quickstart.py
      notes[-1]="$(awk "BEGIN { printf \"%.1f s\", $(date +%s.%N) - $start }")"
    done
  fi
elif [[ $mode == precision ]]; then
  run_peer_script softcap_error.py 900 "$@"
elif [[ $mode == linear ]]; then
  run_peer_script linear_bench.py 1800 "$@"
elif [[ $mode == ab ]]; then
  variants ab "$@"
  : > "$scratch/ab.jsonl"
  configs=${XENT_BENCH_CONFIGS:-$(cat configs.txt)}
  for ((round = 1; round <= ${XENT_AB_ROUNDS:-2}; round++)); do
    round_order "$round"
    for i in "${order[@]}"; do
      variant_env "$i"
      run_one "bench-throughput ${ab_names[i]} round $round" "$log" timeout 300 \
        env "${ptx_env[@]}" ./bin/bench-throughput --bench --configs "$configs" \
        --options "${XENT_AB_OPTIONS:-none,softcap,softcap+accuracy,all}"
      sed "s/^{/{\"variant\": \"${ab_names[i]}\", \"round\": $round, /" "$scratch/last.out" > "$scratch/tagged"
      cat "$scratch/tagged" >> "$scratch/ab.jsonl"
      # $OUT/ab.jsonl gathers every process's rows as it ends: all the A/Bs of a call, and those
      # of a call cut short.
      if [[ -n ${OUT:-} ]]; then cat "$scratch/tagged" >> "$OUT/ab.jsonl"; fi
    done
  done
  python3 ab.py "$scratch/ab.jsonl" | to_log "$log"
elif [[ $mode == small ]]; then
  variants small "$@"
  : > "$scratch/small.tsv"
  for ((round = 1; round <= ${XENT_AB_ROUNDS:-2}; round++)); do
    round_order "$round"
    for i in "${order[@]}"; do
      variant_env "$i"
      run_one "bench-criterion ${ab_names[i]} round $round" "$log" timeout 300 \
        env "${ptx_env[@]}" ./bin/bench-criterion --bench small/gpu_graph --warm-up-time 1 \
        --measurement-time 2
      # Criterion prints the case, then (on the same line or the next) `time: [low mid high]`.
      awk -v v="${ab_names[i]}" -v r="$round" '
        /^small\/gpu_graph\// { split($1, id, "/"); case_ = id[3] }
        /time:/ && case_ != "" { for (k = 1; k <= NF; k++) if ($k == "time:") { print v "\t" r "\t" case_ "\t" substr($(k + 3), 1) " " $(k + 4); case_ = "" } }
      ' "$scratch/last.out" >> "$scratch/small.tsv"
    done
  done
  { echo "small/gpu_graph, the middle estimate a call (variant, round: case time)"
    sort -t $'\t' -k3,3 -k1,1 -k2,2n "$scratch/small.tsv" | awk -F '\t' '{ print $3 "  " $1 "  round " $2 ": " $4 }'
  } | to_log "$log"
  if [[ -n ${XENT_TRACE_PTX:-} ]]; then
    trace=$XENT_TRACE_PTX
    [[ $trace == /* ]] || trace=$caller_dir/$trace
    if [[ $trace == *.xz ]]; then xz -dc "$trace" > "$scratch/trace.ptx" || exit 2; trace=$scratch/trace.ptx; fi
    run_one "small_trace" "$log" timeout 120 env XENT_PTX="$trace" ./bin/example-small_trace
  fi
elif [[ $mode == profile ]]; then
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  if [[ ! -x $ncu ]]; then echo "run.sh: ncu not found; put CUDA's bin/ on PATH" >&2; exit 2; fi
  # The first launches warm up (module load, first plan); profile one launch after them.
  extra=()
  for section in ${XENT_NCU_SECTIONS:-}; do extra+=(--section "$section"); done
  run_one "ncu bench-throughput" "$log" timeout 600 "$ncu" --clock-control none \
    --kernel-name regex:'xent_(cluster|fused|chunk|split)' --launch-skip 4 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats ${extra[@]+"${extra[@]}"} \
    ./bin/bench-throughput --bench --iters 5 --configs "${XENT_BENCH_CONFIGS:-8192:128256:bf16}" "$@"
elif [[ $mode == sweep ]]; then
  configs=${XENT_BENCH_CONFIGS:-$(cat configs.txt)}
  # The automatic plan first, for the tables' comparison.
  run_one "bench-throughput (automatic plan)" "$log" timeout 300 ./bin/bench-throughput --bench \
    --configs "$configs" "$@"
  cat "$scratch/last.out" >> "$scratch/auto.jsonl"
  for size in ${XENT_SWEEP_SIZES:-4 5 6 7 8}; do
    for threads in ${XENT_SWEEP_THREADS:-auto 256 384 512}; do
      plan=cluster:$size
      [[ $threads != auto ]] && plan=$plan:$threads
      run_one "bench-throughput $plan" "$log" timeout 300 ./bin/bench-throughput --bench \
        --configs "$configs" --plan "$plan" "$@"
      cat "$scratch/last.out" >> "$scratch/sweep.jsonl"
    done
  done
  python3 sweep.py --auto "$scratch/auto.jsonl" "$scratch/sweep.jsonl" | to_log "$log"
else
  if command -v nvidia-smi > /dev/null; then nvidia-smi -L 2>&1 | to_log "$log"; fi
  if [[ $mode == sanitize ]]; then
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [[ ! -x $sanitizer ]]; then echo "run.sh: compute-sanitizer not found; put CUDA's bin/ on PATH" >&2; exit 2; fi
    export XENT_SANITIZE=1
    # A binary whose tests never touch CUDA is an error to compute-sanitizer unless told otherwise.
    sanitizer_flags=(--error-exitcode 99)
    if "$sanitizer" --help 2>&1 | grep -- --require-cuda-init > /dev/null; then
      sanitizer_flags+=(--require-cuda-init no)
    fi
    for tool in ${XENT_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
      for name in "${tests[@]}"; do
        run_one "$name [$tool]" "$log" timeout 900 "$sanitizer" --tool "$tool" "${sanitizer_flags[@]}" \
          "./bin/$name" --test-threads=1 "$@"
        notes[-1]=$(grep -a -e 'SUMMARY' -e 'before first instrumented API call' "$scratch/last.out" |
          tail -n 1 | sed 's/^=* *//')
      done
    done
  else
    test_args=()
    [[ $mode == test ]] && test_args=("$@")
    for name in "${tests[@]}"; do
      run_one "$name" "$log" timeout 600 "./bin/$name" --test-threads=1 "${test_args[@]}"
    done
    if [[ -z ${XENT_TESTS:-} ]]; then
      for bin in bin/example-*; do
        run_one "${bin#bin/}" "$log" timeout 120 "./$bin"
      done
      if [[ $mode == test ]]; then run_python; else run_python -x; fi
    fi
  fi
fi

if [[ $mode == bench ]]; then
  export CRITERION_HOME=${CRITERION_HOME:-${OUT:-$PWD}/criterion}
  for bin in bin/bench-*; do
    run_one "${bin#bin/}" bench.log timeout 1800 "./$bin" --bench --configs "${XENT_BENCH_CONFIGS:-$(cat configs.txt)}" "$@"
  done
  if [[ -f peers.py ]]; then
    install_peer_wheels
    run_one peers.py bench.log timeout 1800 python3 peers.py --configs "${XENT_BENCH_CONFIGS:-$(cat configs.txt)}"
  fi
  if [[ -f torch_bench.py ]] && { [[ -d $scratch/xent ]] || install_xent_wheel; }; then
    run_one torch_bench.py bench.log timeout 900 python3 torch_bench.py --configs "${XENT_BENCH_CONFIGS:-$(cat configs.txt)}"
  fi
  if [[ -f table.py && -n ${OUT:-} ]]; then
    python3 table.py "$OUT/bench.log" | to_log bench.log
  elif [[ -f table.py ]]; then
    echo "run.sh: set OUT to get the combined table (table.py reads \$OUT/bench.log)"
  fi
fi

failed=0
if [[ -s $scratch/highlights ]]; then
  echo "=== results ($mode)" | to_log "$log"
  to_log "$log" < "$scratch/highlights"
fi
echo "=== summary ($mode)" | to_log "$log"
for i in "${!names[@]}"; do
  if [[ ${codes[i]} == 0 ]]; then status=ok; else status="FAILED(${codes[i]})" failed=1; fi
  echo "${names[i]}: $status${notes[i]:+  ${notes[i]}}" | to_log "$log"
done
exit "$failed"
