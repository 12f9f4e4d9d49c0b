//! The GEMM + log-sum-exp prototypes (`xent::linear::lse_gemm`, issue 12's "beyond": `mma.sync`
//! and, on compute capability 9.0, `wgmma`) against cuBLASLt's forward GEMM alone on the same
//! inputs, timed with CUDA events (median of 10 after 3 warm-ups), one JSON line each: `method`
//! (`xent_lse_gemm`, `xent_lse_wgmma`, `xent_lse_wgmma_pipe`, `xent_lse_tma`, `gemm`), `n`, `d`,
//! `v`, `dtype`, `ms_median`, `tflops` (counting `2·N·D·V`), `splits` (the vocabulary ranges, for
//! the CTAs each kernel keeps resident: `auto_splits_for`, or listed in `XENT_LSE_TMA_SPLITS`),
//! `group` (the TMA kernel's row-block groups, from `XENT_LSE_TMA_GROUPS`), `max_lse_diff` (the
//! largest difference of a row's log-sum-exp from the `mma.sync` kernel's). The prototypes write
//! no logits (their partial (max, sum) pairs are `N·splits·8` bytes); the GEMM writes all `N·V`
//! of them in bf16.
//!
//! `cargo bench -p xent --bench lse_gemm` (no arguments of its own: `run.sh bench`'s are
//! ignored). Without a GPU it says so and exits (a failure under `XENT_REQUIRE_GPU=1`).

use std::error::Error;
use std::sync::Arc;

use xent::cublaslt::{CublasLt, Gemm, Operand};
use xent::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use xent::half::bf16;
use xent::linear::lse_gemm::{LseGemmKernel, auto_splits_for, merge_partials};
use xent::{CrossEntropy, DType};

mod common;

/// (N, D, V): issue 12's shapes.
const CONFIGS: [(usize, usize, usize); 2] = [(8192, 4096, 128256), (16384, 4096, 128256)];

fn main() {
    let Some(xent) = common::gpu("lse_gemm", "nothing to measure") else {
        return;
    };
    if let Err(err) = run(&xent) {
        eprintln!("lse_gemm: {err}");
        std::process::exit(1);
    }
}

fn run(xent: &CrossEntropy) -> Result<(), Box<dyn Error>> {
    let stream = xent.context().default_stream();
    let blas = CublasLt::open(&[])?;
    for (n, d, v) in CONFIGS {
        let h: Vec<bf16> = noise(n * d, 1, 1.0);
        let w: Vec<bf16> = noise(v * d, 2, 2.0 / (d as f64).sqrt());
        let d_h = stream.clone_htod(&h)?;
        let d_w = stream.clone_htod(&w)?;
        drop((h, w));
        let sm = xent.limits().sm_count;
        // Room for the most ranges any kernel takes.
        let most = LseGemmKernel::ALL
            .iter()
            .map(|k| auto_splits_for(n, v, sm, k.ctas_per_sm()))
            .max()
            .unwrap_or(1);
        let mut partials = stream.alloc_zeros::<f32>(most * n * 2)?;
        let mut most = most;
        let mut rows = Vec::new();
        // The TMA kernel at its automatic ranges and at each count `XENT_LSE_TMA_SPLITS` lists
        // (comma-separated), each with the row-block groups `XENT_LSE_GROUP` is set to in turn
        // from `XENT_LSE_TMA_GROUPS` (default: the kernel's own).
        let listed = |name: &str| -> Vec<usize> {
            std::env::var(name)
                .unwrap_or_default()
                .split(',')
                .filter_map(|t| t.trim().parse().ok())
                .collect()
        };
        let groups = listed("XENT_LSE_TMA_GROUPS");
        let mut runs = vec![
            ("xent_lse_gemm", LseGemmKernel::MmaSync, 0, None),
            ("xent_lse_wgmma", LseGemmKernel::Wgmma, 0, None),
            (
                "xent_lse_wgmma_pipe",
                LseGemmKernel::WgmmaPipelined,
                0,
                None,
            ),
            ("xent_lse_tma", LseGemmKernel::Tma, 0, None),
        ];
        for splits in listed("XENT_LSE_TMA_SPLITS") {
            runs.push(("xent_lse_tma", LseGemmKernel::Tma, splits, None));
            for &g in &groups {
                runs.push(("xent_lse_tma", LseGemmKernel::Tma, splits, Some(g)));
            }
        }
        let mut reference: Option<Vec<f64>> = None;
        for (method, kernel, splits, group) in runs {
            let splits = if splits == 0 {
                auto_splits_for(n, v, sm, kernel.ctas_per_sm())
            } else {
                splits
            };
            if splits > most {
                partials = stream.alloc_zeros::<f32>(splits * n * 2)?;
                most = splits;
            }
            match group {
                // SAFETY (edition 2024's `set_var`): the bench runs on this one thread.
                Some(g) => unsafe { std::env::set_var("XENT_LSE_GROUP", g.to_string()) },
                None => unsafe { std::env::remove_var("XENT_LSE_GROUP") },
            }
            let ms = median_ms(&stream, || {
                xent.lse_gemm_partials(
                    &stream,
                    kernel,
                    &d_h,
                    &d_w,
                    (n, v, d),
                    splits,
                    &mut partials,
                )?;
                Ok(())
            });
            // Each kernel's log-sum-exps against the first's (the `mma.sync` kernel's): the
            // largest difference, which a wrong tile layout would make large.
            let diff = match ms {
                Ok(_) => {
                    let got = merge_partials(&stream.clone_dtoh(&partials)?, n, splits);
                    let diff = reference.as_ref().map_or(0.0, |want| {
                        want.iter()
                            .zip(&got)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f64::max)
                    });
                    reference.get_or_insert(got);
                    diff
                }
                Err(_) => f64::NAN,
            };
            match ms {
                Ok(ms) => rows.push((method, ms, splits, group, diff)),
                // The sm_90a prototype on another GPU: say so, measure the rest.
                Err(err) => eprintln!("lse_gemm: {method}: {err}"),
            }
        }
        let mut logits = stream.alloc_zeros::<bf16>(n * v)?;
        let workspace = stream.alloc_zeros::<u8>(32 << 20)?;
        let gemm_ms = {
            let (h_ptr, _a) = d_h.device_ptr(&stream);
            let (w_ptr, _b) = d_w.device_ptr(&stream);
            let (out_ptr, _c) = logits.device_ptr_mut(&stream);
            let (ws_ptr, _d) = workspace.device_ptr(&stream);
            let gemm = Gemm {
                a: Operand {
                    ptr: h_ptr,
                    dtype: DType::Bf16,
                    rows: n,
                    cols: d,
                    ld: d,
                    transposed: false,
                },
                b: Operand {
                    ptr: w_ptr,
                    dtype: DType::Bf16,
                    rows: v,
                    cols: d,
                    ld: d,
                    transposed: true,
                },
                out: Operand {
                    ptr: out_ptr,
                    dtype: DType::Bf16,
                    rows: n,
                    cols: v,
                    ld: v,
                    transposed: false,
                },
                alpha: 1.0,
                beta: 0.0,
                bias: 0,
            };
            median_ms(&stream, || {
                // SAFETY: every operand is a live allocation of the sizes it names.
                unsafe { blas.matmul(stream.cu_stream(), &gemm, (ws_ptr, 32 << 20)) }?;
                Ok(())
            })?
        };
        let flops = 2.0 * n as f64 * d as f64 * v as f64;
        rows.push(("gemm", gemm_ms, 0, None, 0.0));
        for (method, ms, splits, group, diff) in rows {
            let group = group.map_or(String::new(), |g| format!(", \"group\": {g}"));
            println!(
                "{{\"method\": \"{method}\", \"n\": {n}, \"d\": {d}, \"v\": {v}, \"dtype\": \"bf16\", \
                 \"ms_median\": {ms:.3}, \"tflops\": {:.1}, \"splits\": {splits}{group}, \
                 \"max_lse_diff\": {diff:.2e}}}",
                flops / (ms as f64 * 1e-3) / 1e12
            );
        }
    }
    gemm_tn(xent, &stream, &blas)?;
    Ok(())
}

/// The linear path's weight-gradient GEMM, `C += Gᵀ·h` with `G [K, V]`, `h [K, D]`, `C [V, D]`
/// (bf16): `xent_gemm_tn` against cuBLASLt at Liger's chunk (256 rows) and the default budget's
/// (896), one JSON line each with `ms_median`, `tflops` (`2·K·V·D`) and `c_gbps` (C read and
/// written, `4·V·D` bytes, per second).
fn gemm_tn(
    xent: &CrossEntropy,
    stream: &Arc<CudaStream>,
    blas: &CublasLt,
) -> Result<(), Box<dyn Error>> {
    use xent::linear::gemm_tn::Matrix;
    let (v, d) = (128256usize, 4096usize);
    let d_c = stream.clone_htod(&noise(v * d, 5, 1e-3))?;
    let workspace = stream.alloc_zeros::<u8>(32 << 20)?;
    for k in [256usize, 896] {
        let d_g = stream.clone_htod(&noise(k * v, 3, 1e-4))?;
        let d_h = stream.clone_htod(&noise(k * d, 4, 1.0))?;
        let (g_ptr, _g) = d_g.device_ptr(stream);
        let (h_ptr, _h) = d_h.device_ptr(stream);
        let (c_ptr, _c) = d_c.device_ptr(stream);
        let (ws_ptr, _w) = workspace.device_ptr(stream);
        let ours = median_ms(stream, || {
            let mat = |ptr, rows, cols| Matrix {
                ptr,
                rows,
                cols,
                ld: cols,
            };
            // SAFETY: live allocations of the sizes named; C apart from G and h.
            unsafe {
                xent.gemm_tn_bf16(
                    stream,
                    mat(g_ptr, k, v),
                    mat(h_ptr, k, d),
                    mat(c_ptr, v, d),
                    1.0,
                    1.0,
                )
            }?;
            Ok(())
        });
        let operand = |ptr, rows, cols, transposed| Operand {
            ptr,
            dtype: DType::Bf16,
            rows,
            cols,
            ld: cols,
            transposed,
        };
        let gemm = Gemm {
            a: operand(g_ptr, k, v, true),
            b: operand(h_ptr, k, d, false),
            out: operand(c_ptr, v, d, false),
            alpha: 1.0,
            beta: 1.0,
            bias: 0,
        };
        let cublas = median_ms(stream, || {
            // SAFETY: every operand is a live allocation of the sizes it names.
            unsafe { blas.matmul(stream.cu_stream(), &gemm, (ws_ptr, 32 << 20)) }?;
            Ok(())
        });
        for (method, ms) in [("xent_gemm_tn", ours), ("cublaslt_gemm_tn", cublas)] {
            match ms {
                Ok(ms) => println!(
                    "{{\"method\": \"{method}\", \"k\": {k}, \"v\": {v}, \"d\": {d}, \"dtype\": \"bf16\", \
                     \"beta\": 1, \"ms_median\": {ms:.3}, \"tflops\": {:.1}, \"c_gbps\": {:.0}}}",
                    2.0 * (k * v * d) as f64 / (ms as f64 * 1e-3) / 1e12,
                    4.0 * (v * d) as f64 / (ms as f64 * 1e-3) / 1e9
                ),
                Err(err) => eprintln!("lse_gemm: {method}: {err}"),
            }
        }
    }
    Ok(())
}

/// `len` values uniform in `±scale`, deterministic per `seed`.
fn noise(len: usize, seed: u64, scale: f64) -> Vec<bf16> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f64 / (1u64 << 24) as f64;
            bf16::from_f64((u * 2.0 - 1.0) * scale)
        })
        .collect()
}

/// The median of 10 timed runs of `enqueue` (after 3 untimed), in ms.
fn median_ms(
    stream: &Arc<CudaStream>,
    mut enqueue: impl FnMut() -> Result<(), Box<dyn Error>>,
) -> Result<f32, Box<dyn Error>> {
    for _ in 0..3 {
        enqueue()?;
    }
    let mut times = Vec::new();
    for _ in 0..10 {
        times.push(common::event_ms(stream, &mut enqueue)?);
    }
    times.sort_by(f32::total_cmp);
    Ok(times[times.len() / 2])
}
