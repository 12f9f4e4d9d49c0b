//! CPU-only integration tests: they run on every machine, GPU or not.
//!
//! - The CPU reference (`xent::cpu`, the oracle of the GPU tests) against values computed here
//!   from first principles: `loss = ln(sum_j e^x_j) - x_label`, `grad = softmax - onehot`, scaled.
//! - Validation: every shape error is returned, never panicked on, and leaves the logits as they
//!   were.
//! - Launch planning (`xent::plan`) on the H100's and A100's limits.
//! - The embedded PTX: every kernel entry point, the right target, the generated-file marker.
//! - Opening a device without a driver is an error, not a panic.
//!
//! Inputs are small and exactly representable in every element type (integers and halves), so
//! each expected value below is the exact math of those inputs, not a number from a previous run.

use xent::half::{bf16, f16};
use xent::plan::{self, DeviceLimits, LaunchPlan, PlanChoice};
use xent::{
    CrossEntropy, DType, Element, Error, Label, Options, PTX_SM80, PTX_SM90, Reduction, Shape, cpu,
    kernel_names, ptx_for, ptx_for_arch,
};
use xent_tests::{subnormal_step, unit_roundoff};

// ---------------------------------------------------------------------------------------------
// Helpers: building inputs, the expected values, comparisons.
// ---------------------------------------------------------------------------------------------

/// Results computed in f64 from the same inputs as the reference agree to a few ulps of values of
/// order 1..1000: they differ only in summation order and in `exp`/`ln`'s last bit.
const F64_TOL: f64 = 1e-12;

/// Logits of type `T`; each value must be exact in `T`, so the hand computation uses the very
/// numbers the reference sees.
fn logits<T: Element>(values: &[f64]) -> Vec<T> {
    values
        .iter()
        .map(|&v| {
            let x = T::from_f64(v);
            assert_eq!(
                x.to_f64(),
                v,
                "test input {v} is not exact in {:?}",
                T::DTYPE
            );
            x
        })
        .collect()
}

/// Labels of either type (`i32` and `i64` both convert from `i32`).
fn labels<L: Label + From<i32>>(values: &[i32]) -> Vec<L> {
    values.iter().map(|&v| L::from(v)).collect()
}

fn widen<T: Element>(values: &[T]) -> Vec<f64> {
    values.iter().map(|x| x.to_f64()).collect()
}

fn opts(reduction: Reduction) -> Options {
    Options {
        reduction,
        ..Options::default()
    }
}

/// `ln(e^x_0 + e^x_1 + ...)`, written out without the max shift: the logits given to it are
/// small (|x| < 700), so no `exp` overflows.
fn ln_sum_exp(row: &[f64]) -> f64 {
    row.iter().map(|x| x.exp()).sum::<f64>().ln()
}

/// `(softmax_j - [j == label]) * scale` for one scored row.
fn row_grad(row: &[f64], label: usize, scale: f64) -> Vec<f64> {
    let total: f64 = row.iter().map(|x| x.exp()).sum();
    let onehot = |j| if j == label { 1.0 } else { 0.0 };
    row.iter()
        .enumerate()
        .map(|(j, x)| (x.exp() / total - onehot(j)) * scale)
        .collect()
}

/// What a call must produce, computed from first principles.
struct Expected {
    loss: f64,
    row_loss: Vec<f64>,
    row_lse: Vec<f64>,
    n_valid: usize,
    /// One gradient row per logit row (zeros for rows not scored).
    grad: Vec<Vec<f64>>,
}

/// The expected results for `rows` scored against `targets` (`None`: not scored).
fn expected(
    rows: &[Vec<f64>],
    targets: &[Option<usize>],
    reduction: Reduction,
    grad_scale: f64,
) -> Expected {
    let n_valid = targets.iter().flatten().count();
    let scale = match reduction {
        Reduction::Mean => grad_scale / n_valid as f64,
        Reduction::Sum | Reduction::None => grad_scale,
    };
    let mut out = Expected {
        loss: 0.0,
        row_loss: vec![],
        row_lse: vec![],
        n_valid,
        grad: vec![],
    };
    for (row, target) in rows.iter().zip(targets) {
        match *target {
            Some(label) => {
                let lse = ln_sum_exp(row);
                out.row_lse.push(lse);
                out.row_loss.push(lse - row[label]);
                out.grad.push(row_grad(row, label, scale));
            }
            None => {
                out.row_lse.push(0.0);
                out.row_loss.push(0.0);
                out.grad.push(vec![0.0; row.len()]);
            }
        }
    }
    let sum: f64 = out.row_loss.iter().sum();
    out.loss = match reduction {
        Reduction::Mean => sum / n_valid as f64,
        Reduction::Sum | Reduction::None => sum,
    };
    out
}

#[track_caller]
fn assert_close(what: &str, got: f64, expected: f64, tol: f64) {
    assert!(
        (got - expected).abs() <= tol,
        "{what}: got {got}, expected {expected} (difference {:e}, tolerance {tol:e})",
        (got - expected).abs()
    );
}

#[track_caller]
fn assert_all_close(what: &str, got: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        assert_close(&format!("{what}[{i}]"), g, e, tol);
    }
}

/// Checks a gradient of type `T` (rows `row_stride` apart) against exact f64 rows: each element
/// is the exact value rounded once to `T`, so it is within `unit_roundoff` relative (plus half a
/// subnormal step absolute, plus `F64_TOL` relative for the reference's own f64 arithmetic).
#[track_caller]
fn assert_grad_rounded<T: Element>(got: &[T], row_stride: usize, expected: &[Vec<f64>]) {
    let dtype = T::DTYPE;
    for (r, row) in expected.iter().enumerate() {
        for (j, &e) in row.iter().enumerate() {
            let g = got[r * row_stride + j].to_f64();
            let tol = (unit_roundoff(dtype) + F64_TOL) * e.abs() + subnormal_step(dtype) / 2.0;
            assert_close(&format!("{} gradient[{r}][{j}]", dtype.name()), g, e, tol);
        }
    }
}

/// Checks the reference's result against `want` (loss values in f64, so `F64_TOL`).
#[track_caller]
fn assert_loss_matches(got: &cpu::CpuLoss, want: &Expected) {
    assert_eq!(got.n_valid, want.n_valid, "n_valid");
    assert_close("loss", got.loss, want.loss, F64_TOL);
    assert_all_close("row_loss", &got.row_loss, &want.row_loss, F64_TOL);
    assert_all_close("row_lse", &got.row_lse, &want.row_lse, F64_TOL);
}

/// Runs the reference on a contiguous `[rows, vocab]` f32 batch and checks everything.
#[track_caller]
fn check_flat_f32(
    rows: &[Vec<f64>],
    label_values: &[i32],
    targets: &[Option<usize>],
    options: &Options,
) {
    let vocab = rows[0].len();
    let mut data: Vec<f32> = logits(&rows.concat());
    let labels: Vec<i64> = labels(label_values);
    let got = cpu::forward_backward(&mut data, &labels, Shape::flat(rows.len(), vocab), options)
        .expect("valid input");
    let want = expected(rows, targets, options.reduction, options.grad_scale as f64);
    assert_loss_matches(&got, &want);
    assert_grad_rounded(&data, vocab, &want.grad);
}

// ---------------------------------------------------------------------------------------------
// The CPU reference against hand-computed values.
// ---------------------------------------------------------------------------------------------

#[test]
fn mean_loss_is_lse_minus_label_logit_averaged_and_gradient_is_softmax_minus_onehot_over_n() {
    let mut data: Vec<f32> = logits(&[1.0, 2.0, 3.0, 0.5, -1.0, 2.0]);
    let got = cpu::forward_backward(
        &mut data,
        &[2i64, 0],
        Shape::flat(2, 3),
        &Options::default(),
    )
    .unwrap();

    // Written out: row 0 = [1, 2, 3] against class 2, row 1 = [0.5, -1, 2] against class 0.
    let (e1, e2, e3) = (1f64.exp(), 2f64.exp(), 3f64.exp());
    let (f0, f1, f2) = (0.5f64.exp(), (-1f64).exp(), 2f64.exp());
    let lse0 = (e1 + e2 + e3).ln();
    let lse1 = (f0 + f1 + f2).ln();
    let (loss0, loss1) = (lse0 - 3.0, lse1 - 0.5);
    assert_eq!(got.n_valid, 2);
    assert_close("mean loss", got.loss, (loss0 + loss1) / 2.0, F64_TOL);
    assert_all_close("row_loss", &got.row_loss, &[loss0, loss1], F64_TOL);
    assert_all_close("row_lse", &got.row_lse, &[lse0, lse1], F64_TOL);

    let s0 = e1 + e2 + e3;
    let s1 = f0 + f1 + f2;
    let grad = vec![
        vec![e1 / s0 / 2.0, e2 / s0 / 2.0, (e3 / s0 - 1.0) / 2.0],
        vec![(f0 / s1 - 1.0) / 2.0, f1 / s1 / 2.0, f2 / s1 / 2.0],
    ];
    assert_grad_rounded(&data, 3, &grad);
}

#[test]
fn each_gradient_row_sums_to_zero() {
    // softmax sums to 1 and the one-hot to 1: a row's gradient sums to 0 (to f32 rounding of
    // each of the 5 elements, each at most 2^-24 of a value below 1).
    let mut data: Vec<f32> = logits(&[0.25, -3.0, 4.5, 1.0, 0.0, 2.0, 2.0, 2.0, -2.0, 8.0]);
    cpu::forward_backward(
        &mut data,
        &[4i64, 1],
        Shape::flat(2, 5),
        &opts(Reduction::Sum),
    )
    .unwrap();
    for row in data.chunks(5) {
        let sum: f64 = widen(row).iter().sum();
        assert_close("gradient row sum", sum, 0.0, 5.0 * 2f64.powi(-24));
    }
}

#[test]
fn sum_reduction_adds_row_losses_and_does_not_divide_the_gradient() {
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![0.0, 0.0, 0.0],
    ];
    let targets = [Some(2), Some(0), Some(1)];
    check_flat_f32(&rows, &[2, 0, 1], &targets, &opts(Reduction::Sum));
}

#[test]
fn none_reduction_reports_per_row_losses_and_their_sum_with_undivided_gradient() {
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    let options = opts(Reduction::None);
    check_flat_f32(&rows, &[2, 0, 1], &[Some(2), Some(0), Some(1)], &options);

    // Spelled out: the "loss" of `none` is the sum of the per-row losses.
    let mut data: Vec<f32> = logits(&rows.concat());
    let got = cpu::forward_backward(&mut data, &[2i64, 0, 1], Shape::flat(3, 3), &options).unwrap();
    let sum: f64 = got.row_loss.iter().sum();
    assert_close("none: loss = sum of row losses", got.loss, sum, F64_TOL);
}

#[test]
fn default_ignore_index_is_minus_100_and_ignored_rows_get_zero_loss_and_gradient() {
    assert_eq!(Options::default().ignore_index, -100);
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    // The mean divides by the 2 scored rows, not the 3 rows.
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        check_flat_f32(
            &rows,
            &[2, -100, 1],
            &[Some(2), None, Some(1)],
            &opts(reduction),
        );
    }
}

#[test]
fn custom_ignore_index_replaces_the_default() {
    let rows = vec![vec![1.0, 2.0, 3.0], vec![0.5, -1.0, 2.0]];
    let options = Options {
        ignore_index: -1,
        ..Options::default()
    };
    check_flat_f32(&rows, &[-1, 0], &[None, Some(0)], &options);

    // -100 is then an ordinary label, and out of range.
    let mut data: Vec<f32> = logits(&rows.concat());
    let got = cpu::forward_backward(&mut data, &[-100i64, 0], Shape::flat(2, 3), &options);
    assert_eq!(
        got,
        Err(Error::LabelOutOfRange {
            count: 1,
            row: Some(0),
            label: Some(-100)
        })
    );
}

#[test]
fn ignore_index_inside_the_vocab_still_means_ignored() {
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    let options = Options {
        ignore_index: 2,
        ..Options::default()
    };
    // Label 2 is a class of this vocab, yet rows labelled 2 are ignored.
    check_flat_f32(&rows, &[2, 0, 2], &[None, Some(0), None], &options);
}

#[test]
fn grad_scale_multiplies_the_gradient_but_not_the_loss() {
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for grad_scale in [0.25, -3.0, 1024.0] {
            let options = Options {
                grad_scale,
                reduction,
                ..Options::default()
            };
            check_flat_f32(&rows, &[2, -100, 0], &[Some(2), None, Some(0)], &options);
        }
    }
}

/// Distinct logits per row, so a row scored against the wrong label shows.
fn distinct_rows(n_rows: usize, vocab: usize) -> Vec<Vec<f64>> {
    (0..n_rows)
        .map(|r| {
            (0..vocab)
                .map(|j| ((r * 7 + j * 3) % 11) as f64 * 0.5 - 2.0)
                .collect()
        })
        .collect()
}

#[test]
fn causal_shift_scores_position_t_against_label_t_plus_1_and_zeroes_the_last_position() {
    // 2 sequences of 3 positions, vocab 4. Labels [a0 a1 a2 | b0 b1 b2]: position t is scored
    // against label t+1 of its own sequence; positions 2 and 5 (last of each) score nothing, so
    // row 2 is never scored against b0: the shift does not cross the sequence boundary.
    let shape = Shape::batched(2, 3, 4);
    let rows = distinct_rows(6, 4);
    let label_values = [3, 1, 2, 0, 3, 1];
    let targets = [Some(1), Some(2), None, Some(3), Some(1), None];
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let options = Options {
            causal_shift: true,
            reduction,
            ..Options::default()
        };
        let mut data: Vec<bf16> = logits(&rows.concat());
        let got = cpu::forward_backward(&mut data, &labels::<i32>(&label_values), shape, &options)
            .unwrap();
        let want = expected(&rows, &targets, reduction, 1.0);
        assert_loss_matches(&got, &want);
        assert_grad_rounded(&data, 4, &want.grad);
    }
}

#[test]
fn causal_shift_ignores_shifted_labels_equal_to_ignore_index() {
    let shape = Shape::batched(2, 3, 4);
    let rows = distinct_rows(6, 4);
    // Labels 1 and 5 are ignore_index: rows 0 and 4, which read them, score nothing.
    let label_values = [3, -100, 2, 0, 3, -100];
    let targets = [None, Some(2), None, Some(3), None, None];
    let options = Options {
        causal_shift: true,
        ..Options::default()
    };
    let mut data: Vec<f32> = logits(&rows.concat());
    let got = cpu::forward_backward(&mut data, &labels::<i64>(&label_values), shape, &options);
    let want = expected(&rows, &targets, Reduction::Mean, 1.0);
    assert_loss_matches(&got.unwrap(), &want);
    assert_grad_rounded(&data, 4, &want.grad);
}

#[test]
fn causal_shift_never_reads_the_first_label_of_a_sequence() {
    // As PyTorch's `labels[..., 1:]`: the label at position 0 is never a target, so even a value
    // out of range there is not an error.
    let shape = Shape::batched(2, 2, 3);
    let rows = distinct_rows(4, 3);
    let options = Options {
        causal_shift: true,
        ..Options::default()
    };
    let mut data: Vec<f32> = logits(&rows.concat());
    let got = cpu::forward_backward(&mut data, &[99i64, 1, -7, 2], shape, &options).unwrap();
    let want = expected(&rows, &[Some(1), None, Some(2), None], Reduction::Mean, 1.0);
    assert_loss_matches(&got, &want);
    assert_grad_rounded(&data, 3, &want.grad);
}

#[test]
fn causal_shift_with_one_position_per_sequence_scores_nothing() {
    let shape = Shape::batched(3, 1, 2);
    let options = Options {
        causal_shift: true,
        ..Options::default()
    };
    let mut data: Vec<f32> = logits(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let got = cpu::forward_backward(&mut data, &[0i64, 1, 0], shape, &options).unwrap();
    assert_eq!(got.n_valid, 0);
    assert!(
        got.loss.is_nan(),
        "mean over no rows is NaN, got {}",
        got.loss
    );
    assert!(widen(&data).iter().all(|&g| g == 0.0), "gradient {data:?}");
}

/// Value written into the stride padding: it must survive every call.
const PAD: f64 = 7.25;

/// `rows` laid out `row_stride` apart with `PAD` between rows and `trailing` PADs after the last.
fn strided<T: Element>(rows: &[Vec<f64>], row_stride: usize, trailing: usize) -> Vec<T> {
    let mut values = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        values.extend_from_slice(row);
        if r + 1 < rows.len() {
            values.extend(std::iter::repeat_n(PAD, row_stride - row.len()));
        }
    }
    values.extend(std::iter::repeat_n(PAD, trailing));
    logits(&values)
}

#[track_caller]
fn assert_padding_untouched<T: Element>(data: &[T], n_rows: usize, vocab: usize, stride: usize) {
    for (i, x) in data.iter().enumerate() {
        let in_a_row = i / stride < n_rows && i % stride < vocab;
        if !in_a_row {
            assert_eq!(x.to_f64(), PAD, "element {i} (between rows) was written");
        }
    }
}

#[test]
fn row_stride_skips_the_elements_between_rows_and_leaves_them_untouched() {
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    let shape = Shape::flat(3, 3).with_row_stride(5);
    let want = expected(&rows, &[Some(2), Some(0), Some(1)], Reduction::Mean, 1.0);
    // With the buffer exactly `(rows - 1) * row_stride + vocab` long, and with 4 extra elements.
    for trailing in [0, 4] {
        let mut data: Vec<bf16> = strided(&rows, 5, trailing);
        assert_eq!(data.len(), 2 * 5 + 3 + trailing);
        let got =
            cpu::forward_backward(&mut data, &[2i64, 0, 1], shape, &Options::default()).unwrap();
        assert_loss_matches(&got, &want);
        assert_grad_rounded(&data, 5, &want.grad);
        assert_padding_untouched(&data, 3, 3, 5);
    }
}

#[test]
fn all_rows_ignored_gives_nan_mean_zero_sum_and_zero_gradient() {
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let mut data: Vec<f32> = logits(&[1.0, 2.0, 3.0, 0.5, -1.0, 2.0]);
        let got = cpu::forward_backward(
            &mut data,
            &[-100i64, -100],
            Shape::flat(2, 3),
            &opts(reduction),
        )
        .unwrap();
        assert_eq!(got.n_valid, 0);
        if reduction == Reduction::Mean {
            // PyTorch: mean over zero elements is 0/0.
            assert!(got.loss.is_nan(), "mean over no rows: got {}", got.loss);
        } else {
            assert_eq!(got.loss, 0.0, "{reduction:?} over no rows");
        }
        assert_eq!(got.row_loss, [0.0, 0.0]);
        assert_eq!(got.row_lse, [0.0, 0.0]);
        assert!(
            widen(&data).iter().all(|&g| g == 0.0),
            "{reduction:?}: gradient {data:?}"
        );
    }
}

#[test]
fn a_single_class_vocab_has_zero_loss_and_zero_gradient() {
    // softmax of one logit is 1, the one-hot is 1: loss = x - x = 0, gradient = 1 - 1 = 0.
    let mut data: Vec<f32> = logits(&[5.0, -3.0, 0.0]);
    let got = cpu::forward_backward(
        &mut data,
        &[0i64, 0, 0],
        Shape::flat(3, 1),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(got.n_valid, 3);
    assert_close("loss", got.loss, 0.0, F64_TOL);
    assert_all_close("row_lse", &got.row_lse, &[5.0, -3.0, 0.0], F64_TOL);
    assert!(widen(&data).iter().all(|&g| g == 0.0), "gradient {data:?}");
}

/// One batch through `T` logits and `L` labels: mixed signs, an ignored row, rounding to `T`.
fn check_element_and_label_type<T: Element, L: Label + From<i32>>() {
    let rows = vec![
        vec![0.5, -1.25, 2.0, 3.0],
        vec![-0.75, 1.5, 0.0, -2.5],
        vec![6.0, 6.0, -6.0, 0.125],
        vec![1.0, 1.0, 1.0, 1.0],
    ];
    let label_values = [3, -100, 0, 1];
    let targets = [Some(3), None, Some(0), Some(1)];
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let options = Options {
            reduction,
            grad_scale: 0.5,
            ..Options::default()
        };
        let mut data: Vec<T> = logits(&rows.concat());
        let got = cpu::forward_backward(
            &mut data,
            &labels::<L>(&label_values),
            Shape::flat(4, 4),
            &options,
        )
        .unwrap_or_else(|e| panic!("{} / {}: {e}", T::DTYPE.name(), L::NAME));
        let want = expected(&rows, &targets, reduction, 0.5);
        assert_loss_matches(&got, &want);
        assert_grad_rounded(&data, 4, &want.grad);
    }
}

#[test]
fn f32_logits_give_gradient_rounded_to_f32_with_i32_and_i64_labels() {
    check_element_and_label_type::<f32, i32>();
    check_element_and_label_type::<f32, i64>();
}

#[test]
fn f16_logits_give_gradient_rounded_to_f16_with_i32_and_i64_labels() {
    check_element_and_label_type::<f16, i32>();
    check_element_and_label_type::<f16, i64>();
}

#[test]
fn bf16_logits_give_gradient_rounded_to_bf16_with_i32_and_i64_labels() {
    check_element_and_label_type::<bf16, i32>();
    check_element_and_label_type::<bf16, i64>();
}

#[test]
fn gradient_is_rounded_to_nearest_in_the_element_type() {
    // Row [0, 0, 0] against class 0: softmax 1/3 each, gradient [-2/3, 1/3, 1/3] (sum). Neither
    // is exact in any binary type: each element must be the nearest value of the type.
    fn check<T: Element>() {
        let mut data: Vec<T> = logits(&[0.0, 0.0, 0.0]);
        cpu::forward_backward(&mut data, &[0i64], Shape::flat(1, 3), &opts(Reduction::Sum))
            .unwrap();
        let nearest = [-2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]
            .map(T::from_f64)
            .map(T::to_f64);
        assert_eq!(widen(&data), nearest, "{}", T::DTYPE.name());
    }
    check::<f32>();
    check::<f16>();
    check::<bf16>();
}

#[test]
fn large_logits_do_not_overflow() {
    // e^1000 overflows f64, so the expected values are shifted by hand by the row maximum:
    // ln(sum e^x) = m + ln(sum e^(x - m)).
    let rows = [
        // bf16 spaces values in [512, 1024) 4 apart: these are exact in every type.
        [1000.0, 1004.0, 1008.0, 992.0],
        [-1000.0, -1000.0, -1000.0, -1000.0],
        [1000.0, -1000.0, 0.0, 0.0],
    ];
    let lse = [
        1008.0 + ((-8f64).exp() + (-4f64).exp() + 1.0 + (-16f64).exp()).ln(),
        -1000.0 + 4f64.ln(),
        1000.0 + (1.0 + (-2000f64).exp() + 2.0 * (-1000f64).exp()).ln(),
    ];
    let label_values = [1, 0, 1];
    let want_loss = [lse[0] - 1004.0, lse[1] + 1000.0, lse[2] + 1000.0];
    let grad: Vec<Vec<f64>> = rows
        .iter()
        .zip(lse)
        .zip(label_values)
        .map(|((row, lse), label)| {
            let onehot = |j| if j == label { 1.0 } else { 0.0 };
            row.iter()
                .enumerate()
                .map(|(j, x)| (x - lse).exp() - onehot(j))
                .collect()
        })
        .collect();

    fn check<T: Element>(rows: &[[f64; 4]], lse: &[f64], loss: &[f64], grad: &[Vec<f64>]) {
        let mut data: Vec<T> = logits(&rows.concat());
        let got = cpu::forward_backward(
            &mut data,
            &[1i64, 0, 1],
            Shape::flat(3, 4),
            &opts(Reduction::Sum),
        )
        .unwrap();
        // Values near 1000 in f64 carry absolute error ~1e-13 (ulp of 1000 is 1.1e-13).
        assert_all_close("row_lse", &got.row_lse, lse, 1e-9);
        assert_all_close("row_loss", &got.row_loss, loss, 1e-9);
        assert!(
            widen(&data).iter().all(|g| g.is_finite()),
            "{}: {data:?}",
            T::DTYPE.name()
        );
        assert_grad_rounded(&data, 4, grad);
    }
    check::<f32>(&rows, &lse, &want_loss, &grad);
    check::<f16>(&rows, &lse, &want_loss, &grad);
    check::<bf16>(&rows, &lse, &want_loss, &grad);
}

#[test]
fn zero_rows_are_valid_with_nan_mean_and_zero_sum() {
    let mut empty: Vec<f32> = vec![];
    let mean = cpu::forward_backward(
        &mut empty,
        &[] as &[i64],
        Shape::flat(0, 5),
        &Options::default(),
    )
    .unwrap();
    assert!(mean.loss.is_nan(), "mean over no rows: got {}", mean.loss);
    assert_eq!(mean.n_valid, 0);
    assert!(mean.row_loss.is_empty() && mean.row_lse.is_empty());
    let sum = cpu::forward_backward(
        &mut empty,
        &[] as &[i64],
        Shape::flat(0, 5),
        &opts(Reduction::Sum),
    )
    .unwrap();
    assert_eq!(sum.loss, 0.0);
}

#[test]
fn zero_length_sequences_under_the_causal_shift_do_not_panic() {
    // batch 3 of seq_len 0: no rows. Either answer is acceptable; a panic (`row % 0`) is not.
    let options = Options {
        causal_shift: true,
        ..Options::default()
    };
    let result = cpu::forward_backward(
        &mut [] as &mut [f32],
        &[] as &[i64],
        Shape::batched(3, 0, 4),
        &options,
    );
    assert!(
        matches!(&result, Ok(loss) if loss.n_valid == 0)
            || matches!(result, Err(Error::BadShape(_))),
        "{result:?}"
    );
}

#[test]
fn scale_grad_with_a_scalar_upstream_scales_every_row_and_skips_the_padding() {
    let rows = vec![vec![0.5, -1.0, 2.0], vec![-0.25, 3.0, 0.0]];
    let shape = Shape::flat(2, 3).with_row_stride(4);
    let mut grad: Vec<f32> = strided(&rows, 4, 1);
    cpu::scale_grad(&mut grad, shape, &[-1.5]).unwrap();
    let want: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().map(|x| x * -1.5).collect())
        .collect();
    assert_grad_rounded(&grad, 4, &want);
    assert_padding_untouched(&grad, 2, 3, 4);
}

#[test]
fn scale_grad_with_a_per_row_upstream_scales_each_row_by_its_own_value() {
    let rows = vec![
        vec![0.5, -1.0, 2.0],
        vec![-0.25, 3.0, 0.0],
        vec![1.0, 1.0, -1.0],
    ];
    let upstream = [2.0f32, 0.1, -3.0];
    let shape = Shape::flat(3, 3).with_row_stride(5);
    let want: Vec<Vec<f64>> = rows
        .iter()
        .zip(upstream)
        .map(|(row, u)| row.iter().map(|x| x * u as f64).collect())
        .collect();
    let mut grad: Vec<bf16> = strided(&rows, 5, 0);
    cpu::scale_grad(&mut grad, shape, &upstream).unwrap();
    // 0.1 is not exact in f32 or bf16: the product is rounded once to bf16 from `0.1f32 * x`.
    assert_grad_rounded(&grad, 5, &want);
    assert_padding_untouched(&grad, 3, 3, 5);
}

#[test]
fn scale_grad_of_the_none_reduction_gives_the_gradient_of_a_weighted_sum() {
    // d(sum_r w_r loss_r) = w_r * d(loss_r): `none` then a per-row upstream w.
    let rows = [vec![1.0, 2.0, 3.0], vec![0.5, -1.0, 2.0]];
    let weights = [0.5f32, -2.0];
    let mut data: Vec<f32> = logits(&rows.concat());
    let shape = Shape::flat(2, 3);
    cpu::forward_backward(&mut data, &[2i64, 1], shape, &opts(Reduction::None)).unwrap();
    cpu::scale_grad(&mut data, shape, &weights).unwrap();
    let want = [row_grad(&rows[0], 2, 0.5), row_grad(&rows[1], 1, -2.0)];
    // Two roundings to f32 (gradient, then product): up to twice the unit roundoff.
    for (r, row) in want.iter().enumerate() {
        for (j, &e) in row.iter().enumerate() {
            let tol = 2.0 * unit_roundoff(DType::F32) * e.abs();
            assert_close(
                &format!("gradient[{r}][{j}]"),
                data[r * 3 + j] as f64,
                e,
                tol,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: errors, never panics, and the logits left as they were.
// ---------------------------------------------------------------------------------------------

/// Runs the reference on f32 logits `0, 1, 2, ...` and checks that it failed without writing.
#[track_caller]
fn forward_error(logits_len: usize, labels: &[i64], shape: Shape, options: &Options) -> Error {
    let before: Vec<f32> = (0..logits_len).map(|i| i as f32).collect();
    let mut data = before.clone();
    let err =
        cpu::forward_backward(&mut data, labels, shape, options).expect_err("the call must fail");
    assert_eq!(data, before, "a failed call wrote into the logits ({err})");
    err
}

#[test]
fn zero_vocab_is_empty_vocab() {
    assert_eq!(
        forward_error(0, &[0, 0], Shape::flat(2, 0), &Options::default()),
        Error::EmptyVocab
    );
    assert_eq!(
        cpu::scale_grad(&mut [] as &mut [f32], Shape::flat(2, 0), &[1.0]),
        Err(Error::EmptyVocab)
    );
}

#[test]
fn vocab_beyond_the_kernels_32_bit_column_index_is_vocab_too_large() {
    let vocab = (u32::MAX / 2) as usize + 1;
    let err = forward_error(0, &[], Shape::flat(0, vocab), &Options::default());
    assert_eq!(err, Error::VocabTooLarge { vocab });
    // One less is accepted (no rows, so nothing to allocate).
    let ok = cpu::forward_backward(
        &mut [] as &mut [f32],
        &[] as &[i64],
        Shape::flat(0, vocab - 1),
        &Options::default(),
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn row_stride_smaller_than_vocab_is_row_stride_too_small() {
    let shape = Shape::flat(2, 4).with_row_stride(3);
    let err = forward_error(8, &[0, 1], shape, &Options::default());
    assert_eq!(
        err,
        Error::RowStrideTooSmall {
            row_stride: 3,
            vocab: 4
        }
    );
    assert_eq!(
        cpu::scale_grad(&mut [0f32; 8], shape, &[1.0]),
        Err(Error::RowStrideTooSmall {
            row_stride: 3,
            vocab: 4
        })
    );
}

#[test]
fn logits_shorter_than_the_shape_are_logits_too_short() {
    // Contiguous: rows * vocab.
    let err = forward_error(11, &[0, 1, 2], Shape::flat(3, 4), &Options::default());
    assert_eq!(
        err,
        Error::LogitsTooShort {
            needed: 12,
            len: 11
        }
    );
    // Strided: (rows - 1) * row_stride + vocab, no padding needed after the last row.
    let shape = Shape::flat(3, 4).with_row_stride(6);
    let err = forward_error(15, &[0, 1, 2], shape, &Options::default());
    assert_eq!(
        err,
        Error::LogitsTooShort {
            needed: 16,
            len: 15
        }
    );
    assert_eq!(
        cpu::scale_grad(&mut [0f32; 15], shape, &[1.0]),
        Err(Error::LogitsTooShort {
            needed: 16,
            len: 15
        })
    );
}

#[test]
fn label_count_other_than_one_per_row_is_labels_length() {
    let shape = Shape::batched(2, 3, 4);
    for len in [0, 5, 7] {
        let labels = vec![0i64; len];
        let err = forward_error(24, &labels, shape, &Options::default());
        assert_eq!(err, Error::LabelsLength { expected: 6, len });
    }
}

#[test]
fn upstream_neither_one_value_nor_one_per_row_is_upstream_length() {
    let shape = Shape::flat(3, 2);
    for len in [0, 2, 4] {
        let before = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut grad = before;
        let err = cpu::scale_grad(&mut grad, shape, &vec![2.0; len]);
        assert_eq!(err, Err(Error::UpstreamLength { rows: 3, len }));
        assert_eq!(grad, before, "a failed scale_grad wrote into the gradient");
    }
}

#[test]
fn label_equal_to_vocab_is_out_of_range_and_the_logits_are_untouched() {
    let err = forward_error(9, &[0, 3, 1], Shape::flat(3, 3), &Options::default());
    assert_eq!(
        err,
        Error::LabelOutOfRange {
            count: 1,
            row: Some(1),
            label: Some(3)
        }
    );
}

#[test]
fn negative_labels_other_than_ignore_index_are_out_of_range_reporting_the_first_row() {
    // Rows 1 and 3 are bad, row 2 is ignored: the error counts both and names row 1.
    let err = forward_error(
        12,
        &[0, -5, -100, 7],
        Shape::flat(4, 3),
        &Options::default(),
    );
    assert_eq!(
        err,
        Error::LabelOutOfRange {
            count: 2,
            row: Some(1),
            label: Some(-5)
        }
    );

    // The same through i32 labels and a reduction other than the mean.
    let before: Vec<bf16> = logits(&[1.0; 6]);
    let mut data = before.clone();
    let err = cpu::forward_backward(
        &mut data,
        &[1i32, -5],
        Shape::flat(2, 3),
        &opts(Reduction::Sum),
    );
    assert_eq!(
        err,
        Err(Error::LabelOutOfRange {
            count: 1,
            row: Some(1),
            label: Some(-5)
        })
    );
    assert_eq!(data, before);
}

#[test]
fn out_of_range_labels_under_the_causal_shift_name_the_row_that_reads_them() {
    // Row 0 reads label 1 (= vocab 3, bad); row 1 is the sequence's last and reads nothing.
    let err = forward_error(
        12,
        &[0, 3, 1, 2],
        Shape::batched(2, 2, 3),
        &Options {
            causal_shift: true,
            ..Options::default()
        },
    );
    assert_eq!(
        err,
        Error::LabelOutOfRange {
            count: 1,
            row: Some(0),
            label: Some(3)
        }
    );
}

#[test]
fn overflowing_shapes_are_bad_shape() {
    // batch * seq_len overflows usize.
    let shape = Shape::batched(usize::MAX, 2, 1);
    assert!(matches!(
        forward_error(0, &[], shape, &Options::default()),
        Error::BadShape(_)
    ));
    // (rows - 1) * row_stride overflows usize.
    let shape = Shape::flat(3, 1).with_row_stride(usize::MAX / 2 + 1);
    assert!(matches!(
        forward_error(3, &[0, 0, 0], shape, &Options::default()),
        Error::BadShape(_)
    ));
    // seq_len beyond the kernels' u32 (with no rows, so nothing else is wrong).
    let shape = Shape::batched(0, u32::MAX as usize + 1, 4);
    assert!(matches!(
        forward_error(0, &[], shape, &Options::default()),
        Error::BadShape(_)
    ));
}

#[test]

fn scale_grad_of_an_overflowing_shape_is_bad_shape() {
    let result = std::panic::catch_unwind(|| {
        cpu::scale_grad(
            &mut [] as &mut [f32],
            Shape::batched(usize::MAX, 2, 1),
            &[1.0],
        )
    });
    match result {
        Ok(result) => assert!(matches!(result, Err(Error::BadShape(_))), "{result:?}"),
        Err(_) => panic!("cpu::scale_grad panicked on an overflowing shape"),
    }
}

// ---------------------------------------------------------------------------------------------
// Launch planning.
// ---------------------------------------------------------------------------------------------

const LLAMA2_VOCAB: usize = 32000;
const LLAMA3_VOCAB: usize = 128256;
const GPT2_VOCAB: usize = 50257;

#[test]
fn tile_len_is_the_next_power_of_two_capped_at_32768() {
    assert_eq!(plan::MAX_TILE, 32768);
    for (vocab, tile) in [
        (1, 1),
        (2, 2),
        (3, 4),
        (1000, 1024),
        (1024, 1024),
        (32000, 32768),
    ] {
        assert_eq!(plan::tile_len(vocab), tile, "tile_len({vocab})");
    }
    for vocab in [32768, 32769, 50257, 128256, usize::MAX / 4] {
        assert_eq!(plan::tile_len(vocab), 32768, "tile_len({vocab})");
    }
    for vocab in 1..=70_000 {
        let tile = plan::tile_len(vocab);
        assert!(tile.is_power_of_two(), "tile_len({vocab}) = {tile}");
        assert!(
            tile >= vocab.min(32768) && tile < 2 * vocab,
            "tile_len({vocab}) = {tile}"
        );
    }
}

#[test]
fn threads_for_is_whole_warps_between_one_warp_and_the_cap() {
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        // Each thread walks `UNROLL` vectors of 16 bytes per step.
        let per_thread = plan::UNROLL * 16 / dtype.bytes();
        // Up to the longest row a shape can have (`VocabTooLarge` beyond u32::MAX / 2).
        let longest = (u32::MAX / 2) as usize;
        for len in (1..=300_000)
            .step_by(97)
            .chain([1, 8, 32768, 1 << 20, longest])
        {
            let threads = plan::threads_for(len, dtype);
            let what = format!("threads_for({len}, {dtype:?}) = {threads}");
            assert!(threads.is_multiple_of(32), "{what}");
            assert!((32..=plan::MAX_THREADS).contains(&threads), "{what}");
            // Enough threads to walk `len` in one step, unless capped, and no idle warp.
            assert!(
                threads == plan::MAX_THREADS || threads as usize * per_thread >= len,
                "{what}"
            );
            assert!(
                threads == 32 || (threads as usize - 32) * per_thread < len,
                "{what}"
            );
        }
    }
    // A 32 KiB bf16 chunk: 16384 elements = 256 threads x 8 vectors x 8.
    assert_eq!(plan::threads_for(16384, DType::Bf16), 256);
    assert_eq!(plan::threads_for(1, DType::F32), 32);
}

#[test]

fn threads_for_saturates_at_the_cap_for_any_length() {
    // `plan::plan` is public and takes an unvalidated vocab: a length past 2^32 vectors must
    // still give the cap, not wrap to 32 or overflow.
    for len in [48_000_000_000, 1 << 40, usize::MAX / 2] {
        let threads = std::panic::catch_unwind(|| plan::threads_for(len, DType::F32));
        assert_eq!(
            threads.ok(),
            Some(plan::MAX_THREADS),
            "threads_for({len}, F32)"
        );
    }
}

#[test]
fn shard_chunks_are_even_whole_vectors_of_about_the_target_and_cover_the_shard() {
    for width in (1..300).chain([
        8191, 8192, 8193, 16032, 18992, 32064, 37984, 64128, 131072, 262144,
    ]) {
        for dtype in [DType::F32, DType::Bf16, DType::F16] {
            let (len, n, threads) = plan::shard_chunking(width, dtype);
            let what = format!("shard_chunking({width}, {dtype:?}) = ({len}, {n}, {threads})");
            assert!(len > 0 && len % 8 == 0, "{what}: not whole vectors");
            assert!(
                n * len >= width && (n - 1) * len < width,
                "{what}: does not cover the shard once"
            );
            assert_eq!(n, width.div_ceil(plan::SHARD_CHUNK), "{what}: chunk count");
            // Even: the last chunk is at most a vector's worth per chunk shorter than the others.
            assert!(n * len - width < 8 * n, "{what}: uneven");
            assert_eq!(threads, plan::threads_for(len, dtype), "{what}");
        }
    }
    assert_eq!(plan::shard_chunking(37984, DType::Bf16), (7600, 5, 128));
}

#[test]
fn automatic_chunks_give_two_blocks_per_sm_unless_already_at_the_smallest_chunk() {
    for limits in [DeviceLimits::H100, DeviceLimits::A100] {
        for rows in [1, 2, 16, 100, 512, 8192] {
            for vocab in [100, 3000, LLAMA2_VOCAB, GPT2_VOCAB, LLAMA3_VOCAB, 256_000] {
                let choice = PlanChoice::Chunked { chunk_len: None };
                let got = plan::plan(rows, vocab, DType::Bf16, limits, choice).unwrap();
                let LaunchPlan::Chunked {
                    chunk_len,
                    n_chunks,
                    ..
                } = got
                else {
                    panic!("asked for chunks, got {got:?}");
                };
                let blocks = rows * n_chunks as usize;
                assert!(
                    blocks >= plan::MIN_BLOCKS_PER_SM * limits.sm_count as usize
                        || chunk_len as usize <= plan::MIN_CHUNK,
                    "{rows} x {vocab} on {limits:?}: {got:?}"
                );
            }
        }
    }
}

#[test]
fn forcing_fused_on_a_row_larger_than_shared_memory_is_plan_does_not_fit() {
    let got = plan::plan(
        8192,
        LLAMA3_VOCAB,
        DType::Bf16,
        DeviceLimits::H100,
        PlanChoice::Fused,
    );
    assert!(matches!(got, Err(Error::PlanDoesNotFit(_))), "{got:?}");
    let got = plan::plan(
        1,
        LLAMA2_VOCAB,
        DType::F32,
        DeviceLimits::A100,
        PlanChoice::Fused,
    );
    assert!(matches!(got, Ok(LaunchPlan::Fused { .. })), "{got:?}");
    let got = plan::plan(
        1,
        GPT2_VOCAB,
        DType::F32,
        DeviceLimits::A100,
        PlanChoice::Fused,
    );
    assert!(matches!(got, Err(Error::PlanDoesNotFit(_))), "{got:?}");
}

#[test]
fn chunk_len_that_is_not_a_positive_multiple_of_8_is_plan_does_not_fit() {
    for chunk_len in [0, 12, 4095] {
        let choice = PlanChoice::Chunked {
            chunk_len: Some(chunk_len),
        };
        let got = plan::plan(64, LLAMA2_VOCAB, DType::Bf16, DeviceLimits::H100, choice);
        assert!(
            matches!(got, Err(Error::PlanDoesNotFit(_))),
            "chunk_len {chunk_len}: {got:?}"
        );
    }
}

#[test]
fn more_blocks_than_the_grid_allows_is_plan_does_not_fit() {
    let rows = plan::MAX_GRID_X + 1;
    let got = plan::plan(
        rows,
        1024,
        DType::Bf16,
        DeviceLimits::H100,
        PlanChoice::Fused,
    );
    assert!(matches!(got, Err(Error::PlanDoesNotFit(_))), "{got:?}");
    let choice = PlanChoice::Chunked { chunk_len: Some(8) };
    let got = plan::plan(
        usize::MAX / 2,
        1024,
        DType::Bf16,
        DeviceLimits::H100,
        choice,
    );
    assert!(matches!(got, Err(Error::PlanDoesNotFit(_))), "{got:?}");
}

#[test]
fn chunks_cover_the_vocab_without_an_empty_chunk() {
    let chunk_choices = [
        None,
        Some(8),
        Some(16),
        Some(1000),
        Some(4096),
        Some(32768),
        Some(1 << 20),
    ];
    for vocab in [1, 7, 8, 100, 4097, LLAMA2_VOCAB, GPT2_VOCAB, LLAMA3_VOCAB] {
        for chunk_len in chunk_choices {
            for rows in [1, 1000] {
                let choice = PlanChoice::Chunked { chunk_len };
                let got = plan::plan(rows, vocab, DType::F16, DeviceLimits::A100, choice).unwrap();
                let LaunchPlan::Chunked {
                    threads,
                    chunk_len: len,
                    n_chunks,
                } = got
                else {
                    panic!("asked for chunks, got {got:?}");
                };
                let (len, n_chunks) = (len as usize, n_chunks as usize);
                let what = format!("vocab {vocab}, {chunk_len:?}, {rows} rows: {got:?}");
                assert!(len > 0 && len % 8 == 0, "{what}");
                assert!(
                    len * n_chunks >= vocab,
                    "chunks miss the end of the row: {what}"
                );
                assert!(
                    (n_chunks - 1) * len < vocab,
                    "the last chunk is empty: {what}"
                );
                assert!(
                    (32..=plan::MAX_THREADS).contains(&threads) && threads % 32 == 0,
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn fused_shared_memory_holds_the_row_and_fits_the_device() {
    for limits in [DeviceLimits::H100, DeviceLimits::A100] {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for vocab in [
                1,
                3,
                1000,
                LLAMA2_VOCAB,
                GPT2_VOCAB,
                65536,
                100_000,
                LLAMA3_VOCAB,
            ] {
                // The row after the block-reduction scratch at the start of shared memory.
                let needed = vocab * dtype.bytes() + xent::abi::SMEM_REDUCTION_BYTES as usize;
                match plan::plan(10_000, vocab, dtype, limits, PlanChoice::Fused) {
                    Ok(LaunchPlan::Fused {
                        threads,
                        smem_bytes,
                    }) => {
                        let what = format!("{vocab} {dtype:?} on {limits:?}: {smem_bytes} bytes");
                        assert!(smem_bytes as usize >= needed, "{what}");
                        assert!(smem_bytes <= limits.max_smem_per_block, "{what}");
                        assert!((32..=1024).contains(&threads) && threads.is_power_of_two());
                    }
                    Err(Error::PlanDoesNotFit(_)) => {
                        assert!(
                            needed > limits.max_smem_per_block as usize,
                            "{vocab} {dtype:?}"
                        );
                    }
                    other => panic!("{vocab} {dtype:?} on {limits:?}: {other:?}"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The embedded PTX.
// ---------------------------------------------------------------------------------------------

/// Names of the `.entry` directives of a PTX text (`.entry NAME(` or `.visible .entry NAME(`).
fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|line| line.trim_start().split_once(".entry "))
        .filter(|(before, _)| before.is_empty() || before.trim() == ".visible")
        .map(|(_, rest)| {
            rest.split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .unwrap_or("")
        })
        .collect()
}

#[test]
fn kernel_names_are_distinct() {
    let names = kernel_names();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "{names:?}");
    // count x 2 labels, finish, and per element type: fused in 7 variants (plain, per-row
    // options, those and token accuracy, those and the soft cap, the soft cap with token accuracy
    // or weighted smoothing, weighted smoothing, every option), chunk partial in 5 (not the two
    // before the last), chunk grad and backward in 4 (no token accuracy in a second pass), each
    // x 2 labels, + scale, + the predicted tokens, the entropies, a vocabulary shard's argmax and
    // its entropy summaries, each x 2 labels; the shards' argmax and entropy merges x 2 labels;
    // and the GEMM + log-sum-exp prototype.
    assert_eq!(
        names.len(),
        2 + 1 + 3 * ((7 + 5 + 2 * 4) * 2 + 1 + 2 + 2 + 2 + 2) + 2 + 2 + 1
    );
}

#[test]
fn every_kernel_entry_point_is_in_both_ptx_texts() {
    for (target, ptx) in [("sm_80", PTX_SM80), ("sm_90", PTX_SM90)] {
        let entries = ptx_entries(ptx);
        let missing: Vec<String> = kernel_names()
            .into_iter()
            .filter(|name| !entries.contains(&name.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{target} PTX lacks {missing:?}; it has {entries:?}"
        );
    }
}

#[test]
fn each_ptx_text_targets_its_compute_capability() {
    for (target, ptx) in [("sm_80", PTX_SM80), ("sm_90", PTX_SM90)] {
        let targets: Vec<&str> = ptx
            .lines()
            .filter(|line| line.trim_start().starts_with(".target"))
            .collect();
        assert_eq!(targets.len(), 1, "{target}: {targets:?}");
        let declared = targets[0].trim_start().trim_start_matches(".target").trim();
        // `.target sm_90` possibly followed by `, debug` etc.
        assert_eq!(
            declared.split(',').next().map(str::trim),
            Some(target),
            "{targets:?}"
        );
    }
}

#[test]
fn each_ptx_text_is_marked_generated_on_its_first_line() {
    for (target, ptx) in [("sm_80", PTX_SM80), ("sm_90", PTX_SM90)] {
        let first = ptx.lines().next().unwrap_or("");
        assert!(
            first.contains("@generated"),
            "{target} PTX starts with {first:?}"
        );
    }
}

#[test]
fn ptx_for_picks_sm80_for_8x_and_sm90_for_9x_and_newer() {
    for (major, minor) in [(7, 5), (7, 0), (6, 1), (0, 0), (-1, 0)] {
        assert_eq!(
            ptx_for(major, minor),
            Err(Error::UnsupportedComputeCapability { major, minor })
        );
    }
    for (major, minor) in [(8, 0), (8, 6), (8, 9)] {
        assert_eq!(ptx_for(major, minor), Ok(PTX_SM80), "{major}.{minor}");
    }
    for (major, minor) in [(9, 0), (10, 0), (12, 0)] {
        assert_eq!(ptx_for(major, minor), Ok(PTX_SM90), "{major}.{minor}");
    }
}

#[test]
fn xent_arch_picks_the_ptx_and_clusters_or_is_an_error() {
    // Unset: the device's own PTX, clusters from 9.0 on.
    assert_eq!(ptx_for_arch(8, 0, None), Ok((PTX_SM80, false)));
    assert_eq!(ptx_for_arch(9, 0, None), Ok((PTX_SM90, true)));
    assert_eq!(ptx_for_arch(10, 0, None), Ok((PTX_SM90, true)));
    // sm_80 anywhere it runs: the A100's kernels, without clusters.
    for (major, minor) in [(8, 0), (8, 9), (9, 0), (10, 0)] {
        assert_eq!(
            ptx_for_arch(major, minor, Some("sm_80")),
            Ok((PTX_SM80, false)),
            "{major}.{minor}"
        );
    }
    assert_eq!(ptx_for_arch(9, 0, Some("sm_90")), Ok((PTX_SM90, true)));
    // sm_90 PTX cannot run before 9.0; an unknown name is an error naming the variable; a device
    // too old for any PTX stays unsupported.
    for (major, arch) in [(8, "sm_90"), (9, "sm_75"), (9, "")] {
        let got = ptx_for_arch(major, 0, Some(arch));
        assert!(
            matches!(&got, Err(Error::InvalidOption(m)) if m.contains("XENT_ARCH")),
            "{major}.0 {arch:?}: {got:?}"
        );
    }
    assert_eq!(
        ptx_for_arch(7, 5, Some("sm_80")),
        Err(Error::UnsupportedComputeCapability { major: 7, minor: 5 })
    );
}

// ---------------------------------------------------------------------------------------------
// Opening a device.
// ---------------------------------------------------------------------------------------------

#[test]
fn opening_a_device_without_a_driver_or_device_is_an_error_not_a_panic() {
    match CrossEntropy::new(0) {
        // A GPU is present (this file runs on GPU machines too): nothing to check here.
        Ok(_) => {}
        Err(Error::NoDriver | Error::NoDevice { .. }) => {}
        Err(other) => panic!("CrossEntropy::new(0) without a GPU: unexpected {other:?}"),
    }
    // No machine has this many devices: always an error.
    match CrossEntropy::new(1 << 20) {
        Err(Error::NoDriver) => {}
        Err(Error::NoDevice { ordinal, .. }) => assert_eq!(ordinal, 1 << 20),
        other => panic!("CrossEntropy::new(1 << 20): unexpected {other:?}"),
    }
    // Nor a partition of its SMs.
    match xent::green_context(1 << 20, 16, false) {
        Err(Error::NoDriver) => {}
        Err(Error::NoDevice { ordinal, .. }) => assert_eq!(ordinal, 1 << 20),
        other => panic!("green_context(1 << 20, ..): unexpected {other:?}"),
    }
}

/// The cluster plan's invariants, for one (rows, vocab, dtype) on an H100-class device.
fn assert_cluster_plan(rows: usize, vocab: usize, dtype: DType) -> (u32, u32) {
    let limits = DeviceLimits::H100;
    let got = plan::plan(rows, vocab, dtype, limits, PlanChoice::Auto);
    let Ok(LaunchPlan::Cluster {
        threads,
        chunk_len,
        size,
        smem_bytes,
    }) = got
    else {
        panic!("{rows} x {vocab} {dtype:?}: expected a cluster plan, got {got:?}");
    };
    let (chunk, size_usize) = (chunk_len as usize, size as usize);
    assert!(
        chunk * size_usize >= vocab,
        "{got:?} does not cover the row"
    );
    assert!(chunk * (size_usize - 1) < vocab, "{got:?} has an empty CTA");
    assert!(chunk % 8 == 0, "{got:?}: chunks must hold whole vectors");
    assert!((1..=plan::MAX_CLUSTER).contains(&size), "{got:?}");
    assert!(
        threads % 32 == 0 && (32..=plan::MAX_THREADS).contains(&threads),
        "{got:?}"
    );
    assert!(smem_bytes <= limits.max_smem_per_block, "{got:?}");
    // What is not kept in registers is in shared memory.
    let in_regs = (plan::CLUSTER_KEEP * threads * 16) as usize;
    assert!(
        smem_bytes as usize + in_regs >= chunk * dtype.bytes(),
        "{got:?}"
    );
    (size, chunk_len)
}

#[test]
fn h100_splits_rows_over_clusters_with_chunks_that_fit_shared_memory() {
    // Llama-2 in bf16 (62.5 KiB a row) stays in one CTA; Llama-3 (250.5 KiB), which no single
    // block can hold, splits in four chunks of at most `CLUSTER_CHUNK_BYTES`.
    assert_eq!(assert_cluster_plan(8192, LLAMA2_VOCAB, DType::Bf16).0, 1);
    assert!(LLAMA3_VOCAB * 2 > DeviceLimits::H100.max_smem_per_block as usize);
    assert_eq!(assert_cluster_plan(8192, LLAMA3_VOCAB, DType::Bf16).0, 4);
    for vocab in [1, 7, 5003, GPT2_VOCAB, 151_936, 262_144] {
        for dtype in [DType::Bf16, DType::F16, DType::F32] {
            assert_cluster_plan(8192, vocab, dtype);
        }
    }
}

#[test]
fn few_rows_get_larger_clusters_to_fill_every_sm_twice() {
    let limits = DeviceLimits::H100;
    let (size, _) = assert_cluster_plan(512, LLAMA3_VOCAB, DType::Bf16);
    assert!(512 * size as usize >= 2 * limits.sm_count as usize);
    let (size, _) = assert_cluster_plan(3, 32000, DType::Bf16);
    assert_eq!(
        size,
        plan::MAX_CLUSTER,
        "3 rows: as many CTAs per row as a cluster allows"
    );
}

#[test]
fn kernels_the_split_plan_loses_with_take_the_chunked_plan_automatically() {
    let auto = |traits| {
        plan::plan_with(
            8192,
            LLAMA3_VOCAB,
            DType::Bf16,
            DeviceLimits::A100,
            PlanChoice::Auto,
            traits,
            &mut |_| None,
        )
    };
    let got = auto(plan::KernelTraits::PLAIN);
    assert!(matches!(got, Ok(LaunchPlan::Split { .. })), "{got:?}");
    let got = auto(plan::KernelTraits {
        split_automatic: false,
        ..plan::KernelTraits::PLAIN
    });
    assert!(matches!(got, Ok(LaunchPlan::Chunked { .. })), "{got:?}");
    // Rows that fit one block stay fused either way.
    let got = plan::plan_with(
        8192,
        LLAMA2_VOCAB,
        DType::Bf16,
        DeviceLimits::A100,
        PlanChoice::Auto,
        plan::KernelTraits {
            split_automatic: false,
            ..plan::KernelTraits::PLAIN
        },
        &mut |_| None,
    );
    assert!(matches!(got, Ok(LaunchPlan::Fused { .. })), "{got:?}");
}

/// The per-row option kernels' bound (`SPLIT_OPTION_THREADS`) gives the automatic split plan 384
/// threads a CTA at the large shapes, and the soft cap's in f32 (`SPLIT_CAP_THREADS`) 512, with
/// the same chunks as the plain kernels' 256.
#[test]
fn the_split_plan_takes_the_kernels_thread_bound() {
    for (rows, vocab, dtype) in [
        (8192, LLAMA3_VOCAB, DType::Bf16),
        (16384, 151_936, DType::Bf16),
        (4096, 262_144, DType::Bf16),
        (8192, LLAMA3_VOCAB, DType::F32),
    ] {
        let auto = |split_threads| {
            let traits = plan::KernelTraits {
                split_threads,
                ..plan::KernelTraits::PLAIN
            };
            plan::plan_with(
                rows,
                vocab,
                dtype,
                DeviceLimits::A100,
                PlanChoice::Auto,
                traits,
                &mut |_| None,
            )
        };
        let (
            Ok(LaunchPlan::Split {
                threads: plain,
                chunk_len: a,
                ..
            }),
            Ok(LaunchPlan::Split {
                threads: option,
                chunk_len: b,
                ..
            }),
            Ok(LaunchPlan::Split {
                threads: soft_cap,
                chunk_len: c,
                ..
            }),
        ) = (
            auto(plan::SPLIT_MAX_THREADS),
            auto(plan::SPLIT_OPTION_THREADS),
            auto(plan::SPLIT_CAP_THREADS),
        )
        else {
            panic!("{rows} x {vocab} {dtype:?}: expected split plans");
        };
        assert_eq!(
            (plain, option, soft_cap, a, a),
            (256, 384, 512, b, c),
            "{rows} x {vocab} {dtype:?}"
        );
    }
}

/// A forced thread count for the split plan is the CTA's, whatever the chunk; without one the
/// plan takes `threads_for` the chunk up to `SPLIT_MAX_THREADS`; a count that is not a multiple of
/// 32 up to `MAX_THREADS` is refused, not launched.
#[test]
fn the_split_plan_takes_a_forced_thread_count_and_refuses_a_bad_one() {
    let (rows, vocab, dtype) = (8192, LLAMA3_VOCAB, DType::Bf16);
    let threads_of = |threads: Option<u32>| {
        let choice = PlanChoice::Split {
            chunk_len: None,
            threads,
        };
        match plan::plan(rows, vocab, dtype, DeviceLimits::A100, choice) {
            Ok(LaunchPlan::Split { threads, .. }) => Ok(threads),
            Ok(other) => panic!("expected a split plan, got {other:?}"),
            Err(e) => Err(e.to_string()),
        }
    };
    assert_eq!(threads_of(None), Ok(plan::SPLIT_MAX_THREADS));
    for t in [32, 128, 384, 512] {
        assert_eq!(threads_of(Some(t)), Ok(t));
    }
    for t in [0, 100, plan::MAX_THREADS + 32] {
        let err = threads_of(Some(t)).expect_err("a bad thread count must be refused");
        assert!(err.contains("threads per CTA"), "{t}: {err}");
    }
}

/// The `XENT_LIMITS=a100` emulation gives each SM the CTAs an A100's 164 KiB of shared memory
/// hold (1 KiB reserved a CTA), not the H200's 228 KiB: two of the split plan's chunks at the
/// large 16-bit shapes and in f32, where the H200 holds three.
#[test]
fn an_a100_sm_holds_two_split_chunks_where_an_h200_holds_three() {
    for (rows, vocab, dtype) in [
        (8192, LLAMA3_VOCAB, DType::Bf16),
        (16384, 151_936, DType::Bf16),
        (4096, 262_144, DType::Bf16),
        (8192, GPT2_VOCAB, DType::F32),
    ] {
        let split = PlanChoice::Split {
            chunk_len: None,
            threads: None,
        };
        let got = plan::plan(rows, vocab, dtype, DeviceLimits::A100, split);
        let Ok(LaunchPlan::Split { smem_bytes, .. }) = got else {
            panic!("{rows} x {vocab} {dtype:?}: expected a split plan, got {got:?}");
        };
        let per_cta = smem_bytes + plan::SMEM_RESERVED_PER_CTA;
        assert_eq!(
            plan::a100_ctas_per_sm(smem_bytes),
            2,
            "{rows} x {vocab} {dtype:?}"
        );
        assert_eq!(
            228 * 1024 / per_cta,
            3,
            "{rows} x {vocab} {dtype:?} on an H200"
        );
    }
    // The most a CTA may opt in to on an A100 leaves room for one; a small CTA for many.
    assert_eq!(
        plan::a100_ctas_per_sm(DeviceLimits::A100.max_smem_per_block),
        1
    );
    assert_eq!(plan::a100_ctas_per_sm(16 * 1024), 9);
    assert_eq!(plan::a100_ctas_per_sm(0), 164);
}

#[test]
fn a100_has_no_clusters_and_uses_fused_split_or_chunked_plans() {
    let on_a100 =
        |rows, vocab, dtype| plan::plan(rows, vocab, dtype, DeviceLimits::A100, PlanChoice::Auto);
    // Llama-2's vocab in bf16 (62.5 KiB) fits one block: fused.
    let got = on_a100(8192, LLAMA2_VOCAB, DType::Bf16);
    assert!(matches!(got, Ok(LaunchPlan::Fused { .. })), "{got:?}");
    // GPT-2's in f32 (196 KiB) is over the A100's 163 KiB per block: split (3 chunks of 67 KiB),
    // every group busy.
    let got = on_a100(8192, GPT2_VOCAB, DType::F32);
    assert!(
        matches!(got, Ok(LaunchPlan::Split { groups, n_chunks: 3, .. }) if groups < 8192),
        "{got:?}"
    );
    // Llama 3's in bf16: 4 chunks a row, split at 512 rows (one CTA per SM without the driver's
    // answer: 27 groups).
    let got = on_a100(512, LLAMA3_VOCAB, DType::Bf16);
    assert!(
        matches!(
            got,
            Ok(LaunchPlan::Split {
                groups: 27,
                n_chunks: 4,
                ..
            })
        ),
        "{got:?}"
    );
    // A 256K vocabulary in bf16: 7 chunks a row of 37504 elements (the even 37456 rounded up to
    // 256 bytes), split, not split_l2.
    let got = on_a100(4096, 262144, DType::Bf16);
    assert!(
        matches!(
            got,
            Ok(LaunchPlan::Split {
                n_chunks: 7,
                chunk_len: 37504,
                in_l2: false,
                ..
            })
        ),
        "{got:?}"
    );
    // More chunks a row than the split plan was measured at (the same in f32: 13): chunked.
    let got = on_a100(4096, 262144, DType::F32);
    assert!(matches!(got, Ok(LaunchPlan::Chunked { .. })), "{got:?}");
    // Fewer rows than the split plan has groups: chunked, with at least two blocks per SM.
    let got = on_a100(8, LLAMA3_VOCAB, DType::Bf16);
    let Ok(LaunchPlan::Chunked { n_chunks, .. }) = got else {
        panic!("expected a chunked plan, got {got:?}");
    };
    assert!(8 * n_chunks as usize >= 2 * DeviceLimits::A100.sm_count as usize);
    // Forcing the cluster plan without clusters is an error, not a panic.
    let forced = plan::plan(
        8,
        100,
        DType::Bf16,
        DeviceLimits::A100,
        PlanChoice::Cluster {
            size: None,
            threads: None,
        },
    );
    assert!(
        matches!(forced, Err(Error::PlanDoesNotFit(_))),
        "{forced:?}"
    );
}

#[test]
fn split_plan_cuts_rows_into_even_chunks_that_fit_and_groups_what_is_resident() {
    let a100 = DeviceLimits::A100;
    // The split plan keeps its chunks in shared memory, split_l2 (the plain loss) in L2: even
    // chunks of at most `SPLIT_CHUNK_BYTES` that fit there, or chunks of `SPLIT_L2_CHUNK_LEN`
    // elements with the reduction's scratch and one batch a thread a CTA.
    for in_l2 in [false, true] {
        let forced = |chunk_len| match in_l2 {
            false => PlanChoice::Split {
                chunk_len,
                threads: None,
            },
            true => PlanChoice::SplitL2 { chunk_len },
        };
        let slots = match in_l2 {
            false => 2,
            true => xent::abi::SPLIT_L2_SLOTS,
        };
        // Refused where the cluster plan runs.
        assert!(matches!(
            plan::plan(64, 128256, DType::Bf16, DeviceLimits::H100, forced(None)),
            Err(Error::PlanDoesNotFit(_))
        ));
        for (vocab, dtype) in [
            (128256, DType::Bf16),
            (262144, DType::Bf16),
            (151936, DType::F16),
            (128256, DType::F32),
            (1000, DType::F32),
        ] {
            for rows in [1, 7, 4096] {
                let got = plan::plan(rows, vocab, dtype, a100, forced(None)).unwrap();
                let LaunchPlan::Split {
                    threads,
                    chunk_len,
                    n_chunks,
                    groups,
                    smem_bytes,
                    in_l2: got_in_l2,
                } = got
                else {
                    panic!("{got:?}");
                };
                let what = format!("{rows} x {vocab} {dtype:?}: {got:?}");
                assert_eq!(got_in_l2, in_l2, "{what}");
                let chunk_len = chunk_len as usize;
                assert!(chunk_len.is_multiple_of(8), "{what}");
                assert!(
                    n_chunks as usize * chunk_len >= vocab
                        && (n_chunks as usize - 1) * chunk_len < vocab,
                    "{what}"
                );
                if in_l2 {
                    assert_eq!(
                        chunk_len,
                        plan::SPLIT_L2_CHUNK_LEN.min(vocab.next_multiple_of(8)),
                        "{what}"
                    );
                } else {
                    assert!(
                        chunk_len * dtype.bytes() <= plan::SPLIT_CHUNK_BYTES,
                        "{what}"
                    );
                    assert_eq!(
                        n_chunks as usize,
                        (vocab * dtype.bytes()).div_ceil(plan::SPLIT_CHUNK_BYTES),
                        "{what}"
                    );
                }
                assert!(
                    threads.is_multiple_of(32) && threads <= plan::SPLIT_MAX_THREADS,
                    "{what}"
                );
                assert!(smem_bytes <= a100.max_smem_per_block, "{what}");
                if in_l2 {
                    // The scratch and one batch a thread: three CTAs fit in an A100's SM.
                    assert_eq!(smem_bytes, plan::split_l2_smem_bytes(threads), "{what}");
                    assert!(
                        smem_bytes == xent::abi::SMEM_STASH_OFFSET + threads * 128
                            && plan::a100_ctas_per_sm(smem_bytes) >= 3,
                        "{what}"
                    );
                }
                // Without the driver's answer: one CTA per SM, whole groups, at most one per row.
                assert_eq!(
                    groups as usize,
                    ((a100.sm_count / n_chunks) as usize).min(rows),
                    "{what}"
                );
                // `slots` summaries per CTA and a counter per group.
                assert_eq!(
                    plan::partials_len(rows, &got),
                    groups as usize * (slots * xent::abi::PARTIAL_WORDS * n_chunks as usize + 1),
                    "{what}"
                );
            }
        }
        // A forced chunk: a positive multiple of 8 (that fits in shared memory, for split).
        for bad in [0, 12] {
            assert!(
                matches!(
                    plan::plan(8, 1 << 21, DType::F32, a100, forced(Some(bad))),
                    Err(Error::PlanDoesNotFit(_))
                ),
                "chunk_len {bad}"
            );
        }
        let large = plan::plan(8, 1 << 21, DType::F32, a100, forced(Some(1 << 20)));
        assert_eq!(
            matches!(large, Ok(LaunchPlan::Split { n_chunks: 2, .. })),
            in_l2,
            "{large:?}"
        );
        // More chunks a row than CTAs resident at once: no plan.
        assert!(matches!(
            plan::plan(8, 1 << 20, DType::F32, a100, forced(Some(512))),
            Err(Error::PlanDoesNotFit(_))
        ));
    }
    // split_l2 has kernels for the plain loss only.
    let options_kernels = plan::plan_with(
        64,
        128256,
        DType::Bf16,
        a100,
        PlanChoice::SplitL2 { chunk_len: None },
        plan::KernelTraits {
            split_l2: false,
            ..plan::KernelTraits::PLAIN
        },
        &mut |_| None,
    );
    assert!(
        matches!(options_kernels, Err(Error::PlanDoesNotFit(_))),
        "{options_kernels:?}"
    );
    // The automatic plan takes the split plan, never split_l2 (forced only), for the plain loss
    // and the options' kernels alike, with even chunks rounded up to whole 256-byte runs.
    let options_traits = plan::KernelTraits {
        split_l2: false,
        ..plan::KernelTraits::PLAIN
    };
    for (vocab, dtype, chunk, chunks) in [
        (128256, DType::Bf16, 32128, 4),
        (128256, DType::F16, 32128, 4),
        (151936, DType::Bf16, 38016, 4),
        (200000, DType::Bf16, 40064, 5),
        (262144, DType::Bf16, 37504, 7),
        (128256, DType::F32, 18368, 7),
        (160000, DType::F32, 20032, 8),
        // 8 even chunks of 20424 f32: rounded up to the bound itself (80 KiB), not past it.
        (163388, DType::F32, 20480, 8),
        // A row's only chunk stays whole vectors of the row.
        (72, DType::Bf16, 72, 1),
    ] {
        let what = format!("{vocab} {dtype:?}");
        assert_eq!(
            (
                plan::auto_split_chunk_len(vocab, dtype),
                vocab.div_ceil(chunk)
            ),
            (chunk, chunks),
            "{what}"
        );
        if chunks == 1 {
            continue;
        }
        for traits in [plan::KernelTraits::PLAIN, options_traits] {
            let auto = plan::plan_with(
                8192,
                vocab,
                dtype,
                a100,
                PlanChoice::Auto,
                traits,
                &mut |_| None,
            )
            .unwrap();
            assert!(
                matches!(auto, LaunchPlan::Split { in_l2: false, chunk_len, n_chunks, .. }
                    if chunk_len as usize == chunk && n_chunks as usize == chunks),
                "{what}: {auto:?}"
            );
        }
    }
    // Rows the split plan would cut into more than 8 chunks stay chunked.
    let longer = plan::plan(8192, 1 << 20, DType::Bf16, a100, PlanChoice::Auto).unwrap();
    assert!(matches!(longer, LaunchPlan::Chunked { .. }), "{longer:?}");
}

#[test]
fn split_kernels_are_in_the_sm80_ptx_only() {
    for name in xent::split_kernel_names() {
        assert!(
            xent::PTX_SM80.contains(&format!(".entry {name}(")),
            "{name} missing from sm_80"
        );
        assert!(
            !xent::PTX_SM90.contains(&format!(".entry {name}(")),
            "{name} in sm_90"
        );
    }
}

#[test]
fn cluster_kernels_are_in_the_sm90_ptx_only() {
    for name in xent::cluster_kernel_names() {
        assert!(
            xent::PTX_SM90.contains(&format!(".entry {name}(")),
            "{name} missing from sm_90"
        );
        assert!(
            !xent::PTX_SM80.contains(&format!(".entry {name}(")),
            "{name} in sm_80"
        );
    }
}

/// Clusters of a launch an H200 runs at once, by (cluster size, threads per CTA, dynamic shared
/// memory), as its driver's `cuOccupancyMaxActiveClusters` answered for the plain cluster kernels
/// (2 vectors per thread kept in registers, 39-40 registers; 2026-11-28, printed by
/// `bench-throughput --explain` for the configs of `host/benches/configs.txt`).
const H200_ACTIVE_CLUSTERS: &[(u32, u32, u32, u32)] = &[
    (1, 256, 56112, 528),
    (1, 512, 47920, 396),
    (2, 256, 24112, 396),
    (2, 256, 120368, 66),
    (2, 256, 144048, 66),
    (2, 512, 112176, 132),
    (2, 512, 135856, 66),
    (3, 192, 15504, 327),
    (3, 256, 77616, 79),
    (3, 256, 93408, 79),
    (3, 256, 163120, 39),
    (3, 256, 166880, 39),
    (3, 512, 69424, 124),
    (3, 512, 85216, 79),
    (3, 512, 154928, 39),
    (3, 512, 158688, 39),
    (4, 128, 12208, 248),
    (4, 256, 56240, 124),
    (4, 256, 68080, 92),
    (4, 256, 120368, 30),
    (4, 256, 123184, 30),
    (4, 512, 48048, 92),
    (4, 512, 59888, 92),
    (4, 512, 112176, 62),
    (4, 512, 114992, 62),
    (5, 128, 9008, 193),
    (5, 256, 43424, 124),
    (5, 256, 52896, 94),
    (5, 256, 94736, 47),
    (5, 256, 96976, 47),
    (5, 416, 38304, 69),
    (5, 480, 45728, 69),
    (5, 512, 86544, 47),
    (5, 512, 88784, 47),
    (6, 96, 7904, 163),
    (6, 256, 34864, 124),
    (6, 256, 42768, 101),
    (6, 256, 77616, 39),
    (6, 256, 79504, 39),
    (6, 352, 31792, 79),
    (6, 416, 37648, 62),
    (6, 512, 69424, 62),
    (6, 512, 71312, 62),
    (7, 96, 6384, 139),
    (7, 256, 28768, 101),
    (7, 256, 35536, 101),
    (7, 256, 65424, 47),
    (7, 256, 67024, 47),
    (7, 288, 27744, 84),
    (7, 352, 32464, 69),
    (7, 512, 57232, 47),
    (7, 512, 58832, 47),
    (8, 64, 6256, 124),
    (8, 256, 24176, 92),
    (8, 256, 30096, 92),
    (8, 256, 56240, 62),
    (8, 256, 57648, 45),
    (8, 320, 28048, 62),
    (8, 512, 48048, 45),
    (8, 512, 49456, 45),
];

fn h200_active_clusters(launch: &LaunchPlan) -> Option<u32> {
    let &LaunchPlan::Cluster {
        size,
        threads,
        smem_bytes,
        ..
    } = launch
    else {
        panic!("asked about a launch that is not a cluster plan: {launch:?}");
    };
    H200_ACTIVE_CLUSTERS
        .iter()
        .find(|&&(s, t, smem, _)| (s, t, smem) == (size, threads, smem_bytes))
        .map(|&(.., n)| n)
}

#[test]
fn the_cluster_shape_keeps_the_most_row_bytes_resident() {
    // (rows, vocab, dtype, expected (size, threads)): the best or within noise of the best
    // measured on an H200 in the runs quoted at `plan::cluster_shape_by_residency` and
    // `plan::RESIDENCY_SLACK`.
    let cases = [
        // 29.3 MiB in 707 CTAs, over 6 of 256 (29.3 MiB, 606 CTAs).
        (16384, 151_936, DType::Bf16, (7, 256)),
        // 30.3 MiB in 744 CTAs, within 7% of 2 of 512 (32.3 MiB in 264 CTAs).
        (8192, 128_256, DType::Bf16, (6, 256)),
        (8192, 128_256, DType::F16, (6, 256)),
        // 31.0 MiB in 372 CTAs, as much as 4 of 512 in 248.
        (4096, 262_144, DType::Bf16, (6, 512)),
        // 256 threads fit 4 CTAs per SM (512: 3, by registers): 32.2 MiB against 24.2.
        (8192, 32_000, DType::Bf16, (1, 256)),
        (8192, 128_256, DType::F32, (8, 256)),
        // 512 rows: waves of 124 clusters leave the fifth one mostly empty; 132 clusters of 2
        // take 4 full-ish waves.
        (512, 128_256, DType::Bf16, (2, 512)),
    ];
    for (rows, vocab, dtype, want) in cases {
        let limits = DeviceLimits::H100;
        let got = plan::cluster_shape_by_residency(
            rows,
            vocab,
            dtype,
            limits,
            plan::KernelTraits::PLAIN,
            None,
            &mut h200_active_clusters,
        );
        assert_eq!(got, Some(want), "{rows} x {vocab} {dtype:?}");
        let launch = plan::plan_with(
            rows,
            vocab,
            dtype,
            limits,
            PlanChoice::Auto,
            plan::KernelTraits::PLAIN,
            &mut h200_active_clusters,
        )
        .unwrap();
        assert!(
            matches!(launch, LaunchPlan::Cluster { size, threads, .. } if (size, threads) == want),
            "{rows} x {vocab} {dtype:?}: {launch:?}"
        );
    }
}

#[test]
fn size_5_is_taken_only_when_no_other_size_keeps_as_much_resident() {
    // The driver's answers for token accuracy's cluster kernels (47 registers) at 8192 x 128256
    // bf16 on an H200 (`--explain`, 2026-12-03): 4 and 5 x 256 both keep 124 clusters (30.3 MiB),
    // 6 x 256 101. By CTAs the tie went to 5 (86.2% of copy); 4 ran at 88.3, and at 87.7 against
    // 5's 85.8 in one later run.
    let accuracy = |plan: &LaunchPlan| {
        let LaunchPlan::Cluster { size, threads, .. } = *plan else {
            return None;
        };
        Some(match (size, threads) {
            (2, 512) => 132,
            (2, 256) => 66,
            (3, _) => 79,
            (4, 512) | (6, 352) => 62,
            (4, 256) | (5, 256) => 124,
            (5, 416) | (7, 288) => 69,
            (6, 256) => 101,
            (7, 256) => 84,
            (8, 256) => 77,
            _ => return None,
        })
    };
    let limits = DeviceLimits::H100;
    let shape = |answers: &dyn Fn(&LaunchPlan) -> Option<u32>| {
        plan::cluster_shape_by_residency(
            8192,
            128_256,
            DType::Bf16,
            limits,
            plan::KernelTraits::PLAIN,
            None,
            &mut |p| answers(p),
        )
    };
    assert_eq!(plan::CLUSTER_SIZE_LAST, 5);
    assert_eq!(shape(&accuracy), Some((4, 256)));
    // Alone within the slack, size 5 is taken.
    let five_alone = |plan: &LaunchPlan| match *plan {
        LaunchPlan::Cluster {
            size: 5,
            threads: 256,
            ..
        } => Some(124),
        _ => accuracy(plan).map(|n| n.min(101)),
    };
    assert_eq!(shape(&five_alone), Some((5, 256)));
}

#[test]
fn the_cluster_candidates_are_every_size_with_its_own_and_256_threads() {
    let limits = DeviceLimits::H100;
    let candidates = plan::cluster_candidates(
        8192,
        128_256,
        DType::Bf16,
        limits,
        plan::KernelTraits::PLAIN,
        None,
        &mut h200_active_clusters,
    );
    let shapes: Vec<(u32, u32)> = candidates
        .iter()
        .map(|c| match c.plan {
            LaunchPlan::Cluster { size, threads, .. } => (size, threads),
            other => panic!("not a cluster plan: {other:?}"),
        })
        .collect();
    // Size 1 does not fit (250.5 KiB a row); 8 gives 256 threads on its own.
    let want = [
        (2, 512),
        (2, 256),
        (3, 512),
        (3, 256),
        (4, 512),
        (4, 256),
        (5, 416),
        (5, 256),
        (6, 352),
        (6, 256),
        (7, 288),
        (7, 256),
        (8, 256),
    ];
    assert_eq!(shapes, want);
    for c in &candidates {
        assert!(c.active_clusters.is_some(), "{c:?}");
        let LaunchPlan::Cluster {
            chunk_len, size, ..
        } = c.plan
        else {
            unreachable!()
        };
        let clusters = u64::from(c.active_clusters.unwrap());
        assert_eq!(
            c.resident_bytes(DType::Bf16),
            Some(clusters * u64::from(size) * u64::from(chunk_len) * 2)
        );
        assert_eq!(c.resident_ctas(), Some(clusters * u64::from(size)));
    }
    // With 8192 rows every wave but the last is full: the mean is within 2% of the peak.
    let c = candidates[0];
    let (peak, mean) = (
        c.resident_bytes(DType::Bf16).unwrap() as f64,
        c.mean_resident_bytes(8192, DType::Bf16).unwrap(),
    );
    assert!(mean <= peak && mean > 0.98 * peak, "{mean} of {peak}");
    // 200 rows in waves of 132 clusters: two waves, 200 of 264 slots busy.
    let mean = c.mean_resident_bytes(200, DType::Bf16).unwrap();
    assert!(
        (mean - peak * 200.0 / 264.0).abs() < 1.0,
        "{mean} of {peak}"
    );
    // A forced thread count is the only one weighed; no answer, no bytes.
    let forced = plan::cluster_candidates(
        8192,
        128_256,
        DType::Bf16,
        limits,
        plan::KernelTraits::PLAIN,
        Some(128),
        &mut |_| None,
    );
    assert_eq!(forced.len(), 7);
    for c in &forced {
        assert!(
            matches!(c.plan, LaunchPlan::Cluster { threads: 128, .. }),
            "{c:?}"
        );
        assert_eq!(c.resident_bytes(DType::Bf16), None);
        assert_eq!(c.mean_resident_bytes(8192, DType::Bf16), None);
    }
    let shape = plan::cluster_shape_by_residency(
        8192,
        128_256,
        DType::Bf16,
        limits,
        plan::KernelTraits::PLAIN,
        Some(128),
        &mut |_| None,
    );
    assert_eq!(shape, None, "no answer: the caller falls back");
}

#[test]
fn kernels_that_weigh_fewer_threads_add_a_candidate_per_size_where_the_chunk_takes_more() {
    let limits = DeviceLimits::H100;
    let cap = plan::KernelTraits {
        cluster_threads: &[256, 128],
        ..plan::KernelTraits::PLAIN
    };
    let shapes = |rows, vocab, traits, threads| -> Vec<(u32, u32)> {
        plan::cluster_candidates(
            rows,
            vocab,
            DType::Bf16,
            limits,
            traits,
            threads,
            &mut |_| None,
        )
        .iter()
        .map(|c| match c.plan {
            LaunchPlan::Cluster { size, threads, .. } => (size, threads),
            other => panic!("not a cluster plan: {other:?}"),
        })
        .collect()
    };
    let plain = shapes(8192, 128_256, plan::KernelTraits::PLAIN, None);
    let with_128 = shapes(8192, 128_256, cap, None);
    // Each size's own count and 256 as for the plain kernels, then 128.
    let mut want = Vec::new();
    for size in 2..=8 {
        want.extend(plain.iter().filter(|&&(s, _)| s == size));
        want.push((size, 128));
    }
    assert_eq!(with_128, want);
    // 32000 classes: from 4 CTAs a row, the chunk's own count is 128 or fewer, and nothing more
    // is weighed.
    let small = shapes(8192, 32_000, cap, None);
    let want = [
        (1, 512),
        (1, 256),
        (1, 128),
        (2, 256),
        (2, 128),
        (3, 192),
        (3, 128),
        (4, 128),
        (5, 128),
        (6, 96),
        (7, 96),
        (8, 64),
    ];
    assert_eq!(small, want);
    // A forced count is still the only one weighed.
    let forced = shapes(8192, 128_256, cap, Some(384));
    assert!(forced.iter().all(|&(_, t)| t == 384), "{forced:?}");
}

#[test]
fn without_an_occupancy_answer_or_with_few_rows_the_cluster_size_falls_back() {
    let limits = DeviceLimits::H100;
    for (rows, vocab) in [(8192, 128_256), (64, 128_256), (1, 262_144)] {
        let fallback = plan::plan(rows, vocab, DType::Bf16, limits, PlanChoice::Auto).unwrap();
        let unknown = plan::plan_with(
            rows,
            vocab,
            DType::Bf16,
            limits,
            PlanChoice::Auto,
            plan::KernelTraits::PLAIN,
            &mut |_| None,
        );
        assert_eq!(unknown.unwrap(), fallback, "{rows} x {vocab}, no answer");
        // 64 rows are fewer than one wave of clusters at every size: the grid limits them.
        if rows < 100 {
            let few = plan::plan_with(
                rows,
                vocab,
                DType::Bf16,
                limits,
                PlanChoice::Auto,
                plan::KernelTraits::PLAIN,
                &mut h200_active_clusters,
            );
            assert_eq!(few.unwrap(), fallback, "{rows} x {vocab}");
            let shape = plan::cluster_shape_by_residency(
                rows,
                vocab,
                DType::Bf16,
                limits,
                plan::KernelTraits::PLAIN,
                None,
                &mut h200_active_clusters,
            );
            assert_eq!(shape, None, "{rows} x {vocab}");
        }
    }
    // A forced size is kept whatever the device says.
    let forced = plan::plan_with(
        8192,
        128_256,
        DType::Bf16,
        limits,
        PlanChoice::Cluster {
            size: Some(8),
            threads: None,
        },
        plan::KernelTraits {
            keep: 0,
            ..plan::KernelTraits::PLAIN
        },
        &mut h200_active_clusters,
    );
    assert!(
        matches!(forced, Ok(LaunchPlan::Cluster { size: 8, .. })),
        "{forced:?}"
    );
}

#[test]
fn a_forced_cluster_thread_count_is_kept_and_a_bad_one_is_plan_does_not_fit() {
    let limits = DeviceLimits::H100;
    let auto = |size| {
        plan::plan(
            8192,
            128_256,
            DType::Bf16,
            limits,
            PlanChoice::Cluster {
                size,
                threads: None,
            },
        )
        .unwrap()
    };
    for size in [None, Some(4), Some(8)] {
        let LaunchPlan::Cluster {
            chunk_len,
            size: got_size,
            smem_bytes: _,
            threads: auto_threads,
        } = auto(size)
        else {
            panic!("not a cluster plan");
        };
        for threads in [32, 256, 384, 1024] {
            let choice = PlanChoice::Cluster {
                size,
                threads: Some(threads),
            };
            let got = plan::plan(8192, 128_256, DType::Bf16, limits, choice).unwrap();
            let smem_bytes = plan::cluster_smem_bytes(
                chunk_len as usize,
                DType::Bf16,
                threads,
                plan::CLUSTER_KEEP,
            )
            .unwrap();
            let want = LaunchPlan::Cluster {
                threads,
                chunk_len,
                size: got_size,
                smem_bytes,
            };
            assert_eq!(
                got, want,
                "size {size:?}, threads {threads} (auto {auto_threads})"
            );
        }
        for threads in [0, 48, 1056, 4096] {
            let choice = PlanChoice::Cluster {
                size,
                threads: Some(threads),
            };
            let got = plan::plan(8192, 128_256, DType::Bf16, limits, choice);
            assert!(
                matches!(got, Err(Error::PlanDoesNotFit(_))),
                "size {size:?}, threads {threads}: {got:?}"
            );
        }
    }
}

/// The 16-bit value nearest `value` (ties to even), by search among the neighbours of a guess:
/// the definition, independent of how `Element::from_f64` computes it.
fn nearest_16bit<T: Element>(value: f64, from_bits: fn(u16) -> T, to_bits: fn(T) -> u16) -> T {
    let guess = to_bits(T::from_f64(value));
    let candidates = [guess.wrapping_sub(1), guess, guess.wrapping_add(1)];
    let mut best = from_bits(guess);
    for bits in candidates {
        let candidate = from_bits(bits);
        let (d, best_d) = (
            (candidate.to_f64() - value).abs(),
            (best.to_f64() - value).abs(),
        );
        if d < best_d || (d == best_d && bits & 1 == 0) {
            best = candidate;
        }
    }
    best
}

#[test]
fn sixteen_bit_results_are_one_rounding_of_the_f64_value() {
    // Found by the Python tests: 0.05732727211579913 rounds to f16 0.05734 in one rounding, to
    // 0.0573 through f32; bf16 of 0.34863282227888703 is 0.349609, not 0.347656.
    assert_eq!(
        f16::from_f64_exact(0.05732727211579913),
        f16::from_f32(0.05734)
    );
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let value = f64::from_bits(state >> 12 | 0x3ff0_0000_0000_0000) - 1.5; // [-0.5, 0.5)
        let value = value * 2f64.powi((state % 38) as i32 - 24); // within f16's finite range
        let want = nearest_16bit(value, f16::from_bits, f16::to_bits);
        assert_eq!(
            f16::from_f64_exact(value).to_bits(),
            want.to_bits(),
            "f16 of {value:e}"
        );
        let want = nearest_16bit(value, bf16::from_bits, bf16::to_bits);
        assert_eq!(
            <bf16 as Element>::from_f64(value).to_bits(),
            want.to_bits(),
            "bf16 of {value:e}"
        );
    }
}

/// `Element::from_f64` for f16 by a name that does not collide with `half`'s inherent method.
trait FromF64Exact {
    fn from_f64_exact(value: f64) -> Self;
}

impl FromF64Exact for f16 {
    fn from_f64_exact(value: f64) -> Self {
        <f16 as Element>::from_f64(value)
    }
}

#[test]
fn a_failing_cases_message_shows_a_few_class_weights_and_their_count_not_all() {
    let mut case = xent_tests::Case::new(2, 1000);
    case.opts.weight = Some((0..1000).map(|j| j as f32 * 0.5).collect());
    let text = format!("{case:?}");
    assert!(
        text.contains("[0.0, 0.5, 1.0, 1.5, ...] (1000 values)"),
        "{text}"
    );
    assert!(text.len() < 800, "{} characters: {text}", text.len());
}

#[test]
fn small_calls_take_more_smaller_ctas_where_measured_faster() {
    let limits = DeviceLimits::H100;
    // A device that fits 1000 clusters of any launch: never a full wave of rows here, so the
    // residency rule does not answer and the small-call shapes apply.
    let auto = |rows: usize, vocab: usize, answer: Option<u32>| {
        plan::plan_with(
            rows,
            vocab,
            DType::Bf16,
            limits,
            PlanChoice::Auto,
            plan::KernelTraits::PLAIN,
            &mut |_| answer,
        )
        .unwrap()
    };
    let shape = |plan: LaunchPlan| match plan {
        LaunchPlan::Cluster { size, threads, .. } => (size, threads),
        other => panic!("expected a cluster plan, got {other:?}"),
    };
    let t = plan::SMALL_CALL_THREADS;
    for rows in 1..=plan::TINY_CALL_ROWS {
        assert_eq!(
            shape(auto(rows, LLAMA3_VOCAB, Some(1000))),
            (plan::MAX_FORCED_CLUSTER, t),
            "{rows} rows"
        );
        // Clusters of 16 only where the device says one fits.
        assert_eq!(
            shape(auto(rows, LLAMA3_VOCAB, None)),
            (plan::MAX_CLUSTER, 256)
        );
        assert_eq!(
            shape(auto(rows, LLAMA3_VOCAB, Some(0))),
            (plan::MAX_CLUSTER, 256)
        );
    }
    for rows in [8, 16] {
        assert_eq!(
            shape(auto(rows, LLAMA3_VOCAB, Some(1000))),
            (plan::MAX_CLUSTER, 256),
            "{rows} rows"
        );
    }
    for rows in plan::SMALL_CALL_ROWS {
        assert_eq!(
            shape(auto(rows, LLAMA3_VOCAB, Some(1000))),
            (plan::MAX_CLUSTER, t),
            "{rows} rows"
        );
        // Every row still counted by one thread of each CTA: the call takes one launch.
        assert!(plan::self_finish(
            rows,
            &auto(rows, LLAMA3_VOCAB, Some(1000)),
            &Options::default(),
            false
        ));
    }
    // Vocabularies whose fallback is not 8 CTAs of 256 threads keep it.
    for vocab in [32_000, 262_144] {
        let fallback = plan::plan(1, vocab, DType::Bf16, limits, PlanChoice::Auto).unwrap();
        assert_eq!(auto(1, vocab, Some(1000)), fallback, "1 x {vocab}");
        assert_ne!(shape(fallback).1, t, "1 x {vocab}");
    }
    // A forced thread count is kept.
    let forced = plan::plan_with(
        1,
        LLAMA3_VOCAB,
        DType::Bf16,
        limits,
        PlanChoice::Cluster {
            size: None,
            threads: Some(256),
        },
        plan::KernelTraits::PLAIN,
        &mut |_| Some(1000),
    )
    .unwrap();
    assert_eq!(shape(forced).1, 256);
}

#[test]
fn forced_clusters_go_up_to_the_non_portable_sixteen_and_no_further() {
    let limits = DeviceLimits::H100;
    let forced = |size| {
        plan::plan(
            4,
            LLAMA3_VOCAB,
            DType::Bf16,
            limits,
            PlanChoice::Cluster {
                size: Some(size),
                threads: None,
            },
        )
    };
    assert!(matches!(
        forced(16),
        Ok(LaunchPlan::Cluster { size: 16, .. })
    ));
    let err = forced(17).unwrap_err().to_string();
    assert!(err.contains("outside 1..=16"), "{err}");
    // Without clusters (an A100) no cluster plan is forced at all.
    let a100 = plan::plan(
        4,
        LLAMA3_VOCAB,
        DType::Bf16,
        DeviceLimits::A100,
        PlanChoice::Cluster {
            size: Some(2),
            threads: None,
        },
    );
    assert!(a100.is_err());
}

/// The small-call kernels (`plan::small_kernel`) take cluster plans of at most 64 rows of the
/// plain loss that take one launch, and nothing else: not a loss option that changes the kernel,
/// not 65 rows, not a fused, chunked or split plan.
#[test]
fn small_call_kernels_take_plain_cluster_calls_of_at_most_64_rows() {
    let limits = DeviceLimits::H100;
    let plain = Options::default();
    let cluster =
        |rows| plan::plan(rows, LLAMA3_VOCAB, DType::Bf16, limits, PlanChoice::Auto).unwrap();
    for rows in [1, 2, 8, 32, 33, 64] {
        let made = cluster(rows);
        assert!(
            matches!(made, LaunchPlan::Cluster { .. }),
            "{rows} rows: {made:?}"
        );
        assert!(
            plan::small_kernel(rows, &made, &plain, false),
            "{rows} rows"
        );
        // Reductions, grad_scale, the shift and ignore_index keep the plain kernels.
        for opts in [
            Options {
                reduction: Reduction::Sum,
                grad_scale: 0.5,
                ..plain.clone()
            },
            Options {
                causal_shift: true,
                ignore_index: 3,
                ..plain.clone()
            },
        ] {
            assert!(
                plan::small_kernel(rows, &made, &opts, false),
                "{rows} rows, {opts:?}"
            );
        }
        for opts in [
            Options {
                label_smoothing: 0.1,
                ..plain.clone()
            },
            Options {
                lse_square_scale: 1e-4,
                ..plain.clone()
            },
            Options {
                softcap: Some(30.0),
                ..plain.clone()
            },
            Options {
                return_token_accuracy: true,
                ..plain.clone()
            },
        ] {
            assert!(
                !plan::small_kernel(rows, &made, &opts, false),
                "{rows} rows, {opts:?}"
            );
        }
        assert!(
            !plan::small_kernel(rows, &made, &plain, true),
            "{rows} rows, class weights"
        );
    }
    assert!(
        !plan::small_kernel(65, &cluster(65), &plain, false),
        "65 rows"
    );
    let fused = plan::plan(4, 1000, DType::Bf16, limits, PlanChoice::Fused).unwrap();
    assert!(matches!(fused, LaunchPlan::Fused { .. }), "{fused:?}");
    assert!(!plan::small_kernel(4, &fused, &plain, false), "fused");
    let chunked = plan::plan(
        4,
        1000,
        DType::Bf16,
        limits,
        PlanChoice::Chunked { chunk_len: None },
    )
    .unwrap();
    assert!(
        !plan::small_kernel(4, &chunked, &plain, false),
        "chunked: {chunked:?}"
    );
    let a100 = plan::plan(
        4,
        LLAMA3_VOCAB,
        DType::Bf16,
        DeviceLimits::A100,
        PlanChoice::Auto,
    )
    .unwrap();
    assert!(
        !plan::small_kernel(4, &a100, &plain, false),
        "A100: {a100:?}"
    );
}
