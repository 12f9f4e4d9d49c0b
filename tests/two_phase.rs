//! Two-phase mode (issue 4): `forward` keeps only the per-row log-sum-exp (O(rows) memory) and
//! writes nothing to the logits; `backward_into` / `backward_in_place`, given the upstream
//! gradient later, write `upstream · d loss / d logits` in one pass. Checked against the CPU
//! reference (`cpu::forward_backward_upstream`) for every plan, dtype, label type, reduction and
//! a spread of loss options; plus the errors a misused backward returns.

use xent::half::{bf16, f16};
use xent::{CrossEntropy, DType, Element, Error, Label, Loss, Options, Reduction, Shape, cpu};
use xent_tests::{
    Case, DTYPES, FromI64, PAD, REDUCTIONS, assert_no_failures, case_labels, check_option_outputs,
    gpu, grad_atol, grad_error, grad_rtol, grad_tol_scale, loss_tol, random_logits, report,
    sanitizing, total_loss_tol,
};

type Stream = std::sync::Arc<xent::cudarc::driver::CudaStream>;

/// Option sets: none, per-row constants only, per-element options, everything.
fn option_sets(vocab: usize) -> Vec<(&'static str, Options)> {
    let weight: Vec<f32> = (0..vocab).map(|j| [0.5, 2.0, 1.0, 0.25][j % 4]).collect();
    vec![
        ("none", Options::default()),
        (
            "smoothing+z",
            Options {
                label_smoothing: 0.1,
                lse_square_scale: 0.01,
                ..Options::default()
            },
        ),
        (
            "weight",
            Options {
                weight: Some(weight.clone()),
                ..Options::default()
            },
        ),
        (
            "softcap+accuracy",
            Options {
                softcap: Some(5.0),
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
        (
            "all",
            Options {
                label_smoothing: 0.2,
                lse_square_scale: 0.01,
                softcap: Some(5.0),
                weight: Some(weight),
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
    ]
}

/// Forward, then backward into a second buffer and in place; everything against the reference.
fn two_phase_case<T: Element, L: Label + FromI64>(
    xent: &CrossEntropy,
    stream: &Stream,
    case: &Case,
    upstream: &[f32],
) -> Result<(), String> {
    let shape = case.shape;
    let opts = &case.opts;
    let context = |what: &str| {
        format!(
            "{what} in {case:?} ({}, upstream {} values)",
            T::DTYPE.name(),
            upstream.len()
        )
    };
    let e = |err: &dyn std::fmt::Display| context(&err.to_string());
    let logits: Vec<T> = random_logits(&shape, case.seed);
    let labels: Vec<L> = case_labels(case);
    let d_logits = stream.clone_htod(&logits).map_err(|x| e(&x))?;
    let d_labels = stream.clone_htod(&labels).map_err(|x| e(&x))?;
    let d_upstream = stream.clone_htod(upstream).map_err(|x| e(&x))?;

    let mut fwd = Loss::new(stream, shape.rows()).map_err(|x| e(&x))?;
    xent.forward(stream, &d_logits, &d_labels, shape, opts, &mut fwd)
        .map_err(|x| e(&x))?;
    let after_forward: Vec<T> = stream.clone_dtoh(&d_logits).map_err(|x| e(&x))?;
    if after_forward
        .iter()
        .zip(&logits)
        .any(|(a, b)| a.to_f64().to_bits() != b.to_f64().to_bits())
    {
        return Err(context("forward changed the logits"));
    }

    let mut reference = logits.clone();
    let expected = cpu::forward_backward_upstream(&mut reference, &labels, shape, opts, upstream)
        .map_err(|x| e(&x))?;
    let loss = fwd.read().map_err(|x| e(&x))? as f64;
    if !(loss.is_nan() && expected.loss.is_nan())
        && (loss - expected.loss).abs() > total_loss_tol(&expected, opts)
    {
        return Err(context(&format!(
            "forward loss {loss} != reference {}",
            expected.loss
        )));
    }
    let row_lse = fwd.read_row_lse().map_err(|x| e(&x))?;
    for (r, (&got, &want)) in row_lse.iter().zip(&expected.row_lse).enumerate() {
        if (got as f64 - want).abs() > loss_tol(want) {
            return Err(context(&format!("row {r}: lse {got} != reference {want}")));
        }
    }
    check_option_outputs(&fwd, &expected, opts).map_err(|m| context(&m))?;

    // Backward into a buffer whose padding holds PAD: only row elements may change.
    let mut d_grad = stream
        .clone_htod(&vec![T::from_f64(PAD); logits.len()])
        .map_err(|x| e(&x))?;
    xent.backward_into(
        stream,
        &d_logits,
        &d_labels,
        shape,
        opts,
        &fwd,
        &d_upstream,
        &mut d_grad,
    )
    .map_err(|x| e(&x))?;
    let grad: Vec<T> = stream.clone_dtoh(&d_grad).map_err(|x| e(&x))?;
    let up_max = upstream
        .iter()
        .fold(0.0f64, |m, &u| m.max((u as f64).abs()));
    let (rtol, atol) = (
        grad_rtol(T::DTYPE),
        grad_atol(T::DTYPE, grad_tol_scale(opts, &expected) * up_max),
    );
    for (i, (g, want)) in grad.iter().zip(&reference).enumerate() {
        let (g, want) = (g.to_f64(), want.to_f64());
        if i % shape.row_stride >= shape.vocab {
            if g != PAD {
                return Err(context(&format!(
                    "padding element {i} of the gradient buffer changed to {g}"
                )));
            }
            continue;
        }
        if let Err((err, tol)) = grad_error(g, want, rtol, atol) {
            let (r, j) = (i / shape.row_stride, i % shape.row_stride);
            return Err(context(&format!(
                "grad[{r}, {j}] = {g:e}, reference {want:e}, |diff| {err:e} > tol {tol:e}"
            )));
        }
    }

    // In place: the same bits as into the other buffer.
    let mut d_in_place = d_logits.clone();
    xent.backward_in_place(
        stream,
        &mut d_in_place,
        &d_labels,
        shape,
        opts,
        &fwd,
        &d_upstream,
    )
    .map_err(|x| e(&x))?;
    let in_place: Vec<T> = stream.clone_dtoh(&d_in_place).map_err(|x| e(&x))?;
    for (i, (a, b)) in in_place.iter().zip(&grad).enumerate() {
        let in_row = i % shape.row_stride < shape.vocab;
        let want = if in_row { b.to_f64() } else { PAD };
        if a.to_f64().to_bits() != want.to_bits() && !(a.to_f64().is_nan() && want.is_nan()) {
            return Err(context(&format!(
                "in place, element {i} = {} but {want} into a buffer",
                a.to_f64()
            )));
        }
    }
    Ok(())
}

fn run<L: Label + FromI64>(
    xent: &CrossEntropy,
    stream: &Stream,
    dtype: DType,
    case: &Case,
    upstream: &[f32],
) -> Result<(), String> {
    match dtype {
        DType::F32 => two_phase_case::<f32, L>(xent, stream, case, upstream),
        DType::F16 => two_phase_case::<f16, L>(xent, stream, case, upstream),
        DType::Bf16 => two_phase_case::<bf16, L>(xent, stream, case, upstream),
    }
}

#[test]
fn forward_then_backward_matches_the_reference_for_every_plan_dtype_option_set_and_upstream() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let plans = xent_tests::forced_plans(xent, 1024);
    let (vocab, stride) = if sanitizing() {
        (301, 307)
    } else {
        (10_007, 10_013)
    };
    let shape = Shape::batched(3, 7, vocab).with_row_stride(stride);
    let (mut failures, mut cases) = (Vec::new(), 0usize);
    for (name, set) in option_sets(vocab) {
        // The split_l2 plan (sm_80) has kernels for the plain loss only.
        let mut plans = plans.clone();
        if name == "none" && xent.limits().max_cluster == 1 {
            plans.push(xent::PlanChoice::SplitL2 {
                chunk_len: Some(1024),
            });
        }
        for plan in &plans {
            for dtype in DTYPES {
                let reduction = REDUCTIONS[cases % 3];
                let case = Case {
                    shape,
                    opts: Options {
                        reduction,
                        plan: *plan,
                        causal_shift: cases % 2 == 1,
                        grad_scale: 0.5,
                        ..set.clone()
                    },
                    ignored: 1.0 / 7.0,
                    seed: 101 + cases as u64,
                };
                // A scalar upstream, and for the per-row losses one value per row.
                let per_row: Vec<f32> = (0..shape.rows())
                    .map(|r| 0.25 + (r % 5) as f32 * 0.5)
                    .collect();
                let upstream: &[f32] = if reduction == Reduction::None {
                    &per_row
                } else {
                    &[0.75]
                };
                for result in [
                    run::<i64>(xent, &stream, dtype, &case, upstream),
                    run::<i32>(xent, &stream, dtype, &case, upstream),
                ] {
                    cases += 1;
                    if let Err(msg) = result {
                        failures.push(format!("{name}: {msg}"));
                    }
                }
            }
        }
    }
    report(&format!(
        "two-phase on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

#[test]
fn a_misused_backward_is_an_error_and_writes_nothing() {
    let Some(xent) = gpu() else { return };
    let stream = xent.context().default_stream();
    let shape = Shape::flat(2, 8);
    let host: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    let d_logits = stream.clone_htod(&host).unwrap();
    let d_labels = stream.clone_htod(&[1i64, 5]).unwrap();
    let opts = Options::default();
    let mut fwd = Loss::new(&stream, 2).unwrap();
    xent.forward(&stream, &d_logits, &d_labels, shape, &opts, &mut fwd)
        .unwrap();
    let one = stream.clone_htod(&[1.0f32]).unwrap();

    // The gradient buffer 4 bytes off the logits' 16-byte grid.
    let mut big = stream.alloc_zeros::<f32>(17).unwrap();
    let mut view = big.slice_mut(1..17);
    let err = xent.backward_into(
        &stream, &d_logits, &d_labels, shape, &opts, &fwd, &one, &mut view,
    );
    assert!(
        matches!(&err, Err(Error::InvalidOption(m)) if m.contains("modulo 16")),
        "{err:?}"
    );

    let mut grad = stream.alloc_zeros::<f32>(16).unwrap();
    let three = stream.clone_htod(&[1.0f32; 3]).unwrap();
    let err = xent.backward_into(
        &stream, &d_logits, &d_labels, shape, &opts, &fwd, &three, &mut grad,
    );
    assert!(
        matches!(err, Err(Error::UpstreamLength { rows: 2, len: 3 })),
        "{err:?}"
    );

    let sum = Options {
        reduction: Reduction::Sum,
        ..Options::default()
    };
    let err = xent.backward_into(
        &stream, &d_logits, &d_labels, shape, &sum, &fwd, &one, &mut grad,
    );
    assert!(
        matches!(&err, Err(Error::InvalidOption(m)) if m.contains("forward")),
        "{err:?}"
    );
    // Any loss option the forward's lse depends on, not only the reduction.
    for other in [
        Options {
            ignore_index: 5,
            ..Options::default()
        },
        Options {
            softcap: Some(30.0),
            ..Options::default()
        },
        Options {
            label_smoothing: 0.1,
            ..Options::default()
        },
    ] {
        let err = xent.backward_into(
            &stream, &d_logits, &d_labels, shape, &other, &fwd, &one, &mut grad,
        );
        assert!(
            matches!(&err, Err(Error::InvalidOption(m)) if m.contains("forward")),
            "{other:?}: {err:?}"
        );
    }
    // What the forward does not depend on may differ: the gradient's scale.
    let scaled = Options {
        grad_scale: 2.0,
        ..Options::default()
    };
    let mut scaled_grad = stream.alloc_zeros::<f32>(16).unwrap();
    xent.backward_into(
        &stream,
        &d_logits,
        &d_labels,
        shape,
        &scaled,
        &fwd,
        &one,
        &mut scaled_grad,
    )
    .unwrap();
    let doubled = stream.clone_dtoh(&scaled_grad).unwrap();
    let mut plain_grad = stream.alloc_zeros::<f32>(16).unwrap();
    xent.backward_into(
        &stream,
        &d_logits,
        &d_labels,
        shape,
        &opts,
        &fwd,
        &one,
        &mut plain_grad,
    )
    .unwrap();
    let plain = stream.clone_dtoh(&plain_grad).unwrap();
    assert!(plain.iter().any(|&g| g != 0.0));
    for (d, p) in doubled.iter().zip(&plain) {
        assert_eq!(*d, 2.0 * p);
    }

    let other_rows = Loss::new(&stream, 3).unwrap();
    let err = xent.backward_into(
        &stream,
        &d_logits,
        &d_labels,
        shape,
        &opts,
        &other_rows,
        &one,
        &mut grad,
    );
    assert!(
        matches!(&err, Err(Error::InvalidOption(m)) if m.contains("rows")),
        "{err:?}"
    );

    assert!(stream.clone_dtoh(&grad).unwrap().iter().all(|&g| g == 0.0));
    assert_eq!(stream.clone_dtoh(&d_logits).unwrap(), host);
}

#[test]
fn cpu_reference_of_two_phase_scales_each_row_by_its_upstream_value() {
    let shape = Shape::flat(3, 5);
    let logits: Vec<f32> = (0..15).map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0).collect();
    let labels = [4i64, -100, 0];
    let opts = Options {
        reduction: Reduction::None,
        label_smoothing: 0.1,
        lse_square_scale: 0.01,
        ..Options::default()
    };
    let mut plain = logits.clone();
    let base = cpu::forward_backward(&mut plain, &labels, shape, &opts).unwrap();
    // A scalar 1 is the fused call, bit for bit.
    let mut one = logits.clone();
    let same = cpu::forward_backward_upstream(&mut one, &labels, shape, &opts, &[1.0]).unwrap();
    assert_eq!(one, plain);
    assert_eq!(same.loss, base.loss);
    // One value per row scales that row's gradient, not the loss.
    let upstream = [2.0f32, 3.0, -0.5];
    let mut scaled = logits.clone();
    let got =
        cpu::forward_backward_upstream(&mut scaled, &labels, shape, &opts, &upstream).unwrap();
    assert_eq!(got.loss, base.loss);
    for (i, (s, p)) in scaled.iter().zip(&plain).enumerate() {
        let want = *p as f64 * upstream[i / 5] as f64;
        assert!(
            (*s as f64 - want).abs() <= 2.0 * f32::EPSILON as f64 * want.abs(),
            "{i}: {s} vs {want}"
        );
    }
    assert!(matches!(
        cpu::forward_backward_upstream(&mut scaled, &labels, shape, &opts, &[1.0, 2.0]),
        Err(Error::UpstreamLength { rows: 3, len: 2 })
    ));
}
