//! Criterion benchmarks of the fused cross-entropy (loss + gradient, in place):
//!
//! - `cpu_reference`: `xent::cpu::forward_backward` (the f64 oracle), so the bench runs anywhere;
//!   throughput in logits per second.
//! - `gpu`: `CrossEntropy::forward_backward_into` at the two Llama-sized shapes, timed with
//!   CUDA events; throughput in bytes per second of the minimum traffic, one read and one write of
//!   every logit. Skipped with a note without a GPU (a failure under `XENT_REQUIRE_GPU=1`).
//! - `small`: 1, 8 and 64 rows of 128256 classes, bf16, every row scored (issue 13's small
//!   batches; until session 14 row 0 was ignored, so the 1-row case only zeroed its row): `host`,
//!   the wall time a call takes to enqueue (the GPU runs behind); `gpu_graph`, the GPU time a call
//!   takes inside a CUDA graph of `GRAPH_CALLS` calls, replayed between two events (the kernels
//!   and the gaps between them, without the host's launches); `launch_floor`, the driver's own
//!   share of `host`: an empty kernel with a parameter block of `XentParams`' size launched as one
//!   cluster of 8 CTAs of 256 threads (`cluster8`, what a call of one row launches) and as a plain
//!   launch of 8 CTAs (`plain`), and a plain launch with a block of 8 bytes (`plain8`: what the
//!   block's size costs); `graph_floor`, the GPU time a call of nothing takes in the same
//!   graph: a kernel that only waits for the one before it and lets the next one start (what
//!   every small call's kernel does first and last), launched as the small calls' plans launch
//!   (`cluster16x128` for 1-4 rows, `cluster8x256` a cluster a row for 8: `rows8`, and 64 rows of
//!   8 x 128: `rows64`), with the programmatic dependency xent's launches carry.
//!   `XENT_SMALL_PLAN` (a plan as throughput.rs's `--plan` spells it)
//!   forces the small calls' plan, `XENT_SMALL_ROWS` (comma-separated) their row counts.
//!
//! `cargo bench -p xent --bench criterion [-- FILTER | --test | --quick | ...]`. The bundle's
//! `run.sh` and `cargo xtask bench` pass every bench binary throughput.rs's options (`--configs
//! ...`), which criterion's command line rejects (it exits on an unknown argument): when one of
//! them is present the command line is ignored and criterion runs with its defaults.

use std::error::Error;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use xent::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use xent::cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use xent::half::bf16;
use xent::{CrossEntropy, Element, Loss, Options, Shape, cpu};

mod common;

/// (rows, vocab) of the CPU cases: a few rows of Llama 2's vocabulary, milliseconds per call.
const CPU_SHAPE: (usize, usize) = (64, 32000);

/// (rows, vocab) of the GPU cases, bf16: Llama 2's and Llama 3's vocabularies at 8192 tokens, the
/// first two rows of throughput.rs's table.
const GPU_SHAPES: [(usize, usize); 2] = [(8192, 32000), (8192, 128256)];

/// Rows of the `small` group's cases, of `SMALL_VOCAB` classes in bf16.
const SMALL_ROWS: [usize; 3] = [1, 8, 64];
const SMALL_VOCAB: usize = 128256;
/// Calls captured in the `small` group's graph.
const GRAPH_CALLS: usize = 100;
/// Calls the `small` group's host case enqueues before it waits for the GPU (untimed), so that
/// the launch queue never fills and blocks a timed call on the GPU.
const HOST_BLOCK: u64 = 256;

/// throughput.rs's options, which `run.sh` and `cargo xtask bench` pass to every bench binary.
const THROUGHPUT_OPTIONS: [&str; 5] = ["--configs", "--iters", "--plan", "--options", "--explain"];

fn main() {
    let mut criterion = criterion_from_args();
    cpu_reference(&mut criterion);
    gpu(&mut criterion);
    // What `criterion_main!` ends with: the summary of a benchmarking run (nothing in test mode).
    criterion.final_summary();
}

/// Criterion configured from the command line, unless it carries throughput.rs's options.
fn criterion_from_args() -> Criterion {
    match std::env::args().find(|arg| THROUGHPUT_OPTIONS.contains(&arg.as_str())) {
        None => Criterion::default().configure_from_args(),
        Some(option) => {
            eprintln!(
                "criterion: {option} is throughput.rs's; ignoring the command line, \
                 running every benchmark with criterion's defaults"
            );
            Criterion::default()
        }
    }
}

/// The `cpu_reference` group: bf16 and f32, the logits restored (untimed) before every call.
fn cpu_reference(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("cpu_reference");
    cpu_case::<bf16>(&mut group);
    cpu_case::<f32>(&mut group);
    group.finish();
}

fn cpu_case<T: Element>(group: &mut BenchmarkGroup<WallTime>) {
    let (n, v) = CPU_SHAPE;
    let (logits, labels) = inputs::<T>(n, v, true);
    let shape = Shape::flat(n, v);
    let opts = Options::default();
    group.throughput(Throughput::Elements((n * v) as u64));
    group.bench_function(
        BenchmarkId::new(T::DTYPE.name(), format!("{n}x{v}")),
        |bencher| {
            bencher.iter_batched_ref(
                || logits.clone(),
                |work| black_box(cpu::forward_backward(work, &labels, shape, &opts).expect("cpu")),
                BatchSize::LargeInput,
            )
        },
    );
}

/// The `gpu` group, or a note on stderr when there is no GPU.
fn gpu(criterion: &mut Criterion) {
    let Some(xent) = common::gpu("criterion", "skipping the gpu group") else {
        return;
    };
    let stream = xent.context().default_stream();
    let mut group = criterion.benchmark_group("gpu");
    for (n, v) in GPU_SHAPES {
        gpu_case::<bf16>(&mut group, &xent, &stream, n, v).expect("gpu benchmark setup");
    }
    group.finish();
    small(criterion, &xent).expect("small benchmark setup");
}

/// The `small` group (see the module doc), on a stream of its own: the legacy default stream
/// cannot be captured.
fn small(criterion: &mut Criterion, xent: &CrossEntropy) -> Result<(), Box<dyn Error>> {
    let ctx = xent.context();
    // SAFETY: one stream; cudarc's cross-stream events are not needed, and an event record of
    // them inside the capture would join the graph.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    let mut group = criterion.benchmark_group("small");
    // A forced plan for the small calls (`cluster:16:256`, say), to weigh plans the automatic
    // choice does not take.
    let plan = match std::env::var("XENT_SMALL_PLAN") {
        Ok(text) => common::parse_plan(Some(&text))?,
        Err(_) => xent::PlanChoice::Auto,
    };
    // Other row counts than `SMALL_ROWS` (`1,2,4`, say).
    let rows: Vec<usize> = match std::env::var("XENT_SMALL_ROWS") {
        Ok(text) => text
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("XENT_SMALL_ROWS={text}: expected row counts, comma-separated"))?,
        Err(_) => SMALL_ROWS.to_vec(),
    };
    for n in rows {
        let mut case = GpuCase::<bf16>::new(&stream, n, SMALL_VOCAB, true)?;
        case.opts.plan = plan;
        let id = format!("{n}x{SMALL_VOCAB}");
        group.bench_function(BenchmarkId::new("host", &id), |bencher| {
            bencher.iter_custom(|iters| host_calls(xent, &stream, &mut case, iters).expect("host"))
        });
        let graph = capture_calls(xent, &stream, &mut case, GRAPH_CALLS)?;
        group.bench_function(BenchmarkId::new("gpu_graph", &id), |bencher| {
            bencher.iter_custom(|iters| graph_calls(&stream, &graph, iters).expect("graph"))
        });
    }
    launch_floor(&mut group, &stream)?;
    graph_floor(&mut group, &stream)?;
    group.finish();
    Ok(())
}

/// The `launch_floor` cases (see the module doc): `cuLaunchKernelEx` with and without a cluster
/// attribute, nothing of xent's planning or checks around it.
fn launch_floor(
    group: &mut BenchmarkGroup<WallTime>,
    stream: &Arc<CudaStream>,
) -> Result<(), Box<dyn Error>> {
    let xent_params = std::mem::size_of::<xent::abi::XentParams>();
    // (name, cluster, parameter bytes): `plain8` asks whether the block's size is the floor's.
    let cases = [
        ("cluster8", true, xent_params),
        ("plain", false, xent_params),
        ("plain8", false, 8),
    ];
    for (name, cluster, bytes) in cases {
        let (function, params) = empty_kernel(stream, "", bytes)?;
        let mut launch = || {
            let shape = EmptyLaunch {
                grid: 8,
                cluster: if cluster { 8 } else { 1 },
                threads: 256,
                pdl: false,
            };
            launch_empty(stream, &function, &params, shape)
        };
        group.bench_function(BenchmarkId::new("launch_floor", name), |bencher| {
            bencher.iter_custom(|iters| enqueue_time(stream, iters, &mut launch).expect("launch"))
        });
    }
    Ok(())
}

/// The wall time of enqueueing `iters` calls, in blocks of `HOST_BLOCK` with an untimed wait for
/// the GPU after each.
fn host_calls<T: Element>(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    case: &mut GpuCase<T>,
    iters: u64,
) -> Result<Duration, Box<dyn Error>> {
    stream.memcpy_dtod(&case.pristine, &mut case.logits)?;
    stream.synchronize()?;
    let elapsed = enqueue_time(stream, iters, &mut || {
        case.call(xent, stream)?;
        Ok(())
    })?;
    case.out.check_labels()?;
    Ok(elapsed)
}

/// The wall time of enqueueing `iters` calls of `enqueue`, in blocks of `HOST_BLOCK` with an
/// untimed wait for the GPU after each (so the launch queue never fills and blocks a timed call).
fn enqueue_time(
    stream: &Arc<CudaStream>,
    iters: u64,
    enqueue: &mut dyn FnMut() -> Result<(), Box<dyn Error>>,
) -> Result<Duration, Box<dyn Error>> {
    let mut elapsed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let block = left.min(HOST_BLOCK);
        let start = Instant::now();
        for _ in 0..block {
            enqueue()?;
        }
        elapsed += start.elapsed();
        stream.synchronize()?;
        left -= block;
    }
    Ok(elapsed)
}

/// `calls` calls captured in one CUDA graph (after one eager call, which makes every buffer they
/// need).
fn capture_calls<T: Element>(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    case: &mut GpuCase<T>,
    calls: usize,
) -> Result<CudaGraph, Box<dyn Error>> {
    stream.memcpy_dtod(&case.pristine, &mut case.logits)?;
    case.call(xent, stream)?;
    stream.synchronize()?;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    for _ in 0..calls {
        case.call(xent, stream)?;
    }
    let graph = stream.end_capture(CUgraphInstantiate_flags(0))?;
    graph.ok_or_else(|| "the capture recorded no work".into())
}

/// The GPU time of `iters` calls: replays of `graph` (`GRAPH_CALLS` calls each) between two
/// events, scaled to `iters` calls.
fn graph_calls(
    stream: &Arc<CudaStream>,
    graph: &CudaGraph,
    iters: u64,
) -> Result<Duration, Box<dyn Error>> {
    let replays = iters.div_ceil(GRAPH_CALLS as u64).max(1);
    let seconds = event_seconds(stream, || {
        for _ in 0..replays {
            graph.launch()?;
        }
        Ok(())
    })?;
    let per_call = seconds / (replays * GRAPH_CALLS as u64) as f64;
    Ok(Duration::from_secs_f64(per_call * iters as f64))
}

/// The GPU time in seconds of the work `enqueue` puts on `stream` ([`common::event_ms`]).
fn event_seconds(
    stream: &Arc<CudaStream>,
    enqueue: impl FnOnce() -> Result<(), Box<dyn Error>>,
) -> Result<f64, Box<dyn Error>> {
    Ok(f64::from(common::event_ms(stream, enqueue)?) * 1e-3)
}

/// The device buffers of one GPU case: logits are restored from `pristine` before each timed block.
struct GpuCase<T> {
    pristine: CudaSlice<T>,
    logits: CudaSlice<T>,
    labels: CudaSlice<i64>,
    shape: Shape,
    opts: Options,
    out: Loss,
}

impl<T: Element> GpuCase<T> {
    /// `n` rows of `v` classes from [`inputs`], on the device; with `all_scored`, no row ignored.
    fn new(
        stream: &Arc<CudaStream>,
        n: usize,
        v: usize,
        all_scored: bool,
    ) -> Result<GpuCase<T>, Box<dyn Error>> {
        let (host_logits, host_labels) = inputs::<T>(n, v, !all_scored);
        Ok(GpuCase {
            pristine: stream.clone_htod(&host_logits)?,
            logits: stream.alloc_zeros(n * v)?,
            labels: stream.clone_htod(&host_labels)?,
            shape: Shape::flat(n, v),
            opts: Options::default(),
            out: Loss::new(stream, n)?,
        })
    }

    /// One call, in place on `logits`.
    fn call(&mut self, xent: &CrossEntropy, stream: &Arc<CudaStream>) -> xent::Result<()> {
        xent.forward_backward_into(
            stream,
            &mut self.logits,
            &self.labels,
            self.shape,
            &self.opts,
            &mut self.out,
        )
    }
}

fn gpu_case<T: Element>(
    group: &mut BenchmarkGroup<WallTime>,
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    n: usize,
    v: usize,
) -> Result<(), Box<dyn Error>> {
    let mut case = GpuCase::<T>::new(stream, n, v, false)?;
    let min_bytes = 2 * T::DTYPE.bytes() as u64 * n as u64 * v as u64;
    group.throughput(Throughput::Bytes(min_bytes));
    group.bench_function(
        BenchmarkId::new(T::DTYPE.name(), format!("{n}x{v}")),
        |bencher| {
            bencher
                .iter_custom(|iters| timed_calls(xent, stream, &mut case, iters).expect("gpu call"))
        },
    );
    Ok(())
}

/// Restores the logits, then times `iters` back-to-back calls between two CUDA events. Calls after
/// the first of a block read the previous call's gradient; the kernels' time does not depend on
/// the values.
fn timed_calls<T: Element>(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    case: &mut GpuCase<T>,
    iters: u64,
) -> Result<Duration, Box<dyn Error>> {
    stream.memcpy_dtod(&case.pristine, &mut case.logits)?;
    let seconds = event_seconds(stream, || {
        for _ in 0..iters {
            case.call(xent, stream)?;
        }
        Ok(())
    })?;
    case.out.check_labels()?;
    Ok(Duration::from_secs_f64(seconds))
}

/// Uniform logits with variance 4 (as throughput.rs and peers.py) from a xorshift, and labels with
/// one row in seven ignored (from row 0) if `ignored`, else every row scored.
fn inputs<T: Element>(n: usize, v: usize, ignored: bool) -> (Vec<T>, Vec<i64>) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let logits = (0..n * v)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f64 / (1u64 << 24) as f64; // [0, 1)
            T::from_f64((unit - 0.5) * 6.9)
        })
        .collect();
    let labels = (0..n)
        .map(|row| match row % 7 {
            0 if ignored => -100,
            _ => ((row * 7919) % v) as i64,
        })
        .collect();
    (logits, labels)
}

/// The `graph_floor` cases (see the module doc): `GRAPH_CALLS` launches of an empty kernel that
/// waits for the grid before it (`griddepcontrol.wait`) and lets the next one start
/// (`griddepcontrol.launch_dependents`), in one graph, with the programmatic stream
/// serialization xent's small calls are launched with; per call, as `gpu_graph`.
fn graph_floor(
    group: &mut BenchmarkGroup<WallTime>,
    stream: &Arc<CudaStream>,
) -> Result<(), Box<dyn Error>> {
    use xent::cudarc::driver::sys;
    let (function, params) = empty_kernel(
        stream,
        "\tgriddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n",
        std::mem::size_of::<xent::abi::XentParams>(),
    )?;
    // (name, grid, cluster, threads): the automatic small plans at 128256 classes in bf16.
    let shapes = [
        ("cluster16x128", 16, 16, 128),
        ("rows8", 64, 8, 256),
        ("rows64", 512, 8, 128),
    ];
    for (name, grid, cluster, threads) in shapes {
        let shape = EmptyLaunch {
            grid,
            cluster,
            threads,
            pdl: true,
        };
        let launch = || launch_empty(stream, &function, &params, shape);
        if cluster > 8 {
            // SAFETY: a function attribute of a function this module owns.
            unsafe {
                sys::cuFuncSetAttribute(
                    function.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    1,
                )
            }
            .result()?;
        }
        launch()?;
        stream.synchronize()?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        for _ in 0..GRAPH_CALLS {
            launch()?;
        }
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))?
            .ok_or("the capture recorded no work")?;
        group.bench_function(BenchmarkId::new("graph_floor", name), |bencher| {
            bencher.iter_custom(|iters| graph_calls(stream, &graph, iters).expect("graph"))
        });
    }
    Ok(())
}

/// How [`launch_empty`] launches: `grid` CTAs of `threads` in clusters of `cluster` (1: no cluster
/// attribute), with the programmatic stream serialization xent's small calls carry if `pdl`.
#[derive(Clone, Copy)]
struct EmptyLaunch {
    grid: u32,
    cluster: u32,
    threads: u32,
    pdl: bool,
}

/// One `cuLaunchKernelEx` of `function` (a kernel taking one parameter block, which `params`
/// holds) on `stream`, shaped as `shape` says.
fn launch_empty(
    stream: &Arc<CudaStream>,
    function: &xent::cudarc::driver::CudaFunction,
    params: &[u64],
    shape: EmptyLaunch,
) -> Result<(), Box<dyn Error>> {
    use xent::cudarc::driver::sys;
    let empty = || sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { pad: [0; 64] },
    };
    let mut attributes = Vec::new();
    if shape.cluster > 1 {
        let mut attribute = empty();
        attribute.value.clusterDim.x = shape.cluster;
        attribute.value.clusterDim.y = 1;
        attribute.value.clusterDim.z = 1;
        attributes.push(attribute);
    }
    if shape.pdl {
        let mut attribute = empty();
        attribute.id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        attributes.push(attribute);
    }
    let config = sys::CUlaunchConfig {
        gridDimX: shape.grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: shape.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: attributes.as_mut_ptr(),
        numAttrs: attributes.len() as u32,
    };
    let mut args = [params.as_ptr() as *mut std::ffi::c_void];
    // SAFETY: the kernel takes one parameter block of `params`' bytes, which the driver copies
    // before returning; `attributes` outlives the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            function.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()?;
    Ok(())
}

/// A kernel of `body` (PTX lines; empty: it only returns) that takes a parameter block of
/// `bytes` (a multiple of 8), and a zeroed block to launch it with.
fn empty_kernel(
    stream: &Arc<CudaStream>,
    body: &str,
    bytes: usize,
) -> Result<(xent::cudarc::driver::CudaFunction, Vec<u64>), Box<dyn Error>> {
    let ptx = format!(
        ".version 8.0\n.target sm_90\n.address_size 64\n\
         .visible .entry xent_floor(.param .align 8 .b8 p[{bytes}])\n{{\n{body}\tret;\n}}\n"
    );
    let module = stream
        .context()
        .load_module(xent::cudarc::nvrtc::Ptx::from_src(ptx))?;
    Ok((
        module.load_function("xent_floor")?,
        vec![0u64; bytes.div_ceil(8)],
    ))
}
