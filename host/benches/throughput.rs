//! Throughput of the fused cross-entropy (loss + gradient) on the GPU, timed with CUDA events, in
//! the JSON-lines format of `shared/bench/peers.py` so both land in one table.
//!
//! `cargo bench -p xent --bench throughput -- [--configs N:V:dtype,...] [--iters K] [--plan P]
//! [--options none,smoothing,z,softcap,softcap50,weight,accuracy,all,softcap+accuracy,z=1e-3]
//! [--ignore-every K] [--spread S] [--explain]` (`cargo xtask bench` forwards its arguments here;
//! `+` joins option sets, and `smoothing=X`, `z=X`, `softcap=X` set one option to another value).
//! First line: `{"copy_GBps": ...}` measured in this process; then one line per config and option
//! set (method `xent` without options, `xent[NAME]` with: the cost of each option when on, on the
//! same inputs). `--plan` is auto, fused, chunked, split (sm_80 PTX: `XENT_ARCH=sm_80` on an
//! H100/H200), `split:LEN` (`split:LEN:T`, `split::T`: T threads a CTA), `split_l2[:LEN]`, cluster, or a forced cluster plan `cluster:N` (N
//! CTAs per row), `cluster:N:T` or `cluster::T` (T threads per CTA); `XENT_BENCH_PLAN` sets it
//! too (`run.sh ab` variants: `embedded+XENT_BENCH_PLAN=split_l2`). `--ignore-every K` ignores
//! rows 0, K, 2K, ... (default 7, as peers.py; 0: every row scored, which a call of one row needs to be more
//! than a zero fill). `--spread S`: logits uniform in `±S` (default 3.45); with a soft cap of 30,
//! an S above 9 (12, 30) sends vectors past the cluster kernels' shorter (cubic, wide) polynomial,
//! the last to `tanh` element by element. `--explain` adds, before each timed line, one `{"candidate": ...}`
//! line per cluster launch the automatic plan weighed (the driver's active clusters, resident MiB,
//! and which was chosen). Each iteration restores the logits from a pristine copy outside the
//! timed region, so every timed call sees real logits, not last call's gradient.

use std::sync::Arc;

use xent::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use xent::half::{bf16, f16};
use xent::{CrossEntropy, DType, Element, LaunchPlan, Loss, Options, PlanChoice, Shape};

mod common;

/// The table (the peers' configurations), a few-rows case and f16; `run.sh bench` gives
/// peers.py the same list.
const DEFAULT_CONFIGS: &str = include_str!("configs.txt");

struct Args {
    configs: Vec<(usize, usize, DType)>,
    iters: usize,
    plan: PlanChoice,
    /// Option sets by name (`none`: every option off).
    options: Vec<String>,
    /// Print the cluster launches the plan weighed.
    explain: bool,
    /// Every `ignore_every`-th row (from row 0) is ignored (-100); 0: every row is scored.
    ignore_every: usize,
    /// The logits' half-width: uniform in `±spread` (default 3.45, variance 4).
    spread: f64,
}

/// The options a set name turns on, for `v` classes: the values a training run would use
/// (Gemma 2's cap of 30, PaLM's z-loss 1e-4, smoothing 0.1, weights all different from 1).
/// Names joined by `+` combine (`softcap+accuracy`).
fn option_set(name: &str, v: usize) -> Result<Options, String> {
    let mut opts = Options::default();
    for part in name.split('+') {
        add_option(&mut opts, part, v)?;
    }
    Ok(opts)
}

/// Turns on the options of set `name` (see [`option_set`]) in `opts`.
fn add_option(opts: &mut Options, name: &str, v: usize) -> Result<(), String> {
    let weight = || Some((0..v).map(|j| 0.5 + (j % 4) as f32 * 0.25).collect());
    // `smoothing=X`, `z=X`, `softcap=X`: the option at another value than the set's.
    if let Some((option, value)) = name.split_once('=') {
        let value: f32 = value
            .parse()
            .map_err(|_| format!("option set {name}: {value} is not a number"))?;
        match option {
            "smoothing" => opts.label_smoothing = value,
            "z" => opts.lse_square_scale = value,
            "softcap" => opts.softcap = Some(value),
            other => return Err(format!("option set {name}: {other} takes no value")),
        }
        return Ok(());
    }
    match name {
        "none" => {}
        "smoothing" => opts.label_smoothing = 0.1,
        "z" => opts.lse_square_scale = 1e-4,
        "softcap" => opts.softcap = Some(30.0),
        // Above the kernels' `FIXED_CAP_MAX`: the soft cap with a running maximum, on logits
        // that take the same polynomial (uniform in ±3.45) as with 30.
        "softcap50" => opts.softcap = Some(50.0),
        "weight" => opts.weight = weight(),
        "accuracy" => opts.return_token_accuracy = true,
        "all" => {
            opts.label_smoothing = 0.1;
            opts.lse_square_scale = 1e-4;
            opts.softcap = Some(30.0);
            opts.weight = weight();
            opts.return_token_accuracy = true;
        }
        other => return Err(format!("unknown option set {other}")),
    }
    Ok(())
}

fn parse_args() -> Result<Args, String> {
    let mut configs = DEFAULT_CONFIGS.trim().to_string();
    // `XENT_BENCH_PLAN` (as `--plan`): a plan per variant of `run.sh ab`.
    let mut plan = match std::env::var("XENT_BENCH_PLAN") {
        Ok(text) => common::parse_plan(Some(&text))?,
        Err(_) => PlanChoice::Auto,
    };
    let mut iters = 20;
    let mut options = vec!["none".to_string()];
    let mut explain = false;
    let mut ignore_every = 7;
    let mut spread = 3.45;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--configs" => configs = args.next().ok_or("--configs needs a value")?,
            "--iters" => {
                iters = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--iters needs a number")?
            }
            "--ignore-every" => {
                ignore_every = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--ignore-every needs a number (0: none)")?
            }
            "--spread" => {
                spread = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or("--spread needs a positive number")?
            }
            "--plan" => {
                plan = common::parse_plan(args.next().as_deref())?;
            }
            "--options" => {
                let list = args.next().ok_or("--options needs a value")?;
                options = list.split(',').map(str::to_string).collect();
                for name in &options {
                    option_set(name, 1)?;
                }
            }
            "--explain" => explain = true,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let configs = configs
        .split(',')
        .map(|item| {
            let parts: Vec<&str> = item.split(':').collect();
            let [n, v, dtype] = parts[..] else {
                return Err(format!("bad config {item}"));
            };
            let dtype = match dtype {
                "bf16" => DType::Bf16,
                "f16" => DType::F16,
                "f32" => DType::F32,
                _ => return Err(format!("bad dtype in {item}")),
            };
            Ok((
                n.parse().map_err(|_| item.to_string())?,
                v.parse().map_err(|_| item.to_string())?,
                dtype,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Args {
        configs,
        iters,
        plan,
        options,
        explain,
        ignore_every,
        spread,
    })
}

/// Median and minimum of `times`.
fn median_min(mut times: Vec<f32>) -> (f32, f32) {
    times.sort_by(f32::total_cmp);
    (times[times.len() / 2], times[0])
}

/// Device-to-device copy bandwidth, bytes read + written, best of 10 copies of 4 GiB.
fn copy_bandwidth_gbps(stream: &Arc<CudaStream>) -> Result<f64, Box<dyn std::error::Error>> {
    let bytes = 4usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    best_gbps(
        stream,
        2 * bytes,
        || Ok(stream.memcpy_dtod(&src, &mut dst)?),
    )
}

/// GB/s of the work `enqueue` puts on `stream`, moving `bytes` each time: the best of 10 timed
/// calls after 3 warm-ups.
fn best_gbps(
    stream: &Arc<CudaStream>,
    bytes: usize,
    mut enqueue: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    for i in 0..13 {
        let ms = common::event_ms(stream, &mut enqueue)?;
        if i >= 3 {
            times.push(ms);
        }
    }
    let (_, best) = median_min(times);
    Ok(bytes as f64 / (best as f64 * 1e-3) / 1e9)
}

/// GB/s of `scale_grad` (one read and one write of each value, a plain streaming kernel of
/// xent's own) over 2 GiB of bf16 on `xent`'s default stream, best of 10 after 3 warm-ups. On a
/// partition of the SMs (`XENT_GREEN_SMS`) it says what that many SMs can stream, which the
/// whole device's copy does not: a CTA of the scale kernel runs only on the partition's SMs.
fn scale_bandwidth_gbps(xent: &CrossEntropy) -> Result<f64, Box<dyn std::error::Error>> {
    let stream = xent.context().default_stream();
    let shape = Shape::flat(8192, 131072);
    let mut grad = stream.alloc_zeros::<bf16>(shape.rows() * shape.vocab)?;
    let upstream = stream.clone_htod(&[0.5f32])?;
    let bytes = 2 * 2 * shape.rows() * shape.vocab;
    best_gbps(&stream, bytes, || {
        Ok(xent.scale_grad(&stream, &mut grad, shape, &upstream)?)
    })
}

/// Random logits (uniform in `±spread`; the default 3.45 has variance 4, as peers.py's N(0, 2))
/// filled on all cores, and labels with every `ignore_every`-th row ignored from row 0 (one in
/// seven, as peers.py; 0: none, which a call of one row needs to be scored at all).
fn inputs<T: Element>(n: usize, v: usize, ignore_every: usize, spread: f64) -> (Vec<T>, Vec<i64>) {
    let mut logits = vec![T::default(); n * v];
    let workers = std::thread::available_parallelism().map_or(1, |w| w.get());
    std::thread::scope(|scope| {
        for (job, chunk) in logits
            .chunks_mut((n * v).div_ceil(workers).max(1))
            .enumerate()
        {
            scope.spawn(move || {
                let mut state =
                    0x9e37_79b9_7f4a_7c15u64 ^ (job as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
                for x in chunk {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 40) as f64 / (1u64 << 24) as f64; // [0, 1)
                    *x = T::from_f64((2.0 * u - 1.0) * spread);
                }
            });
        }
    });
    let labels = (0..n)
        .map(|i| {
            if ignore_every != 0 && i % ignore_every == 0 {
                -100
            } else {
                ((i * 7919) % v) as i64
            }
        })
        .collect();
    (logits, labels)
}

fn bench_config<T: Element>(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    n: usize,
    v: usize,
    args: &Args,
    copy_gbps: f64,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let (host_logits, host_labels) = inputs::<T>(n, v, args.ignore_every, args.spread);
    let pristine: CudaSlice<T> = stream.clone_htod(&host_logits)?;
    drop(host_logits);
    let mut logits: CudaSlice<T> = stream.alloc_zeros(n * v)?;
    let labels = stream.clone_htod(&host_labels)?;
    let mut lines = Vec::new();
    for name in &args.options {
        let opts = Options {
            plan: args.plan,
            ..option_set(name, v)?
        };
        let method = if name == "none" {
            "xent".to_string()
        } else {
            format!("xent[{name}]")
        };
        if args.explain {
            lines.extend(explain(xent, n, v, T::DTYPE, &opts, &method)?);
        }
        let line = time_call(
            xent,
            stream,
            &pristine,
            &mut logits,
            &labels,
            n,
            v,
            &opts,
            args.iters,
            copy_gbps,
        )
        .map(|line| format!("{{\"method\": \"{method}\", {line}"));
        lines.push(line.unwrap_or_else(|err| {
            format!(
                "{{\"method\": \"{method}\", \"n\": {n}, \"v\": {v}, \"dtype\": \"{}\", \"error\": \"{err}\"}}",
                T::DTYPE.name()
            )
        }));
    }
    Ok(lines)
}

/// One JSON line per cluster launch the plan weighed for this config and option set.
fn explain(
    xent: &CrossEntropy,
    n: usize,
    v: usize,
    dtype: DType,
    opts: &Options,
    method: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let shape = Shape::flat(n, v);
    let chosen = xent.plan_for(&shape, dtype, opts)?;
    let lines = xent.cluster_candidates(&shape, dtype, opts).into_iter().map(|c| {
        let LaunchPlan::Cluster { threads, chunk_len, size, smem_bytes } = c.plan else {
            unreachable!("cluster candidates are cluster plans");
        };
        let clusters = c.active_clusters.map_or("null".to_string(), |k| k.to_string());
        let mib = c.resident_bytes(dtype).map_or("null".to_string(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64));
        format!(
            "{{\"candidate\": \"{method}\", \"n\": {n}, \"v\": {v}, \"dtype\": \"{}\", \"size\": {size}, \"threads\": {threads}, \"chunk_len\": {chunk_len}, \"smem_bytes\": {smem_bytes}, \"active_clusters\": {clusters}, \"resident_MiB\": {mib}, \"chosen\": {}}}",
            dtype.name(),
            c.plan == chosen
        )
    });
    Ok(lines.collect())
}

/// Times one option set; returns the JSON line after its `method` field.
#[allow(clippy::too_many_arguments)]
fn time_call<T: Element>(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    pristine: &CudaSlice<T>,
    logits: &mut CudaSlice<T>,
    labels: &CudaSlice<i64>,
    n: usize,
    v: usize,
    opts: &Options,
    iters: usize,
    copy_gbps: f64,
) -> Result<String, Box<dyn std::error::Error>> {
    let shape = Shape::flat(n, v);
    let plan = xent.plan_for(&shape, T::DTYPE, opts)?;
    let mut out = Loss::new(stream, n)?;
    let ctx = stream.context();
    let (before_free, _) = ctx.mem_get_info()?;
    let mut times = Vec::new();
    let mut loss = f32::NAN;
    for i in 0..iters + 3 {
        stream.memcpy_dtod(pristine, logits)?;
        let ms = common::event_ms(stream, || {
            Ok(xent.forward_backward_into(stream, logits, labels, shape, opts, &mut out)?)
        })?;
        if i >= 3 {
            times.push(ms);
        }
        if i == 0 {
            loss = out.read()?;
        }
    }
    let (after_free, _) = ctx.mem_get_info()?;
    // Extra memory: the O(N) outputs (loss, per-row loss and lse, counts) and any partials the
    // chunked plan allocated on its first call.
    let extra_bytes = 4 * (1 + 2 * n.max(1) + 2) + before_free.saturating_sub(after_free);
    let (median, best) = median_min(times);
    let min_bytes = 2.0 * T::DTYPE.bytes() as f64 * n as f64 * v as f64;
    let gbps = min_bytes / (median as f64 * 1e-3) / 1e9;
    // Rows of another architecture's PTX (`XENT_ARCH=sm_80` on an H200), the limits imposed on
    // the planner (`XENT_LIMITS=a100`) and a partition of the SMs (`XENT_GREEN_SMS`) say so.
    let mut tags = String::new();
    for (var, key) in [
        ("XENT_ARCH", "arch"),
        ("XENT_LIMITS", "limits"),
        ("XENT_GREEN_SMS", "green_sms"),
    ] {
        if let Ok(value) = std::env::var(var) {
            tags.push_str(&format!(", \"{key}\": \"{value}\""));
        }
    }
    Ok(format!(
        "\"n\": {n}, \"v\": {v}, \"dtype\": \"{}\", \"ms_median\": {median:.3}, \"ms_min\": {best:.3}, \"eff_GBps\": {gbps:.0}, \"pct_of_copy\": {:.1}, \"extra_peak_MiB\": {}, \"plan\": \"{plan:?}\", \"loss\": {loss:.6}{tags}}}",
        T::DTYPE.name(),
        100.0 * gbps / copy_gbps,
        extra_bytes >> 20,
    ))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("throughput: {msg}");
            std::process::exit(2);
        }
    };
    let Some(xent) = common::gpu("throughput", "nothing to measure") else {
        return;
    };
    let stream = xent.context().default_stream();
    // The whole device's copy (a primary context's stream), also when the handle runs on part of
    // its SMs (`XENT_GREEN_SMS`): the kernels' share of copy is then against the whole GPU's.
    let primary = CudaContext::new(0).expect("device 0");
    let copy_gbps = copy_bandwidth_gbps(&primary.default_stream()).expect("copy bandwidth");
    // On a partition of the SMs, also what a streaming kernel reaches on it and on the whole
    // device (`scale_GBps`, `scale_GBps_device`): the share of copy the partition can reach.
    // (`XENT_LIMITS=a100` sizes both handles' grids for 108 SMs; the scale kernel's blocks loop
    // over its tiles, so on the whole device they still spread over every SM.)
    let mut partition = String::new();
    if std::env::var_os("XENT_GREEN_SMS").is_some() {
        let whole = CrossEntropy::from_context(primary.clone()).expect("a handle on the device");
        let on = |xent: &CrossEntropy| scale_bandwidth_gbps(xent).expect("scale bandwidth");
        let (part, device) = (on(&xent), on(&whole));
        partition = format!(", \"scale_GBps\": {part:.0}, \"scale_GBps_device\": {device:.0}");
    }
    drop(primary);
    println!(
        "{{\"copy_GBps\": {copy_gbps:.0}, \"sm_count\": {}{partition}}}",
        xent.limits().sm_count
    );
    for &(n, v, dtype) in &args.configs {
        let line = match dtype {
            DType::Bf16 => bench_config::<bf16>(&xent, &stream, n, v, &args, copy_gbps),
            DType::F16 => bench_config::<f16>(&xent, &stream, n, v, &args, copy_gbps),
            DType::F32 => bench_config::<f32>(&xent, &stream, n, v, &args, copy_gbps),
        };
        match line {
            Ok(lines) => lines.iter().for_each(|line| println!("{line}")),
            Err(err) => println!(
                "{{\"method\": \"xent\", \"n\": {n}, \"v\": {v}, \"dtype\": \"{}\", \"error\": \"{err}\"}}",
                dtype.name()
            ),
        }
    }
}
