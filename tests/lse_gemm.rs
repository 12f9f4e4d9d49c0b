//! The GEMM + log-sum-exp prototypes (`xent::linear::lse_gemm`, issue 12's "beyond": `mma.sync`,
//! and `wgmma` on compute capability 9.0) on the GPU against an f64 reference on the same bf16 inputs: each row's log-sum-exp of `hidden · weightᵀ`
//! from the partial (max, sum) pairs of every vocabulary range. Shapes cover partial row blocks
//! (rows not a multiple of 128), partial class tiles (vocab not a multiple of 128 or 256), ranges
//! that split the vocabulary unevenly, one row, and more row blocks than the TMA kernel's groups.
//!
//! Tolerance: the kernel sums `dim` products in f32, so a logit is off by up to about
//! `dim·2⁻²⁴·Σ_k |h_k·w_k|`; the log-sum-exp moves by at most the largest such error, plus the
//! `ex2`/`lg2` approximations and the f32 sums (a few 1e-7 relative).

use xent::half::bf16;
use xent::linear::lse_gemm::{LseGemmKernel, auto_splits, merge_partials};
use xent_tests::{Rng, report};

fn reference(
    h: &[bf16],
    w: &[bf16],
    rows: usize,
    vocab: usize,
    dim: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut lse = Vec::with_capacity(rows);
    let mut bound = Vec::with_capacity(rows);
    for r in 0..rows {
        let hr = &h[r * dim..(r + 1) * dim];
        let mut logits = Vec::with_capacity(vocab);
        let mut worst = 0.0f64;
        for j in 0..vocab {
            let wj = &w[j * dim..(j + 1) * dim];
            let (mut dot, mut abs) = (0.0f64, 0.0f64);
            for k in 0..dim {
                let p = hr[k].to_f64() * wj[k].to_f64();
                dot += p;
                abs += p.abs();
            }
            logits.push(dot);
            worst = worst.max(abs);
        }
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = logits.iter().map(|x| (x - m).exp()).sum();
        lse.push(m + s.ln());
        bound.push(dim as f64 * 2f64.powi(-24) * worst);
    }
    (lse, bound)
}

#[test]
fn lse_of_hidden_times_weight_matches_the_f64_reference() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let sm = xent.limits().sm_count;
    let (mut failures, mut cases) = (Vec::new(), 0);
    let sm90a = xent
        .context()
        .compute_capability()
        .expect("compute capability")
        == (9, 0);
    let kernels: Vec<LseGemmKernel> = LseGemmKernel::ALL
        .into_iter()
        .filter(|k| sm90a || !k.needs_sm90a())
        .collect();
    // (rows, vocab, dim, splits; 0: auto_splits)
    let shapes = [
        (1, 1000, 64, 1),
        (130, 4099, 128, 3),
        (256, 1280, 256, 0),
        (77, 129, 64, 2),
        (300, 5000, 192, 7),
        // 17 row blocks: the TMA kernel's groups of 16 row blocks, and a group of one.
        (2100, 700, 64, 3),
    ];
    for (rows, vocab, dim, splits) in shapes {
        let splits = if splits == 0 {
            auto_splits(rows, vocab, sm)
        } else {
            splits
        };
        let mut rng = Rng(rows as u64 * 31 + vocab as u64);
        // Scaled so the logits spread over a few units, as an LM head's do.
        let scale = 2.0 / (dim as f64).sqrt();
        let h: Vec<bf16> = (0..rows * dim)
            .map(|_| bf16::from_f64((rng.unit() * 2.0 - 1.0) * 1.7))
            .collect();
        let w: Vec<bf16> = (0..vocab * dim)
            .map(|_| bf16::from_f64((rng.unit() * 2.0 - 1.0) * scale))
            .collect();
        let d_h = stream.clone_htod(&h).expect("upload hidden");
        let d_w = stream.clone_htod(&w).expect("upload weight");
        let (want, bound) = reference(&h, &w, rows, vocab, dim);
        for &kernel in &kernels {
            let mut d_p = stream
                .alloc_zeros::<f32>(splits * rows * 2)
                .expect("partials");
            xent.lse_gemm_partials(
                &stream,
                kernel,
                &d_h,
                &d_w,
                (rows, vocab, dim),
                splits,
                &mut d_p,
            )
            .expect("launch");
            let partials = stream.clone_dtoh(&d_p).expect("download");
            let got = merge_partials(&partials, rows, splits);
            cases += 1;
            for r in 0..rows {
                let tol = bound[r] + 2e-6 * want[r].abs() + 1e-6;
                let err = (got[r] - want[r]).abs();
                if err.is_nan() || err > tol {
                    failures.push(format!(
                        "{kernel:?} {rows}x{vocab}x{dim}, {splits} ranges, row {r}: lse {} against \
                         {} (tol {tol:e})",
                        got[r], want[r]
                    ));
                    break;
                }
            }
        }
    }
    report(&format!(
        "lse_gemm on the GPU: {cases} kernel x shape cases, {} failed",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn lse_gemm_rejects_bad_shapes() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let d_h = stream.alloc_zeros::<bf16>(64 * 64).expect("hidden");
    let d_w = stream.alloc_zeros::<bf16>(64 * 64).expect("weight");
    let mut d_p = stream.alloc_zeros::<f32>(2 * 64).expect("partials");
    for (shape, splits, what) in [
        ((64, 64, 48), 1, "dim"),
        ((0, 64, 64), 1, "rows"),
        ((64, 64, 64), 0, "splits"),
        ((64, 64, 64), 2, "partials"),
        ((65, 64, 64), 1, "hidden"),
    ] {
        let err = xent
            .lse_gemm_partials(
                &stream,
                LseGemmKernel::MmaSync,
                &d_h,
                &d_w,
                shape,
                splits,
                &mut d_p,
            )
            .expect_err(what);
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}
