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

/// `xent_gemm_tn_bf16` (the linear path's weight-gradient GEMM, sm_90a): `C = alpha·Aᵀ·B +
/// beta·C` against f64 on the same bf16 inputs, rounded once to bf16. Shapes cover partial
/// output tiles (M not a multiple of 128, N not of 256), K not a multiple of 64 (and K = 1),
/// more tiles than CTAs (each CTA walks several), row strides wider than the rows, and beta 0
/// (C not read: it starts as NaN there) and 1.
///
/// Tolerance: f32 sums of K products are off by up to `K·2⁻²⁴·Σ|a·b|`; then one rounding to
/// bf16, allowed a whole unit in the last place (`2⁻⁸` relative; the rounding is half of it).
#[test]
fn gemm_tn_matches_the_f64_reference() {
    use xent::cudarc::driver::{DevicePtr, DevicePtrMut};
    use xent::linear::gemm_tn::Matrix;
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    if xent
        .context()
        .compute_capability()
        .expect("compute capability")
        != (9, 0)
    {
        eprintln!("gemm_tn: compute capability 9.0 only; skipped");
        return;
    }
    let stream = xent.context().default_stream();
    let (mut failures, mut cases) = (Vec::new(), 0);
    // (K, M, N, extra columns of each row stride, alpha, beta)
    let shapes = [
        (64, 128, 256, 0, 1.0f32, 1.0f32),
        (100, 296, 520, 8, 1.0, 1.0),
        (1, 136, 264, 0, 1.0, 0.0),
        (256, 2000, 512, 0, 0.5, 1.0),
        (896, 696, 64, 16, 1.0, 0.0),
        (130, 4504, 296, 0, 1.0, 1.0),
    ];
    for (k, m, n, pad, alpha, beta) in shapes {
        let mut rng = Rng((k * 7 + m * 13 + n) as u64);
        let mut matrix = |rows: usize, cols: usize, ld: usize, scale: f64| -> Vec<bf16> {
            (0..rows * ld)
                .map(|i| {
                    if i % ld < cols {
                        bf16::from_f64((rng.unit() * 2.0 - 1.0) * scale)
                    } else {
                        bf16::from_f64(f64::NAN)
                    }
                })
                .collect()
        };
        let (lda, ldb, ldc) = (m + pad, n + pad, n + pad);
        let a = matrix(k, m, lda, 1.0);
        let b = matrix(k, n, ldb, 1.0);
        let c0: Vec<bf16> = if beta == 0.0 {
            vec![bf16::from_f64(f64::NAN); m * ldc]
        } else {
            matrix(m, n, ldc, 4.0)
        };
        let d_a = stream.clone_htod(&a).expect("upload A");
        let d_b = stream.clone_htod(&b).expect("upload B");
        let mut d_c = stream.clone_htod(&c0).expect("upload C");
        {
            let (pa, _a) = d_a.device_ptr(&stream);
            let (pb, _b) = d_b.device_ptr(&stream);
            let (pc, _c) = d_c.device_ptr_mut(&stream);
            let mat = |ptr, rows, cols, ld| Matrix {
                ptr,
                rows,
                cols,
                ld,
            };
            // SAFETY: the three are live allocations of the sizes named, C apart from A and B.
            unsafe {
                xent.gemm_tn_bf16(
                    &stream,
                    mat(pa, k, m, lda),
                    mat(pb, k, n, ldb),
                    mat(pc, m, n, ldc),
                    alpha,
                    beta,
                )
            }
            .expect("launch");
        }
        let got = stream.clone_dtoh(&d_c).expect("download");
        cases += 1;
        'check: for i in 0..m {
            for j in 0..ldc {
                let at = i * ldc + j;
                if j >= n {
                    // Past the row: untouched.
                    if !got[at].is_nan() {
                        failures.push(format!("{k}x{m}x{n}: C[{i}][{j}] past the row was written"));
                        break 'check;
                    }
                    continue;
                }
                let (mut dot, mut abs) = (0.0f64, 0.0f64);
                for r in 0..k {
                    let p = a[r * lda + i].to_f64() * b[r * ldb + j].to_f64();
                    dot += p;
                    abs += p.abs();
                }
                let c = if beta == 0.0 { 0.0 } else { c0[at].to_f64() };
                let want = alpha as f64 * dot + beta as f64 * c;
                let tol = alpha as f64 * k as f64 * 2f64.powi(-24) * abs
                    + want.abs() * 2f64.powi(-8)
                    + 1e-30;
                let err = (got[at].to_f64() - want).abs();
                if err.is_nan() || err > tol {
                    failures.push(format!(
                        "{k}x{m}x{n} (ld pad {pad}, alpha {alpha}, beta {beta}): C[{i}][{j}] {} against {want} (tol {tol:e})",
                        got[at]
                    ));
                    break 'check;
                }
            }
        }
    }
    // A row stride the tensor memory accelerator cannot take (not a multiple of 16 bytes) is
    // refused before any launch.
    let d_x = stream.alloc_zeros::<bf16>(129 * 129).expect("scratch");
    {
        let (px, _x) = d_x.device_ptr(&stream);
        let odd = Matrix {
            ptr: px,
            rows: 129,
            cols: 129,
            ld: 129,
        };
        let even = Matrix {
            ptr: px,
            rows: 64,
            cols: 64,
            ld: 64,
        };
        // SAFETY: refused before anything runs (and the sizes fit the allocation anyway).
        match unsafe { xent.gemm_tn_bf16(&stream, odd, even, even, 1.0, 0.0) } {
            Err(xent::Error::InvalidOption(why)) if why.contains("multiples of 16 bytes") => {}
            other => failures.push(format!("an odd row stride gave {other:?}")),
        }
    }
    report(&format!(
        "gemm_tn on the GPU: {cases} shapes, {} failed",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `xent_gemm_grads_bf16` (both gradient GEMMs of a linear chunk in one launch, sm_90a):
/// `grad_hidden = G·W` and `grad_weight = Gᵀ·h + beta·grad_weight` against f64 on the same bf16
/// inputs, each rounded once to bf16, with `grad_hidden`'s tiles whole (1 split) and in two
/// halves of the vocabulary (2, added through the partial sums; every shape but the one-step
/// vocabulary, which 2 refuses before launch). Shapes cover partial row blocks (rows not a
/// multiple of 128, and a second warpgroup with no row), one row, a vocabulary of one step and of
/// an odd number of steps (halves of unequal length), vocabularies that are not a multiple of 64
/// or 128, more items than CTAs, beta 0 (the weight's gradient starts as NaN) and 1; the rows of
/// `grad_hidden` past the chunk stay untouched.
///
/// Tolerance: as `gemm_tn`'s, with `K` the vocabulary for `grad_hidden` and the rows for
/// `grad_weight`.
#[test]
fn gemm_grads_matches_the_f64_reference() {
    use xent::cudarc::driver::{DevicePtr, DevicePtrMut};
    use xent::linear::gemm_tn::{GradOperands, Matrix};
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    if xent
        .context()
        .compute_capability()
        .expect("compute capability")
        != (9, 0)
    {
        eprintln!("gemm_grads: compute capability 9.0 only; skipped");
        return;
    }
    let stream = xent.context().default_stream();
    let (mut failures, mut cases) = (Vec::new(), 0);
    // (rows, V, D, beta)
    let shapes = [
        (64, 128, 256, 1.0f32),
        (100, 520, 512, 0.0),
        (1, 200, 256, 1.0),
        (300, 64, 256, 1.0),
        (256, 2000, 512, 1.0),
        (513, 1496, 768, 0.0),
    ];
    let runs = shapes
        .iter()
        .flat_map(|&shape| [(shape, 1u32), (shape, 2)])
        .filter(|&((_, v, _, _), splits)| splits == 1 || v > 64);
    for ((rows, v, d, beta), splits) in runs {
        let mut rng = Rng((rows * 7 + v * 13 + d) as u64);
        let mut matrix = |r: usize, c: usize, scale: f64| -> Vec<bf16> {
            (0..r * c)
                .map(|_| bf16::from_f64((rng.unit() * 2.0 - 1.0) * scale))
                .collect()
        };
        let g = matrix(rows, v, 0.05);
        let h = matrix(rows, d, 1.0);
        let w = matrix(v, d, 0.05);
        let dw0: Vec<bf16> = if beta == 0.0 {
            vec![bf16::from_f64(f64::NAN); v * d]
        } else {
            matrix(v, d, 4.0)
        };
        // Two rows past the chunk, which must stay NaN.
        let dh0 = vec![bf16::from_f64(f64::NAN); (rows + 2) * d];
        let d_g = stream.clone_htod(&g).expect("upload G");
        let d_h = stream.clone_htod(&h).expect("upload h");
        let d_w = stream.clone_htod(&w).expect("upload W");
        let mut d_dw = stream.clone_htod(&dw0).expect("upload grad_weight");
        let mut d_dh = stream.clone_htod(&dh0).expect("upload grad_hidden");
        {
            let (pg, _g) = d_g.device_ptr(&stream);
            let (ph, _h) = d_h.device_ptr(&stream);
            let (pw, _w) = d_w.device_ptr(&stream);
            let (pdw, _dw) = d_dw.device_ptr_mut(&stream);
            let (pdh, _dh) = d_dh.device_ptr_mut(&stream);
            let ops = GradOperands {
                g: Matrix::dense(pg, rows, v),
                h: Matrix::dense(ph, rows, d),
                w: Matrix::dense(pw, v, d),
                grad_weight: Matrix::dense(pdw, v, d),
                grad_hidden: pdh,
            };
            // The case, shown with the test's output if a launch fails.
            eprintln!("gemm_grads: {rows}x{v}x{d} (beta {beta}, {splits} splits)");
            // SAFETY: five live allocations of the sizes named, the outputs apart from the inputs.
            unsafe { xent.gemm_grads_bf16(&stream, ops, beta, Some(splits)) }.expect("launch");
        }
        let got_dh = stream.clone_dtoh(&d_dh).expect("download grad_hidden");
        let got_dw = stream.clone_dtoh(&d_dw).expect("download grad_weight");
        cases += 1;
        let what = format!("{rows}x{v}x{d} (beta {beta}, {splits} splits)");
        let close = |got: bf16, want: f64, k: usize, abs: f64| {
            let tol = k as f64 * 2f64.powi(-24) * abs + want.abs() * 2f64.powi(-8) + 1e-30;
            let err = (got.to_f64() - want).abs();
            (!err.is_nan() && err <= tol, tol)
        };
        'dh: for r in 0..rows + 2 {
            for j in 0..d {
                let got = got_dh[r * d + j];
                if r >= rows {
                    if !got.is_nan() {
                        failures.push(format!(
                            "{what}: grad_hidden[{r}][{j}] past the chunk was written"
                        ));
                        break 'dh;
                    }
                    continue;
                }
                let (mut dot, mut abs) = (0.0f64, 0.0f64);
                for k in 0..v {
                    let p = g[r * v + k].to_f64() * w[k * d + j].to_f64();
                    dot += p;
                    abs += p.abs();
                }
                let (ok, tol) = close(got, dot, v, abs);
                if !ok {
                    failures.push(format!(
                        "{what}: grad_hidden[{r}][{j}] {got} against {dot} (tol {tol:e})"
                    ));
                    break 'dh;
                }
            }
        }
        'dw: for i in 0..v {
            for j in 0..d {
                let (mut dot, mut abs) = (0.0f64, 0.0f64);
                for r in 0..rows {
                    let p = g[r * v + i].to_f64() * h[r * d + j].to_f64();
                    dot += p;
                    abs += p.abs();
                }
                let c = if beta == 0.0 {
                    0.0
                } else {
                    dw0[i * d + j].to_f64()
                };
                let want = dot + beta as f64 * c;
                let got = got_dw[i * d + j];
                let (ok, tol) = close(got, want, rows, abs);
                if !ok {
                    failures.push(format!(
                        "{what}: grad_weight[{i}][{j}] {got} against {want} (tol {tol:e})"
                    ));
                    break 'dw;
                }
            }
        }
    }
    // A hidden size that is not a multiple of 256, and splits the vocabulary cannot take (two
    // halves of one step, three), are refused before any launch.
    let d_x = stream.alloc_zeros::<bf16>(64 * 256).expect("scratch");
    {
        let (px, _x) = d_x.device_ptr(&stream);
        let m = |rows, cols| Matrix::dense(px, rows, cols);
        let ops = GradOperands {
            g: m(1, 64),
            h: m(1, 200),
            w: m(64, 200),
            grad_weight: m(64, 200),
            grad_hidden: px,
        };
        // SAFETY: refused before anything runs.
        match unsafe { xent.gemm_grads_bf16(&stream, ops, 1.0, None) } {
            Err(xent::Error::InvalidOption(why)) if why.contains("multiple of 256") => {}
            other => failures.push(format!("D = 200 gave {other:?}")),
        }
        let ops = GradOperands {
            g: m(1, 64),
            h: m(1, 256),
            w: m(64, 256),
            grad_weight: m(64, 256),
            grad_hidden: px,
        };
        for splits in [2, 3] {
            // SAFETY: refused before anything runs.
            match unsafe { xent.gemm_grads_bf16(&stream, ops, 1.0, Some(splits)) } {
                Err(xent::Error::InvalidOption(why)) if why.contains("splits") => {}
                other => failures.push(format!("{splits} splits of V = 64 gave {other:?}")),
            }
        }
    }
    report(&format!(
        "gemm_grads on the GPU: {cases} shape x split cases, {} failed",
        failures.len()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
