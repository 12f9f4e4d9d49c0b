//! The loss options of issue 4 on the CPU reference (`xent::cpu`, the GPU tests' oracle):
//! `label_smoothing` (PyTorch), `lse_square_scale` (z-loss, Liger / PaLM), `softcap` (Gemma 2),
//! class `weight` (PyTorch) and `return_token_accuracy` (Liger).
//!
//! - Each option alone and in pairs, against values written out here from first principles on
//!   3-class rows.
//! - Every combination, dtype, label type, reduction, the causal shift and row strides against
//!   a second f64 implementation written here in another form: the weighted soft-target
//!   cross-entropy `-Σ_j w_j·q_j·log p_j` with `q = (1 - ε)·onehot + ε/V`, whose gradient is
//!   `(Σ_j w_j q_j)·p - w·q`.
//! - The gradient against a central finite difference of the reference's own loss.
//! - Validation: values out of range are `Error::InvalidOption` naming the option, on the CPU
//!   and on the GPU.
//! - The GPU kernels (`*_opt_*`) against the reference: each option alone, every pair and all
//!   five, for every dtype, label type and plan, with row strides, the causal shift and every
//!   reduction, including the z-loss part and the token accuracy.
//!
//! Logits are small multiples of 1/4, exact in every element type, so each expected value is the
//! exact math of the very inputs the reference sees.

use xent::half::{bf16, f16};
use xent::{DType, Element, Error, Label, Options, Reduction, Shape, cpu, plan};
use xent_tests::{
    Case, DTYPES, assert_no_failures, check_entropy, run_case_dtype, subnormal_step, unit_roundoff,
};

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// Two f64 computations of the same values (different summation order and arrangement, `exp` /
/// `ln` / `tanh` to their last bit) agree to this, relative to values of order 1..100.
const F64_TOL: f64 = 1e-12;

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

/// Logits of type `T`; each value must be exact in `T`.
fn logits<T: Element>(values: &[f64]) -> Vec<T> {
    values
        .iter()
        .map(|&v| {
            let x = T::from_f64(v);
            assert_eq!(x.to_f64(), v, "input {v} is not exact in {:?}", T::DTYPE);
            x
        })
        .collect()
}

fn labels<L: Label + From<i32>>(values: &[i32]) -> Vec<L> {
    values.iter().map(|&v| L::from(v)).collect()
}

fn widen<T: Element>(values: &[T]) -> Vec<f64> {
    values.iter().map(|x| x.to_f64()).collect()
}

fn exp_sum(row: &[f64]) -> f64 {
    row.iter().map(|x| x.exp()).sum()
}

/// `ln Σ e^x`, without the max shift: the rows here are small.
fn ln_sum_exp(row: &[f64]) -> f64 {
    exp_sum(row).ln()
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let total = exp_sum(row);
    row.iter().map(|x| x.exp() / total).collect()
}

#[track_caller]
fn assert_close(what: &str, got: f64, expected: f64, tol: f64) {
    let same_nan = got.is_nan() && expected.is_nan();
    assert!(
        same_nan || (got - expected).abs() <= tol,
        "{what}: got {got}, expected {expected} (difference {:e}, tolerance {tol:e})",
        (got - expected).abs()
    );
}

#[track_caller]
fn assert_all_close(what: &str, got: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        assert_close(&format!("{what}[{i}]"), g, e, tol * (1.0 + e.abs()));
    }
}

/// Checks a gradient of type `T` (rows `row_stride` apart) against exact f64 rows: each element
/// is the exact value rounded once to `T`, the exact value known to `F64_TOL`.
#[track_caller]
fn assert_grad_rounded<T: Element>(got: &[T], row_stride: usize, expected: &[Vec<f64>]) {
    let dtype = T::DTYPE;
    for (r, row) in expected.iter().enumerate() {
        for (j, &e) in row.iter().enumerate() {
            let g = got[r * row_stride + j].to_f64();
            let tol = unit_roundoff(dtype) * e.abs() + F64_TOL + subnormal_step(dtype) / 2.0;
            assert_close(&format!("{} gradient[{r}][{j}]", dtype.name()), g, e, tol);
        }
    }
}

/// Runs the reference on contiguous f32 rows (the common case of the hand-checked tests).
#[track_caller]
fn run_f32(rows: &[Vec<f64>], label_values: &[i32], options: &Options) -> (cpu::CpuLoss, Vec<f32>) {
    let vocab = rows[0].len();
    let mut data: Vec<f32> = logits(&rows.concat());
    let got = cpu::forward_backward(
        &mut data,
        &labels::<i64>(label_values),
        Shape::flat(rows.len(), vocab),
        options,
    )
    .expect("valid input");
    (got, data)
}

fn with(reduction: Reduction) -> Options {
    Options {
        reduction,
        ..Options::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The test's own reference: PyTorch's weighted soft-target form.
// ---------------------------------------------------------------------------------------------

/// What a call must produce.
#[derive(Debug)]
struct Want {
    loss: f64,
    row_loss: Vec<f64>,
    row_lse: Vec<f64>,
    n_valid: usize,
    z_loss: f64,
    total_weight: f64,
    row_correct: Vec<bool>,
    /// One gradient row per logit row.
    grad: Vec<Vec<f64>>,
}

/// Index of the first maximal value (`torch.argmax`), for rows without NaN.
fn first_argmax(row: &[f64]) -> usize {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    row.iter().position(|&x| x == max).unwrap()
}

/// Loss and gradient of `rows` scored against `targets` (`None`: not scored) under `opts`,
/// written as a soft-target cross-entropy: with `y` the (soft-capped) logits, `p = softmax(y)`,
/// `a_j = w_j·((1 - ε)·[j == c] + ε/V)`: `ce = -Σ_j a_j·ln p_j`, `d ce / d y = (Σ_j a_j)·p - a`;
/// z-loss `s·lse²` with gradient `2·s·lse·p`; chain rule `dy/dx = 1 - tanh²(x / cap)`.
fn reference(rows: &[Vec<f64>], targets: &[Option<usize>], opts: &Options) -> Want {
    let vocab = rows[0].len();
    let eps = opts.label_smoothing as f64;
    let s = opts.lse_square_scale as f64;
    let w: Vec<f64> = match &opts.weight {
        Some(w) => w.iter().map(|&x| x as f64).collect(),
        None => vec![1.0; vocab],
    };
    let n_valid = targets.iter().flatten().count();
    let total_weight: f64 = targets.iter().flatten().map(|&c| w[c]).sum();
    let g = opts.grad_scale as f64;
    let (ce_scale, z_scale) = match opts.reduction {
        Reduction::Mean => (g / total_weight, g / n_valid as f64),
        Reduction::Sum | Reduction::None => (g, g),
    };
    let mut want = Want {
        loss: 0.0,
        row_loss: vec![],
        row_lse: vec![],
        n_valid,
        z_loss: 0.0,
        total_weight,
        row_correct: vec![],
        grad: vec![],
    };
    let (mut ce_sum, mut z_sum) = (0.0, 0.0);
    for (row, target) in rows.iter().zip(targets) {
        let Some(c) = *target else {
            want.row_loss.push(0.0);
            want.row_lse.push(0.0);
            want.row_correct.push(false);
            want.grad.push(vec![0.0; vocab]);
            continue;
        };
        let (y, dy_dx): (Vec<f64>, Vec<f64>) = row
            .iter()
            .map(|&x| match opts.softcap {
                Some(cap) => {
                    let cap = cap as f64;
                    let t = (x / cap).tanh();
                    (cap * t, 1.0 - t * t)
                }
                None => (x, 1.0),
            })
            .unzip();
        let lse = ln_sum_exp(&y);
        let p = softmax(&y);
        let a: Vec<f64> = (0..vocab)
            .map(|j| w[j] * ((1.0 - eps) * f64::from(j == c) + eps / vocab as f64))
            .collect();
        let a_sum: f64 = a.iter().sum();
        let ce: f64 = -(0..vocab).map(|j| a[j] * (y[j] - lse)).sum::<f64>();
        let z = s * lse * lse;
        ce_sum += ce;
        z_sum += z;
        want.row_loss.push(ce + z);
        want.row_lse.push(lse);
        want.row_correct.push(first_argmax(row) == c);
        want.grad.push(
            (0..vocab)
                .map(|j| {
                    ((a_sum * p[j] - a[j]) * ce_scale + 2.0 * s * lse * p[j] * z_scale) * dy_dx[j]
                })
                .collect(),
        );
    }
    let (ce_loss, z_loss) = match opts.reduction {
        Reduction::Mean => (ce_sum / total_weight, z_sum / n_valid as f64),
        Reduction::Sum | Reduction::None => (ce_sum, z_sum),
    };
    want.z_loss = if s == 0.0 { 0.0 } else { z_loss };
    want.loss = ce_loss + want.z_loss;
    want
}

/// Checks every output of a call against `want`.
#[track_caller]
fn assert_matches(got: &cpu::CpuLoss, want: &Want, opts: &Options) {
    assert_eq!(got.n_valid, want.n_valid, "n_valid");
    assert_close(
        "loss",
        got.loss,
        want.loss,
        F64_TOL * (1.0 + want.loss.abs()),
    );
    assert_close(
        "z_loss",
        got.z_loss,
        want.z_loss,
        F64_TOL * (1.0 + want.z_loss.abs()),
    );
    assert_close("total_weight", got.total_weight, want.total_weight, F64_TOL);
    assert_all_close("row_loss", &got.row_loss, &want.row_loss, F64_TOL);
    assert_all_close("row_lse", &got.row_lse, &want.row_lse, F64_TOL);
    if opts.return_token_accuracy {
        assert_eq!(
            got.row_correct.as_ref(),
            Some(&want.row_correct),
            "row_correct"
        );
        let hits = want.row_correct.iter().filter(|&&c| c).count();
        let accuracy = got.accuracy.expect("accuracy requested");
        assert_close("accuracy", accuracy, hits as f64 / want.n_valid as f64, 0.0);
    } else {
        assert_eq!(got.row_correct, None, "row_correct without the flag");
        assert_eq!(got.accuracy, None, "accuracy without the flag");
    }
}

/// The targets of `labels` as the options define them, written out again: position `t` of a
/// sequence is scored against label `t + 1` of the same sequence under the causal shift (the
/// last position against nothing); `ignore_index` scores nothing.
fn targets_of(label_values: &[i32], shape: Shape, opts: &Options) -> Vec<Option<usize>> {
    (0..shape.rows())
        .map(|r| {
            let index = if opts.causal_shift {
                if (r + 1) % shape.seq_len == 0 {
                    return None;
                }
                r + 1
            } else {
                r
            };
            let label = label_values[index] as i64;
            (label != opts.ignore_index).then_some(label as usize)
        })
        .collect()
}

/// The options of issue 4, each on: label smoothing, z-loss, soft cap, class weights for
/// `vocab` classes, token accuracy.
fn option_sets(vocab: usize) -> Vec<(String, Options)> {
    let weight: Vec<f32> = (0..vocab)
        .map(|j| [0.5, 2.0, 1.0, 0.25, 3.0][j % 5])
        .collect();
    let mut sets = Vec::new();
    for mask in 0u32..32 {
        let on = |bit: u32| mask & (1 << bit) != 0;
        let opts = Options {
            label_smoothing: if on(0) { 0.2 } else { 0.0 },
            lse_square_scale: if on(1) { 0.05 } else { 0.0 },
            softcap: on(2).then_some(2.5),
            weight: on(3).then(|| weight.clone()),
            return_token_accuracy: on(4),
            ..Options::default()
        };
        let names = ["smoothing", "z", "softcap", "weight", "accuracy"];
        let name: Vec<&str> = (0..5)
            .filter(|&b| on(b))
            .map(|b| names[b as usize])
            .collect();
        sets.push((format!("[{}]", name.join("+")), opts));
    }
    sets
}

// ---------------------------------------------------------------------------------------------
// Defaults: every new option off, the seed's results unchanged.
// ---------------------------------------------------------------------------------------------

#[test]
fn new_options_default_to_off() {
    let opts = Options::default();
    assert_eq!(opts.label_smoothing, 0.0);
    assert_eq!(opts.lse_square_scale, 0.0);
    assert_eq!(opts.softcap, None);
    assert_eq!(opts.weight, None);
    assert!(!opts.return_token_accuracy);
}

#[test]
fn with_options_off_the_new_outputs_are_neutral_and_unit_weights_change_nothing() {
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    for reduction in REDUCTIONS {
        let (plain, plain_grad) = run_f32(&rows, &[2, -100, 0], &with(reduction));
        assert_eq!(plain.z_loss, 0.0);
        assert_eq!(plain.total_weight, 2.0, "n_valid without weights");
        assert_eq!(plain.row_correct, None);
        assert_eq!(plain.accuracy, None);
        // Weights of 1 are PyTorch's `weight=None`, bit for bit.
        let unit = Options {
            weight: Some(vec![1.0; 3]),
            ..with(reduction)
        };
        let (weighted, weighted_grad) = run_f32(&rows, &[2, -100, 0], &unit);
        assert_eq!(weighted, plain, "{reduction:?}");
        assert_eq!(weighted_grad, plain_grad, "{reduction:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Each option alone, hand-checked.
// ---------------------------------------------------------------------------------------------

#[test]
fn label_smoothing_loss_is_one_minus_eps_nll_plus_eps_times_lse_minus_mean_logit() {
    // Row [1, 2, 3] against class 0, ε = 1/4 (exact in f32): the target distribution is
    // [3/4 + 1/12, 1/12, 1/12]; loss = (3/4)(lse - 1) + (1/4)(lse - mean x) with mean x = 2;
    // gradient = softmax - (3/4)·onehot - 1/12.
    let eps = 0.25;
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let loss = (1.0 - eps) * (lse - 1.0) + eps * (lse - 2.0);
    let p = softmax(&[1.0, 2.0, 3.0]);
    let grad = vec![p[0] - 0.75 - eps / 3.0, p[1] - eps / 3.0, p[2] - eps / 3.0];
    for reduction in REDUCTIONS {
        let opts = Options {
            label_smoothing: eps as f32,
            ..with(reduction)
        };
        let (got, data) = run_f32(&[vec![1.0, 2.0, 3.0]], &[0], &opts);
        assert_close("loss", got.loss, loss, F64_TOL);
        assert_all_close("row_loss", &got.row_loss, &[loss], F64_TOL);
        assert_all_close("row_lse", &got.row_lse, &[lse], F64_TOL);
        // One scored row: the mean divides by 1.
        assert_grad_rounded(&data, 3, std::slice::from_ref(&grad));
    }
}

#[test]
fn label_smoothing_of_one_scores_against_the_uniform_distribution_whatever_the_label() {
    // ε = 1: loss = lse - mean x, gradient = softmax - 1/V, the same for every label.
    let row = [0.5, -1.0, 2.0];
    let lse = ln_sum_exp(&row);
    let p = softmax(&row);
    let grad: Vec<f64> = p.iter().map(|p| p - 1.0 / 3.0).collect();
    for label in 0..3 {
        let opts = Options {
            label_smoothing: 1.0,
            ..Options::default()
        };
        let (got, data) = run_f32(&[row.to_vec()], &[label], &opts);
        assert_close("loss", got.loss, lse - 0.5, F64_TOL);
        assert_grad_rounded(&data, 3, std::slice::from_ref(&grad));
    }
}

#[test]
fn z_loss_adds_scale_times_lse_squared_per_scored_row_and_is_reported_on_its_own() {
    // Rows [1, 2, 3] (class 2), ignored, [0.5, -1, 2] (class 0); s = 1/8.
    let s = 0.125;
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![9.0, 9.0, 9.0],
        vec![0.5, -1.0, 2.0],
    ];
    let (lse0, lse2) = (ln_sum_exp(&rows[0]), ln_sum_exp(&rows[2]));
    let (nll0, nll2) = (lse0 - 3.0, lse2 - 0.5);
    let (z0, z2) = (s * lse0 * lse0, s * lse2 * lse2);
    let (p0, p2) = (softmax(&rows[0]), softmax(&rows[2]));
    for reduction in REDUCTIONS {
        let opts = Options {
            lse_square_scale: s as f32,
            ..with(reduction)
        };
        let (got, data) = run_f32(&rows, &[2, -100, 0], &opts);
        let n = if reduction == Reduction::Mean {
            2.0
        } else {
            1.0
        };
        assert_close("loss", got.loss, (nll0 + nll2 + z0 + z2) / n, F64_TOL);
        assert_close("z_loss", got.z_loss, (z0 + z2) / n, F64_TOL);
        assert_all_close(
            "row_loss",
            &got.row_loss,
            &[nll0 + z0, 0.0, nll2 + z2],
            F64_TOL,
        );
        assert_all_close("row_lse", &got.row_lse, &[lse0, 0.0, lse2], F64_TOL);
        // d/dx (s·lse²) = 2·s·lse·softmax.
        let grad = |p: &[f64], lse: f64, class: usize| -> Vec<f64> {
            (0..3)
                .map(|j| (p[j] - f64::from(j == class) + 2.0 * s * lse * p[j]) / n)
                .collect()
        };
        assert_grad_rounded(
            &data,
            3,
            &[grad(&p0, lse0, 2), vec![0.0; 3], grad(&p2, lse2, 0)],
        );
    }
}

#[test]
fn softcap_replaces_logits_by_cap_tanh_and_the_gradient_flows_through_the_tanh() {
    // Row [1, -2, 4] against class 2 with cap 2: y = 2·tanh(x / 2).
    let cap = 2.0;
    let x = [1.0, -2.0, 4.0];
    let y: Vec<f64> = x.iter().map(|x: &f64| cap * (x / cap).tanh()).collect();
    let lse = ln_sum_exp(&y);
    let p = softmax(&y);
    let grad: Vec<f64> = (0..3)
        .map(|j| (p[j] - f64::from(j == 2)) * (1.0 - (x[j] / cap).tanh().powi(2)))
        .collect();
    for reduction in REDUCTIONS {
        let opts = Options {
            softcap: Some(cap as f32),
            ..with(reduction)
        };
        let (got, data) = run_f32(&[x.to_vec()], &[2], &opts);
        assert_close("loss", got.loss, lse - y[2], F64_TOL);
        assert_all_close("row_lse", &got.row_lse, &[lse], F64_TOL);
        assert_grad_rounded(&data, 3, std::slice::from_ref(&grad));
    }
}

#[test]
fn class_weights_scale_row_losses_and_the_mean_divides_by_the_scored_targets_weights() {
    // w = [1/2, 2, 3]; rows against classes 1, (ignored), 0, 2. The ignored row's label would
    // be class 2: its weight must not enter the divisor.
    let w = [0.5, 2.0, 3.0];
    let rows = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.0, 0.0, 0.0],
        vec![0.5, -1.0, 2.0],
        vec![4.0, 0.0, -4.0],
    ];
    let classes = [Some(1), None, Some(0), Some(2)];
    let nll: Vec<f64> = rows
        .iter()
        .zip(&classes)
        .map(|(row, c)| c.map_or(0.0, |c| ln_sum_exp(row) - row[c]))
        .collect();
    let row_loss = [2.0 * nll[0], 0.0, 0.5 * nll[2], 3.0 * nll[3]];
    let total_weight = 2.0 + 0.5 + 3.0;
    for reduction in REDUCTIONS {
        let opts = Options {
            weight: Some(w.map(|w| w as f32).to_vec()),
            ..with(reduction)
        };
        let (got, data) = run_f32(&rows, &[1, -100, 0, 2], &opts);
        let sum: f64 = row_loss.iter().sum();
        let divisor = if reduction == Reduction::Mean {
            total_weight
        } else {
            1.0
        };
        assert_close("loss", got.loss, sum / divisor, F64_TOL);
        assert_close("total_weight", got.total_weight, total_weight, 0.0);
        assert_eq!(got.n_valid, 3);
        assert_all_close("row_loss", &got.row_loss, &row_loss, F64_TOL);
        // Gradient: w_c·(softmax - onehot), over Σ w_c for the mean.
        let grad: Vec<Vec<f64>> = rows
            .iter()
            .zip(&classes)
            .map(|(row, c)| match *c {
                None => vec![0.0; 3],
                Some(c) => softmax(row)
                    .iter()
                    .enumerate()
                    .map(|(j, p)| w[c] * (p - f64::from(j == c)) / divisor)
                    .collect(),
            })
            .collect();
        assert_grad_rounded(&data, 3, &grad);
    }
}

#[test]
fn token_accuracy_compares_the_first_maximal_logit_with_the_label() {
    // Row 0 ties classes 1 and 2: the first (1) is the prediction, as torch.argmax.
    let rows = vec![
        vec![2.0, 5.0, 5.0],
        vec![2.0, 5.0, 5.0],
        vec![-1.0, -3.0, -2.0],
        vec![7.0, 1.0, 0.0],
        vec![0.0, 1.0, 0.0],
    ];
    // Labels: 1 (right), 2 (wrong: tie goes to 1), 0 (right), ignored (its argmax 0 is not
    // counted), 2 (wrong).
    let label_values = [1, 2, 0, -100, 2];
    for reduction in REDUCTIONS {
        let opts = Options {
            return_token_accuracy: true,
            ..with(reduction)
        };
        let (got, _) = run_f32(&rows, &label_values, &opts);
        assert_eq!(
            got.row_correct,
            Some(vec![true, false, true, false, false]),
            "{reduction:?}"
        );
        assert_eq!(
            got.accuracy,
            Some(2.0 / 4.0),
            "{reduction:?}: 2 of 4 scored rows"
        );
        // The loss and gradient do not depend on the flag.
        let (plain, _) = run_f32(&rows, &label_values, &with(reduction));
        assert_eq!(got.loss, plain.loss);
    }
    // Over no scored rows the accuracy is 0/0.
    let opts = Options {
        return_token_accuracy: true,
        ..Options::default()
    };
    let (got, _) = run_f32(&rows[..1], &[-100], &opts);
    assert_eq!(got.row_correct, Some(vec![false]));
    assert!(got.accuracy.unwrap().is_nan(), "{:?}", got.accuracy);
}

#[test]
fn predicted_tokens_are_each_scored_rows_first_maximal_logit() {
    // Ties go to the first (row 0: classes 1 and 2); a NaN is the maximum, the first NaN (row 1);
    // every logit -inf gives class 0 (row 2); an ignored row gives -1 (row 3); the soft cap (which
    // keeps the order) and the label change nothing.
    let inf = f64::INFINITY;
    let rows = [
        vec![2.0, 5.0, 5.0, -1.0],
        vec![2.0, f64::NAN, 9.0, f64::NAN],
        vec![-inf, -inf, -inf, -inf],
        vec![7.0, 1.0, 0.0, 3.0],
        vec![0.0, 1.0, 0.0, 1.5],
    ];
    let logits: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    let labels: Vec<i64> = vec![1, 2, 0, -100, 2];
    let run = |opts: &Options| {
        let mut data = logits.clone();
        cpu::forward_backward(&mut data, &labels, Shape::flat(5, 4), opts).unwrap()
    };
    for softcap in [None, Some(2.0)] {
        for reduction in REDUCTIONS {
            let plain = Options {
                softcap,
                ..with(reduction)
            };
            let got = run(&Options {
                return_predicted_tokens: true,
                ..plain.clone()
            });
            let want = vec![1, 1, 0, -1, 3];
            assert_eq!(
                got.predicted_tokens,
                Some(want),
                "{reduction:?} {softcap:?}"
            );
            let plain = run(&plain);
            assert_eq!(plain.predicted_tokens, None);
            assert_eq!(got.row_loss.len(), plain.row_loss.len());
            for (a, b) in got.row_loss.iter().zip(&plain.row_loss) {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "the loss does not change: {a} {b}"
                );
            }
        }
    }
    // Under the causal shift the last position of each sequence is not scored.
    let opts = Options {
        return_predicted_tokens: true,
        causal_shift: true,
        ..Options::default()
    };
    let labels: Vec<i64> = vec![0, 1, 2, 3, 1, 0];
    let mut grad = [logits.clone(), vec![0.0, 0.0, 4.0, 0.0]].concat();
    let got = cpu::forward_backward(&mut grad, &labels, Shape::batched(2, 3, 4), &opts).unwrap();
    assert_eq!(got.predicted_tokens, Some(vec![1, 1, -1, 0, 3, -1]));
}

#[test]
fn entropy_is_minus_sum_p_ln_p_of_each_scored_rows_softmax() {
    // Uniform rows (ln V), a peaked row (about 0), -inf logits (no mass, no NaN), a NaN (NaN),
    // an ignored row (0); with the soft cap, the entropy of the capped logits. The loss does not
    // change.
    let inf = f64::INFINITY;
    let rows = [
        vec![3.0, 3.0, 3.0, 3.0],
        vec![0.0, 60.0, 1.0, -2.0],
        vec![1.0, -inf, 2.0, -inf],
        vec![2.0, f64::NAN, 9.0, 1.0],
        vec![7.0, 1.0, 0.0, 3.0],
        vec![0.5, -1.0, 2.0, 1.5],
    ];
    let logits: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    let labels: Vec<i64> = vec![1, 2, 0, 3, -100, 2];
    let run = |opts: &Options| {
        let mut data = logits.clone();
        cpu::forward_backward(&mut data, &labels, Shape::flat(6, 4), opts).unwrap()
    };
    for softcap in [None, Some(2.0)] {
        for reduction in REDUCTIONS {
            let plain = Options {
                softcap,
                ..with(reduction)
            };
            let got = run(&Options {
                return_entropy: true,
                ..plain.clone()
            });
            let entropy = got.entropy.clone().expect("asked for");
            for (r, row) in rows.iter().enumerate() {
                let want = if labels[r] == -100 {
                    0.0
                } else {
                    let capped: Vec<f64> = row
                        .iter()
                        .map(|&x| softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh()))
                        .collect();
                    softmax(&capped)
                        .iter()
                        .map(|&p| match p {
                            p if p > 0.0 => -p * p.ln(),
                            p if p.is_nan() => f64::NAN,
                            _ => 0.0,
                        })
                        .sum()
                };
                let ok =
                    (want.is_nan() && entropy[r].is_nan()) || (entropy[r] - want).abs() <= 1e-12;
                assert!(
                    ok,
                    "{reduction:?} {softcap:?} row {r}: {} != {want}",
                    entropy[r]
                );
            }
            if softcap.is_none() {
                assert!((entropy[0] - 4f64.ln()).abs() < 1e-12 && entropy[1] < 1e-20);
                assert!(entropy[2] > 0.0 && entropy[3].is_nan());
            }
            let plain = run(&plain);
            assert_eq!(plain.entropy, None);
            for (a, b) in got.row_loss.iter().zip(&plain.row_loss) {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "the loss does not change: {a} {b}"
                );
            }
        }
    }
    // Under the causal shift the last position of each sequence is not scored.
    let opts = Options {
        return_entropy: true,
        causal_shift: true,
        ..Options::default()
    };
    let mut data = logits.clone();
    let got = cpu::forward_backward(
        &mut data,
        &[0i64, 1, 2, 3, 1, 0],
        Shape::batched(2, 3, 4),
        &opts,
    )
    .unwrap()
    .entropy
    .unwrap();
    assert!(got[2] == 0.0 && got[5] == 0.0 && got[0] > 1.38 && got[4] > 0.0);
}

#[test]
fn entropy_gradient_is_the_derivative_of_the_entropy_and_adds_to_the_loss_gradient() {
    // `cpu::forward_backward_entropy` with a loss upstream of 0 against a central finite
    // difference of the reference's own entropies (f64, per row: `Σ_r e_r·H_r`), with and without
    // the soft cap, an ignored row and a row with -inf logits; then with an upstream for the loss
    // too, the sum of the two gradients.
    let inf = f32::NEG_INFINITY;
    let logits: Vec<f32> = vec![
        0.5, -1.0, 2.0, 1.5, 0.25, //
        3.0, 3.0, 3.0, 3.0, 3.0, //
        1.0, inf, 2.0, inf, -0.5, //
        7.0, 1.0, 0.0, 3.0, -2.0, //
        -3.0, 4.0, 0.0, 0.75, 1.25,
    ];
    let labels: Vec<i64> = vec![2, 0, 4, -100, 1];
    let shape = Shape::flat(5, 5);
    let e_up: Vec<f32> = vec![0.75, -1.5, 2.0, 3.0, -0.5];
    for softcap in [None, Some(2.5f32)] {
        for reduction in REDUCTIONS {
            let opts = Options {
                softcap,
                label_smoothing: 0.1,
                lse_square_scale: 1e-2,
                return_entropy: true,
                ..with(reduction)
            };
            let entropies = |x: &[f64]| -> Vec<f64> {
                let mut data = x.to_vec();
                cpu::forward_backward_upstream(&mut data, &labels, shape, &opts, &[1.0])
                    .unwrap()
                    .entropy
                    .unwrap()
            };
            let x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
            let mut grad = x.clone();
            let got = cpu::forward_backward_entropy(
                &mut grad,
                &labels,
                shape,
                &opts,
                &[0.0],
                Some(&e_up),
            )
            .unwrap();
            assert_eq!(
                got.entropy.unwrap(),
                entropies(&x),
                "the entropies do not change"
            );
            let h = 1e-6;
            for i in 0..x.len() {
                let (r, j) = (i / 5, i % 5);
                if x[i].is_infinite() {
                    assert_eq!(
                        grad[i], 0.0,
                        "{softcap:?} {reduction:?} row {r} class {j}: no mass"
                    );
                    continue;
                }
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                let (hu, hd) = (entropies(&up), entropies(&down));
                let want: f64 = (0..5)
                    .map(|q| e_up[q] as f64 * (hu[q] - hd[q]) / (2.0 * h))
                    .sum();
                assert!(
                    (grad[i] - want).abs() <= 1e-7 * (1.0 + want.abs()),
                    "{softcap:?} {reduction:?} row {r} class {j}: {} against {want}",
                    grad[i]
                );
                if labels[r] == -100 {
                    assert_eq!(grad[i], 0.0, "an ignored row gets no gradient");
                }
            }
            // With the loss's upstream too: the two gradients add.
            let upstream: Vec<f32> = if reduction == Reduction::None {
                vec![0.5, -2.0, 1.0, 4.0, 1.5]
            } else {
                vec![0.5]
            };
            let mut both = x.clone();
            cpu::forward_backward_entropy(&mut both, &labels, shape, &opts, &upstream, Some(&e_up))
                .unwrap();
            let mut loss_only = x.clone();
            cpu::forward_backward_upstream(&mut loss_only, &labels, shape, &opts, &upstream)
                .unwrap();
            for i in 0..x.len() {
                let want = loss_only[i] + grad[i];
                assert!((both[i] - want).abs() <= F64_TOL * (1.0 + want.abs()));
            }
        }
    }
    // One value a row: a shorter upstream is refused.
    let mut data = logits.clone();
    let err = cpu::forward_backward_entropy(
        &mut data,
        &labels,
        shape,
        &Options::default(),
        &[1.0],
        Some(&[1.0; 4]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Pairs of options, hand-checked.
// ---------------------------------------------------------------------------------------------

#[test]
fn label_smoothing_with_class_weights_follows_pytorch_weighting_each_class_in_the_smoothing_term() {
    // PyTorch (`cross_entropy_loss_label_smoothing`): row loss
    // (1 - ε)·w_c·(lse - x_c) + (ε/V)·Σ_j w_j·(lse - x_j); the mean divides by Σ w_c of the
    // scored rows. Rows [1, 2, 3] (class 2) and [0.5, -1, 2] (class 0), w = [1/2, 2, 3], ε = 1/4.
    let (eps, w) = (0.25, [0.5, 2.0, 3.0]);
    let rows = vec![vec![1.0, 2.0, 3.0], vec![0.5, -1.0, 2.0]];
    let classes = [2, 0];
    let row_loss: Vec<f64> = rows
        .iter()
        .zip(classes)
        .map(|(x, c)| {
            let lse = ln_sum_exp(x);
            let smooth: f64 = (0..3).map(|j| w[j] * (lse - x[j])).sum();
            (1.0 - eps) * w[c] * (lse - x[c]) + eps / 3.0 * smooth
        })
        .collect();
    let total_weight = w[2] + w[0];
    let weight_sum: f64 = w.iter().sum();
    for reduction in REDUCTIONS {
        let opts = Options {
            label_smoothing: eps as f32,
            weight: Some(w.map(|w| w as f32).to_vec()),
            ..with(reduction)
        };
        let (got, data) = run_f32(&rows, &[2, 0], &opts);
        let divisor = if reduction == Reduction::Mean {
            total_weight
        } else {
            1.0
        };
        assert_close(
            "loss",
            got.loss,
            (row_loss[0] + row_loss[1]) / divisor,
            F64_TOL,
        );
        assert_all_close("row_loss", &got.row_loss, &row_loss, F64_TOL);
        // Gradient: (1 - ε)·w_c·(p - onehot) + (ε/V)·(W·p - w), W = Σ_j w_j.
        let grad: Vec<Vec<f64>> = rows
            .iter()
            .zip(classes)
            .map(|(x, c)| {
                let p = softmax(x);
                (0..3)
                    .map(|j| {
                        ((1.0 - eps) * w[c] * (p[j] - f64::from(j == c))
                            + eps / 3.0 * (weight_sum * p[j] - w[j]))
                            / divisor
                    })
                    .collect()
            })
            .collect();
        assert_grad_rounded(&data, 3, &grad);
    }
}

#[test]
fn z_loss_with_class_weights_is_not_weighted_and_its_mean_divides_by_the_scored_row_count() {
    // As Liger: mean = Σ w_c·nll / Σ w_c + Σ s·lse² / n_valid.
    let (s, w) = (0.5, [0.5, 2.0, 3.0]);
    let rows = vec![vec![1.0, 2.0, 3.0], vec![0.5, -1.0, 2.0]];
    let (lse0, lse1) = (ln_sum_exp(&rows[0]), ln_sum_exp(&rows[1]));
    let ce = [3.0 * (lse0 - 3.0), 0.5 * (lse1 - 0.5)];
    let z = [s * lse0 * lse0, s * lse1 * lse1];
    let opts = Options {
        lse_square_scale: s as f32,
        weight: Some(w.map(|w| w as f32).to_vec()),
        ..Options::default()
    };
    let (got, data) = run_f32(&rows, &[2, 0], &opts);
    assert_close(
        "loss",
        got.loss,
        (ce[0] + ce[1]) / 3.5 + (z[0] + z[1]) / 2.0,
        F64_TOL,
    );
    assert_close("z_loss", got.z_loss, (z[0] + z[1]) / 2.0, F64_TOL);
    assert_all_close(
        "row_loss",
        &got.row_loss,
        &[ce[0] + z[0], ce[1] + z[1]],
        F64_TOL,
    );
    let grad = |x: &[f64], c: usize, lse: f64| -> Vec<f64> {
        let p = softmax(x);
        (0..3)
            .map(|j| w[c] * (p[j] - f64::from(j == c)) / 3.5 + 2.0 * s * lse * p[j] / 2.0)
            .collect()
    };
    assert_grad_rounded(
        &data,
        3,
        &[grad(&rows[0], 2, lse0), grad(&rows[1], 0, lse1)],
    );
}

#[test]
fn label_smoothing_with_z_loss_adds_both_terms_and_both_gradients() {
    let (eps, s) = (0.5, 0.25);
    let x = [1.0, 2.0, 3.0];
    let lse = ln_sum_exp(&x);
    let p = softmax(&x);
    let loss = (1.0 - eps) * (lse - 2.0) + eps * (lse - 2.0) + s * lse * lse;
    let grad: Vec<f64> = (0..3)
        .map(|j| p[j] - (1.0 - eps) * f64::from(j == 1) - eps / 3.0 + 2.0 * s * lse * p[j])
        .collect();
    let opts = Options {
        label_smoothing: eps as f32,
        lse_square_scale: s as f32,
        ..Options::default()
    };
    let (got, data) = run_f32(&[x.to_vec()], &[1], &opts);
    assert_close("loss", got.loss, loss, F64_TOL);
    assert_close("z_loss", got.z_loss, s * lse * lse, F64_TOL);
    assert_grad_rounded(&data, 3, &[grad]);
}

#[test]
fn softcap_with_label_smoothing_smooths_towards_the_mean_capped_logit() {
    let (cap, eps): (f64, f64) = (1.5, 0.25);
    let x = [1.0, -2.0, 4.0];
    let t: Vec<f64> = x.iter().map(|x| (x / cap).tanh()).collect();
    let y: Vec<f64> = t.iter().map(|t| cap * t).collect();
    let lse = ln_sum_exp(&y);
    let mean_y = (y[0] + y[1] + y[2]) / 3.0;
    let p = softmax(&y);
    let grad: Vec<f64> = (0..3)
        .map(|j| (p[j] - (1.0 - eps) * f64::from(j == 0) - eps / 3.0) * (1.0 - t[j] * t[j]))
        .collect();
    let opts = Options {
        softcap: Some(cap as f32),
        label_smoothing: eps as f32,
        ..Options::default()
    };
    let (got, data) = run_f32(&[x.to_vec()], &[0], &opts);
    assert_close(
        "loss",
        got.loss,
        (1.0 - eps) * (lse - y[0]) + eps * (lse - mean_y),
        F64_TOL,
    );
    assert_grad_rounded(&data, 3, &[grad]);
}

#[test]
fn softcap_with_z_loss_squares_the_lse_of_the_capped_logits() {
    let (cap, s): (f64, f64) = (2.0, 0.125);
    let x = [3.0, -1.0, 0.5];
    let t: Vec<f64> = x.iter().map(|x| (x / cap).tanh()).collect();
    let y: Vec<f64> = t.iter().map(|t| cap * t).collect();
    let lse = ln_sum_exp(&y);
    let p = softmax(&y);
    let grad: Vec<f64> = (0..3)
        .map(|j| (p[j] - f64::from(j == 2) + 2.0 * s * lse * p[j]) * (1.0 - t[j] * t[j]))
        .collect();
    let opts = Options {
        softcap: Some(cap as f32),
        lse_square_scale: s as f32,
        reduction: Reduction::Sum,
        ..Options::default()
    };
    let (got, data) = run_f32(&[x.to_vec()], &[2], &opts);
    assert_close("loss", got.loss, lse - y[2] + s * lse * lse, F64_TOL);
    assert_close("z_loss", got.z_loss, s * lse * lse, F64_TOL);
    assert_all_close("row_lse", &got.row_lse, &[lse], F64_TOL);
    assert_grad_rounded(&data, 3, &[grad]);
}

#[test]
fn softcap_with_class_weights_weights_the_capped_loss() {
    let (cap, w): (f64, [f64; 3]) = (2.5, [0.5, 2.0, 3.0]);
    let x = [1.0, 2.0, -3.0];
    let t: Vec<f64> = x.iter().map(|x| (x / cap).tanh()).collect();
    let y: Vec<f64> = t.iter().map(|t| cap * t).collect();
    let lse = ln_sum_exp(&y);
    let p = softmax(&y);
    let opts = Options {
        softcap: Some(cap as f32),
        weight: Some(w.map(|w| w as f32).to_vec()),
        reduction: Reduction::Sum,
        ..Options::default()
    };
    let (got, data) = run_f32(&[x.to_vec()], &[1], &opts);
    assert_close("loss", got.loss, 2.0 * (lse - y[1]), F64_TOL);
    let grad: Vec<f64> = (0..3)
        .map(|j| 2.0 * (p[j] - f64::from(j == 1)) * (1.0 - t[j] * t[j]))
        .collect();
    assert_grad_rounded(&data, 3, &[grad]);
}

#[test]
fn token_accuracy_with_softcap_takes_the_argmax_of_the_logits_as_given() {
    // With cap 1, tanh(30) and tanh(40) are both 1 in f64: the capped row ties, the logits do
    // not. tanh keeps the order, so the argmax of the logits is the argmax of the capped logits
    // in exact arithmetic; the reference takes it on the logits, where rounding makes no ties.
    let x = [30.0, 40.0, 0.0];
    assert_eq!(
        (x[0] / 1.0f64).tanh(),
        (x[1] / 1.0f64).tanh(),
        "the premise"
    );
    let opts = Options {
        softcap: Some(1.0),
        return_token_accuracy: true,
        ..Options::default()
    };
    let (got, _) = run_f32(&[x.to_vec(), x.to_vec()], &[1, 0], &opts);
    assert_eq!(got.row_correct, Some(vec![true, false]));
    assert_eq!(got.accuracy, Some(0.5));
}

// ---------------------------------------------------------------------------------------------
// Every combination, dtype, label type, reduction, shift and stride against the reference.
// ---------------------------------------------------------------------------------------------

/// Value written between rows: it must survive every call.
const PAD: f64 = 7.25;

/// Logit rows with distinct values, a tie and a row of equal values; multiples of 1/4 in
/// [-4, 4], exact in every dtype.
fn test_rows(n_rows: usize, vocab: usize) -> Vec<Vec<f64>> {
    (0..n_rows)
        .map(|r| match r % 4 {
            2 => vec![1.5; vocab],
            3 => (0..vocab)
                .map(|j| if j % 3 == 1 { 3.0 } else { -0.5 })
                .collect(),
            _ => (0..vocab)
                .map(|j| ((r * 7 + j * 5) % 17) as f64 * 0.5 - 4.0)
                .collect(),
        })
        .collect()
}

fn check_combination<T: Element, L: Label + From<i32>>(
    name: &str,
    opts: &Options,
    shape: Shape,
    label_values: &[i32],
) {
    let rows = test_rows(shape.rows(), shape.vocab);
    let mut values = Vec::new();
    for row in &rows {
        values.extend_from_slice(row);
        values.extend(std::iter::repeat_n(PAD, shape.row_stride - shape.vocab));
    }
    let mut data: Vec<T> = logits(&values);
    let got = cpu::forward_backward(&mut data, &labels::<L>(label_values), shape, opts)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = reference(&rows, &targets_of(label_values, shape, opts), opts);
    let context = format!("{name} {:?} {} {shape:?}", opts.reduction, T::DTYPE.name());
    // Re-raised below with the case named: nothing observes the state after the panic.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_matches(&got, &want, opts);
        assert_grad_rounded(&data, shape.row_stride, &want.grad);
        for (i, x) in data.iter().enumerate() {
            if i % shape.row_stride >= shape.vocab {
                assert_eq!(x.to_f64(), PAD, "padding element {i}");
            }
        }
    }));
    if let Err(panic) = result {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{context}: {msg}");
    }
}

#[test]
fn every_combination_matches_the_reference_for_every_dtype_label_type_reduction_shift_and_stride() {
    // 2 sequences of 4 positions, vocab 7; labels include ignore_index, and under the shift
    // position 0's label is never read.
    let label_values = [3, 1, -100, 6, 0, 2, 5, -100];
    for (name, base) in option_sets(7) {
        for reduction in REDUCTIONS {
            for causal_shift in [false, true] {
                for row_stride in [7, 10] {
                    let shape = Shape::batched(2, 4, 7).with_row_stride(row_stride);
                    let opts = Options {
                        reduction,
                        causal_shift,
                        grad_scale: 0.5,
                        ..base.clone()
                    };
                    check_combination::<f32, i64>(&name, &opts, shape, &label_values);
                    check_combination::<f16, i32>(&name, &opts, shape, &label_values);
                    check_combination::<bf16, i64>(&name, &opts, shape, &label_values);
                    check_combination::<bf16, i32>(&name, &opts, shape, &label_values);
                }
            }
        }
    }
}

#[test]
fn ignored_rows_get_zero_loss_lse_and_gradient_under_every_option() {
    let (_, all) = option_sets(3).pop().expect("the set with every option");
    for reduction in REDUCTIONS {
        let opts = Options {
            reduction,
            ..all.clone()
        };
        let rows = vec![vec![1.0, 2.0, 3.0], vec![0.5, -1.0, 2.0]];
        let (got, data) = run_f32(&rows, &[-100, 1], &opts);
        assert_eq!(got.row_loss[0], 0.0);
        assert_eq!(got.row_lse[0], 0.0);
        assert!(!got.row_correct.as_ref().unwrap()[0]);
        assert!(widen(&data[..3]).iter().all(|&g| g == 0.0), "{data:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The gradient is the derivative of the loss: central finite differences.
// ---------------------------------------------------------------------------------------------

/// Derivative of `loss(x + δ·e_i)` at 0, by central differences at steps `h` and `h/2` combined
/// by Richardson extrapolation (error O(h⁴)). Each shifted logit must be exact in f32.
fn finite_difference(data: &[f32], labels: &[i64], shape: Shape, opts: &Options, i: usize) -> f64 {
    let loss_at = |delta: f64| {
        let mut shifted = data.to_vec();
        let x = shifted[i] as f64 + delta;
        shifted[i] = x as f32;
        assert_eq!(shifted[i] as f64, x, "the step must be exact in f32");
        cpu::forward_backward(&mut shifted, labels, shape, opts)
            .unwrap()
            .loss
    };
    let central = |h: f64| (loss_at(h) - loss_at(-h)) / (2.0 * h);
    let h = 2f64.powi(-10);
    (4.0 * central(h / 2.0) - central(h)) / 3.0
}

#[test]
fn gradient_is_the_finite_difference_of_the_loss_for_each_option_and_each_pair() {
    let weight: Vec<f32> = vec![0.5, 2.0, 1.0, 0.25, 3.0];
    let singles: Vec<(&str, Options)> = vec![
        (
            "smoothing",
            Options {
                label_smoothing: 0.2,
                ..Options::default()
            },
        ),
        (
            "z",
            Options {
                lse_square_scale: 0.05,
                ..Options::default()
            },
        ),
        (
            "softcap",
            Options {
                softcap: Some(2.5),
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
    ];
    let merge = |a: &Options, b: &Options| Options {
        label_smoothing: a.label_smoothing.max(b.label_smoothing),
        lse_square_scale: a.lse_square_scale.max(b.lse_square_scale),
        softcap: a.softcap.or(b.softcap),
        weight: a.weight.clone().or_else(|| b.weight.clone()),
        ..Options::default()
    };
    let mut sets: Vec<(String, Options)> = singles
        .iter()
        .map(|(n, o)| (n.to_string(), o.clone()))
        .collect();
    for (i, (name_a, a)) in singles.iter().enumerate() {
        for (name_b, b) in &singles[i + 1..] {
            sets.push((format!("{name_a}+{name_b}"), merge(a, b)));
        }
    }
    let all = singles
        .iter()
        .fold(Options::default(), |acc, (_, o)| merge(&acc, o));
    sets.push(("all".into(), all));

    // 2 sequences of 3 positions, vocab 5, with an ignored label; with and without the shift.
    let shape = Shape::batched(2, 3, 5);
    let label_values = [4i64, 1, -100, 0, 3, 2];
    let rows = test_rows(6, 5);
    let data: Vec<f32> = logits(&rows.concat());
    for (name, base) in &sets {
        for reduction in REDUCTIONS {
            for causal_shift in [false, true] {
                let opts = Options {
                    reduction,
                    causal_shift,
                    ..base.clone()
                };
                let mut grad = data.clone();
                cpu::forward_backward(&mut grad, &label_values, shape, &opts).unwrap();
                for (i, g) in grad.iter().enumerate() {
                    let fd = finite_difference(&data, &label_values, shape, &opts, i);
                    let g = *g as f64;
                    // f32 rounding of the gradient, plus the difference quotient's own error
                    // (O(h⁴) and the loss's f64 rounding over 2h).
                    let tol = unit_roundoff(DType::F32) * fd.abs() + 1e-9;
                    assert_close(
                        &format!("{name} {reduction:?} shift={causal_shift} d loss / d x[{i}]"),
                        g,
                        fd,
                        tol,
                    );
                }
            }
        }
    }
}

#[test]
fn grad_scale_multiplies_the_gradient_of_every_option_but_not_the_loss() {
    let (_, all) = option_sets(5).pop().expect("the set with every option");
    let shape = Shape::batched(2, 3, 5);
    let label_values = [4i64, 1, -100, 0, 3, 2];
    let data: Vec<f32> = logits(&test_rows(6, 5).concat());
    for reduction in REDUCTIONS {
        let unit = Options {
            reduction,
            ..all.clone()
        };
        let mut unit_grad = data.clone();
        let unit_loss = cpu::forward_backward(&mut unit_grad, &label_values, shape, &unit).unwrap();
        let scaled = Options {
            grad_scale: -4.0,
            ..unit.clone()
        };
        let mut scaled_grad = data.clone();
        let scaled_loss =
            cpu::forward_backward(&mut scaled_grad, &label_values, shape, &scaled).unwrap();
        assert_eq!(
            scaled_loss, unit_loss,
            "{reduction:?}: the loss does not depend on it"
        );
        // A power of two: the scaled gradient is exactly -4 times the other.
        for (i, (s, u)) in scaled_grad.iter().zip(&unit_grad).enumerate() {
            assert_eq!(*s, -4.0 * u, "{reduction:?} element {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: values out of range are InvalidOption naming the option, the logits untouched.
// ---------------------------------------------------------------------------------------------

/// Runs the reference with `opts` on 2 rows of 3 classes and returns its error, checking that
/// the logits were left as they were.
#[track_caller]
fn option_error(opts: &Options) -> String {
    let before: Vec<f32> = vec![1.0, 2.0, 3.0, 0.5, -1.0, 2.0];
    let mut data = before.clone();
    let err = cpu::forward_backward(&mut data, &[0i64, 2], Shape::flat(2, 3), opts)
        .expect_err("the call must fail");
    assert_eq!(data, before, "a failed call wrote into the logits ({err})");
    match err {
        Error::InvalidOption(msg) => msg,
        other => panic!("expected InvalidOption, got {other:?}"),
    }
}

#[track_caller]
fn accepted(opts: &Options) {
    let mut data: Vec<f32> = vec![1.0, 2.0, 3.0, 0.5, -1.0, 2.0];
    let result = cpu::forward_backward(&mut data, &[0i64, 2], Shape::flat(2, 3), opts);
    assert!(result.is_ok(), "{opts:?}: {result:?}");
}

#[test]
fn label_smoothing_outside_0_1_is_an_invalid_option() {
    for eps in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
        let msg = option_error(&Options {
            label_smoothing: eps,
            ..Options::default()
        });
        assert!(msg.contains("label_smoothing"), "{msg}");
    }
    for eps in [0.0, 0.5, 1.0] {
        accepted(&Options {
            label_smoothing: eps,
            ..Options::default()
        });
    }
}

#[test]
fn lse_square_scale_negative_or_not_finite_is_an_invalid_option() {
    for s in [-1e-4, f32::NAN, f32::INFINITY] {
        let msg = option_error(&Options {
            lse_square_scale: s,
            ..Options::default()
        });
        assert!(msg.contains("lse_square_scale"), "{msg}");
    }
    accepted(&Options {
        lse_square_scale: 1e-4,
        ..Options::default()
    });
}

#[test]
fn softcap_not_positive_or_not_finite_is_an_invalid_option() {
    for cap in [0.0, -0.0, -30.0, f32::NAN, f32::INFINITY] {
        let msg = option_error(&Options {
            softcap: Some(cap),
            ..Options::default()
        });
        assert!(msg.contains("softcap"), "{msg}");
    }
    accepted(&Options {
        softcap: Some(30.0),
        ..Options::default()
    });
}

#[test]
fn grad_scale_not_finite_is_an_invalid_option() {
    for g in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let msg = option_error(&Options {
            grad_scale: g,
            ..Options::default()
        });
        assert!(msg.contains("grad_scale"), "{msg}");
    }
    for g in [0.0, -3.0, 1e-30] {
        accepted(&Options {
            grad_scale: g,
            ..Options::default()
        });
    }
}

#[test]
fn weight_needs_one_finite_value_per_class() {
    for weight in [vec![1.0; 2], vec![1.0; 4], vec![]] {
        let msg = option_error(&Options {
            weight: Some(weight),
            ..Options::default()
        });
        assert!(
            msg.contains("weight") && msg.contains("vocab is 3"),
            "{msg}"
        );
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let msg = option_error(&Options {
            weight: Some(vec![1.0, bad, 1.0]),
            ..Options::default()
        });
        assert!(msg.contains("weight[1]"), "{msg}");
    }
    // Zero and negative weights are PyTorch's to allow.
    accepted(&Options {
        weight: Some(vec![0.0, -1.0, 2.0]),
        ..Options::default()
    });
}

#[test]
fn options_validate_is_the_check_both_paths_run() {
    let opts = Options {
        softcap: Some(-1.0),
        ..Options::default()
    };
    assert!(matches!(opts.validate(3), Err(Error::InvalidOption(m)) if m.contains("softcap")));
    assert_eq!(Options::default().validate(3), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// The GPU kernels against the reference: every option alone, every pair, and all at once.
// ---------------------------------------------------------------------------------------------

/// The option sets with at most two options on, and the one with all five.
fn gpu_option_sets(vocab: usize) -> Vec<(String, Options)> {
    option_sets(vocab)
        .into_iter()
        .enumerate()
        .filter(|(mask, _)| mask.count_ones() <= 2 || *mask == 31)
        .map(|(_, set)| set)
        .collect()
}

#[test]
fn gpu_every_option_and_pair_matches_the_reference_for_every_dtype_label_type_and_plan() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let plans = xent_tests::forced_plans(xent, 1024);
    // 3 sequences of 11 positions; rows of 3001 classes in a stride of 3011 (rows start off the
    // 16-byte grid, so the scalar head and tail run too).
    // Under compute-sanitizer, rows of 301 classes.
    let (vocab, stride) = if xent_tests::sanitizing() {
        (301, 307)
    } else {
        (3001, 3011)
    };
    let shape = Shape::batched(3, 11, vocab).with_row_stride(stride);
    let (mut failures, mut cases) = (Vec::new(), 0);
    for (name, set) in gpu_option_sets(vocab) {
        for (i, plan) in plans.iter().enumerate() {
            for dtype in DTYPES {
                let reduction = REDUCTIONS[(i + cases) % 3];
                let case = Case {
                    shape,
                    opts: Options {
                        reduction,
                        plan: *plan,
                        causal_shift: cases % 2 == 0,
                        grad_scale: 0.5,
                        // The predicted tokens in half the cases (they change nothing else),
                        // the entropies in another half.
                        return_predicted_tokens: cases % 4 < 2,
                        return_entropy: cases % 4 == 1 || cases % 4 == 2,
                        ..set.clone()
                    },
                    ignored: 1.0 / 7.0,
                    seed: 17 + cases as u64,
                };
                for result in [
                    run_case_dtype::<i64>(xent, &stream, dtype, &case),
                    run_case_dtype::<i32>(xent, &stream, dtype, &case),
                ] {
                    cases += 1;
                    if let Err(msg) = result {
                        failures.push(format!("{name}: {msg}"));
                    }
                }
            }
        }
    }
    xent_tests::report(&format!(
        "options on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// The soft cap at the caps training uses (issue 13), on logits of about N(0, 4) with 1 in 64
/// moved by ±12: 5 (most vectors beyond the cap, where `tanh` itself runs, the rest on the wide
/// polynomial), 15 (most vectors on the wide polynomial, `|x / cap| < 1`), 30 (Gemma 2's: most
/// vectors on the short or the cubic polynomial, those with a spike on the wide one; the cluster
/// kernel's second pass takes the widest of a thread's vectors without a check per element, the
/// first sums against the fixed reference `cap`) and 50 (above `FIXED_CAP_MAX`: the running
/// maximum), alone and with smoothing or the z-loss, every dtype and plan, on rows of 3001
/// classes, of 50000 (automatic plan) and, with clusters, of Llama 3's 128256 in clusters of 8
/// CTAs of 128 threads (`plan::CLUSTER_CAP_FEW_THREADS`: the fastest shape for the soft cap at
/// 8192 rows of them on an H100; not under compute-sanitizer).
#[test]
fn gpu_softcap_at_training_caps_matches_the_reference() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let mut plans = xent_tests::forced_plans(xent, 1024);
    plans.push(xent::PlanChoice::Auto);
    let (vocab, stride, long) = if xent_tests::sanitizing() {
        (301, 307, 1000)
    } else {
        (3001, 3011, 50000)
    };
    let few_threads = [xent::PlanChoice::Cluster {
        size: Some(8),
        threads: Some(plan::CLUSTER_CAP_FEW_THREADS),
    }];
    let with_few_threads = xent.limits().max_cluster >= 8 && !xent_tests::sanitizing();
    // Each shape with the plans it takes.
    let shapes = [
        (
            Shape::batched(3, 11, vocab).with_row_stride(stride),
            &plans[..],
        ),
        (Shape::flat(9, long), &plans[plans.len() - 1..]),
        (
            Shape::flat(5, 128_256),
            if with_few_threads {
                &few_threads[..]
            } else {
                &[]
            },
        ),
    ];
    let (mut failures, mut cases) = (Vec::new(), 0);
    for cap in [5.0f32, 15.0, 30.0, 50.0] {
        let sets = [
            ("softcap", 0.0, 0.0),
            ("softcap+smoothing", 0.1, 0.0),
            ("softcap+z", 0.0, 1e-4),
        ];
        for (name, label_smoothing, lse_square_scale) in sets {
            for &(shape, plans) in &shapes {
                for plan in plans {
                    for dtype in DTYPES {
                        let case = Case {
                            shape,
                            opts: Options {
                                reduction: REDUCTIONS[cases % 3],
                                plan: *plan,
                                softcap: Some(cap),
                                label_smoothing,
                                lse_square_scale,
                                ..Options::default()
                            },
                            ignored: 1.0 / 7.0,
                            seed: 91 + cases as u64,
                        };
                        cases += 1;
                        if let Err(msg) = run_case_dtype::<i64>(xent, &stream, dtype, &case) {
                            failures.push(format!("cap {cap} {name}: {msg}"));
                        }
                    }
                }
            }
        }
    }
    xent_tests::report(&format!(
        "soft cap at training caps on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// The soft cap on logits that are not ordinary numbers, on the GPU as on the CPU: masked
/// columns at -inf or -1e30 (capped to -cap, no gradient through the flat `tanh`), +inf, a NaN
/// (its row's loss and gradient NaN), a masked label, at caps 30 (the fixed reference) and 50 (the
/// running maximum), every dtype and plan.
#[test]
fn gpu_softcap_with_infinite_masked_and_nan_logits_matches_the_reference() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let mut plans = xent_tests::forced_plans(xent, 1024);
    plans.push(xent::PlanChoice::Auto);
    let vocab = 3001;
    let rows = 6;
    let shape = Shape::flat(rows, vocab);
    let base: Vec<f32> = xent_tests::random_logits::<f32>(&shape, 5);
    let mut data = base.clone();
    // Row 0: a third of the columns masked at -inf; row 1: masked at -1e30 and the label among
    // them; row 2: +inf at two columns; row 3: one NaN; row 4: every logit -inf but the label's;
    // row 5: plain.
    for j in (0..vocab).step_by(3) {
        data[j] = f32::NEG_INFINITY;
        data[vocab + j] = -1e30;
    }
    data[2 * vocab + 17] = f32::INFINITY;
    data[2 * vocab + 2900] = f32::INFINITY;
    data[3 * vocab + 1234] = f32::NAN;
    for j in 0..vocab {
        if j != 40 {
            data[4 * vocab + j] = f32::NEG_INFINITY;
        }
    }
    let labels: Vec<i64> = vec![1, 3, 17, 5, 40, 2999];
    let (mut failures, mut cases) = (Vec::new(), 0);
    for cap in [30.0f32, 50.0] {
        for plan in &plans {
            for dtype in DTYPES {
                let case = Case {
                    shape,
                    opts: Options {
                        reduction: REDUCTIONS[cases % 3],
                        plan: *plan,
                        softcap: Some(cap),
                        // The first maximum among infinities and NaNs too, in half the cases,
                        // and the entropies (NaN where a NaN is) in the other half.
                        return_predicted_tokens: cases % 2 == 0,
                        return_entropy: cases % 2 == 1,
                        ..Options::default()
                    },
                    ignored: 0.0,
                    seed: 0,
                };
                cases += 1;
                let result = match dtype {
                    DType::F32 => {
                        xent_tests::run_logits(xent, &stream, &case, data.clone(), labels.clone())
                    }
                    DType::F16 => {
                        let logits = data.iter().map(|&x| f16::from_f32(x)).collect();
                        xent_tests::run_logits(xent, &stream, &case, logits, labels.clone())
                    }
                    DType::Bf16 => {
                        let logits = data.iter().map(|&x| bf16::from_f32(x)).collect();
                        xent_tests::run_logits(xent, &stream, &case, logits, labels.clone())
                    }
                };
                if let Err(msg) = result {
                    failures.push(format!("cap {cap}: {msg}"));
                }
            }
        }
    }
    xent_tests::report(&format!(
        "soft cap with non-finite logits on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

#[test]
fn gpu_rejects_a_bad_option_value_as_the_cpu_does() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let shape = Shape::flat(2, 3);
    let host_logits = vec![1.0f32, 2.0, 3.0, 0.5, -1.0, 2.0];
    let d_labels = stream.clone_htod(&vec![0i64, 2]).unwrap();
    // A value out of range is the validation error, as on the CPU.
    let mut d_logits = stream.clone_htod(&host_logits).unwrap();
    let bad = Options {
        label_smoothing: 2.0,
        ..Options::default()
    };
    let err = xent
        .forward_backward(&stream, &mut d_logits, &d_labels, shape, &bad)
        .err();
    assert!(
        matches!(&err, Some(Error::InvalidOption(m)) if m.contains("must be in [0, 1]")),
        "{err:?}"
    );
    // A class weight that is not finite, also after a call that uploaded good weights into the
    // same buffers (the GPU path checks weights when they differ from the uploaded ones).
    let mut out = xent::Loss::new(&stream, 2).unwrap();
    let good = Options {
        weight: Some(vec![1.0, 2.0, 0.5]),
        ..Options::default()
    };
    xent.forward_backward_into(&stream, &mut d_logits, &d_labels, shape, &good, &mut out)
        .unwrap();
    let after_good = stream.clone_dtoh(&d_logits).unwrap();
    let nan = Options {
        weight: Some(vec![1.0, f32::NAN, 0.5]),
        ..Options::default()
    };
    let err = xent
        .forward_backward_into(&stream, &mut d_logits, &d_labels, shape, &nan, &mut out)
        .err();
    assert!(
        matches!(&err, Some(Error::InvalidOption(m)) if m.contains("weight[1]")),
        "{err:?}"
    );
    assert_eq!(
        stream.clone_dtoh(&d_logits).unwrap(),
        after_good,
        "nothing ran"
    );
}

/// A forced cluster plan may ask for up to 1024 threads a CTA, more than a kernel with more than
/// 64 registers launches with. Such a plan is refused with `PlanDoesNotFit` naming the kernel's
/// limit, never left to fail at launch (random draws met `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`
/// before the check, when the soft cap with token accuracy took 72 registers); every plan not
/// refused runs and matches the reference. Since session 32 every sm_90 cluster kernel takes at
/// most 64 (the soft cap with token accuracy among them), so all of these plans run, 1024
/// threads included.
#[test]
fn gpu_forced_threads_past_a_kernels_limit_are_refused_before_launch() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    if xent.limits().max_cluster <= 1 {
        // Only the cluster plan takes a forced thread count.
        xent_tests::report("forced threads: no clusters on this device (or XENT_ARCH=sm_80)");
        return;
    }
    let stream = xent.context().default_stream();
    let vocab = 49152;
    let weights: Vec<f32> = (0..vocab).map(|j| 0.5 + (j % 4) as f32 * 0.25).collect();
    let option_sets = [
        ("none", Options::default()),
        (
            "soft cap + accuracy",
            Options {
                softcap: Some(30.0),
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
        (
            "soft cap + weighted smoothing",
            Options {
                softcap: Some(30.0),
                label_smoothing: 0.1,
                weight: Some(weights.clone()),
                ..Options::default()
            },
        ),
        (
            "weighted smoothing + accuracy",
            Options {
                label_smoothing: 0.1,
                weight: Some(weights.clone()),
                return_token_accuracy: true,
                ..Options::default()
            },
        ),
    ];
    let (mut failures, mut cases, mut refused) = (Vec::new(), 0, 0);
    for (name, opts) in &option_sets {
        for threads in [1024, 960, 512] {
            for dtype in DTYPES {
                let case = Case {
                    shape: Shape::flat(4, vocab),
                    opts: Options {
                        plan: xent::PlanChoice::Cluster {
                            size: Some(2),
                            threads: Some(threads),
                        },
                        ..opts.clone()
                    },
                    ignored: 0.0,
                    seed: 11,
                };
                cases += 1;
                let what = format!("{name}, {threads} threads, {dtype:?}");
                match xent.plan_for(&case.shape, dtype, &case.opts) {
                    Err(Error::PlanDoesNotFit(msg)) => {
                        refused += 1;
                        if threads <= 512 || !msg.contains("launches with at most") {
                            failures.push(format!("{what}: refused: {msg}"));
                        }
                    }
                    Err(other) => failures.push(format!("{what}: {other}")),
                    Ok(_) => {
                        if let Err(msg) = run_case_dtype::<i64>(xent, &stream, dtype, &case) {
                            failures.push(format!("{what}: {msg}"));
                        }
                    }
                }
            }
        }
    }
    xent_tests::report(&format!(
        "forced threads on the GPU: {cases} cases, {refused} refused before launch, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// Class-weighted smoothing on the cluster kernel with a gradient pass: that pass, which reads
/// each class weight for the gradient, also sums the loss's `Σ w_j·(y_j - y_ref)`; each CTA's
/// share goes to the CTA holding the label, which adds them in rank order (`gather_wsum`). The
/// label sits in the first, an inner and the last chunk and at both ends of the vocabulary, one
/// row is ignored; cluster sizes 2 to 16 and 1024-thread CTAs (32 warps, the most the reduction
/// scratch holds below the slots), with the soft cap, token accuracy and the z-loss around it.
/// The fused call (the gradient pass's sum) and a forward call (the first pass's sum) both match
/// the reference.
#[test]
fn gpu_weighted_smoothing_summed_in_the_gradient_pass_matches_the_reference_at_every_cluster_shape()
{
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    if xent.limits().max_cluster <= 1 {
        xent_tests::report(
            "weighted smoothing, cluster shapes: no clusters on this device (or XENT_ARCH=sm_80)",
        );
        return;
    }
    let stream = xent.context().default_stream();
    let vocab = if xent_tests::sanitizing() {
        2003
    } else {
        20011
    };
    let shape = Shape::flat(7, vocab).with_row_stride(vocab + 5);
    let weights: Vec<f32> = (0..vocab)
        .map(|j| 0.25 + ((j * 7) % 13) as f32 * 0.125)
        .collect();
    let smoothing = Options {
        label_smoothing: 0.1,
        weight: Some(weights),
        ..Options::default()
    };
    let option_sets = [
        ("weighted smoothing", smoothing.clone()),
        (
            "+ accuracy + z-loss",
            Options {
                return_token_accuracy: true,
                lse_square_scale: 1e-3,
                ..smoothing.clone()
            },
        ),
        (
            "+ soft cap 30",
            Options {
                softcap: Some(30.0),
                ..smoothing.clone()
            },
        ),
        (
            "+ soft cap 5 + accuracy",
            Options {
                softcap: Some(5.0),
                return_token_accuracy: true,
                ..smoothing.clone()
            },
        ),
    ];
    // Under compute-sanitizer the extreme shapes in bf16 (racecheck ran past 300 s on them all).
    let shapes: &[(u32, Option<u32>)] = if xent_tests::sanitizing() {
        &[(2, None), (16, Some(1024))]
    } else {
        &[
            (2, None),
            (3, Some(1024)),
            (5, None),
            (8, Some(128)),
            (16, None),
            (16, Some(1024)),
        ]
    };
    let dtypes: &[DType] = if xent_tests::sanitizing() {
        &[DType::Bf16]
    } else {
        &DTYPES
    };
    let (mut failures, mut cases, mut refused) = (Vec::new(), 0, 0);
    for (name, set) in &option_sets {
        for &(size, threads) in shapes {
            let chunk = vocab.div_ceil(size as usize);
            let labels: Vec<i64> = vec![
                0,
                chunk as i64 - 1,
                chunk as i64,
                (vocab / 2) as i64,
                -100,
                (vocab - chunk) as i64,
                vocab as i64 - 1,
            ];
            for &dtype in dtypes {
                let case = Case {
                    shape,
                    opts: Options {
                        plan: xent::PlanChoice::Cluster {
                            size: Some(size),
                            threads,
                        },
                        reduction: REDUCTIONS[cases % 3],
                        ..set.clone()
                    },
                    ignored: 0.0,
                    seed: 90 + cases as u64,
                };
                let what = format!("{name}, cluster {size} x {threads:?}, {dtype:?}");
                if let Err(Error::PlanDoesNotFit(msg)) =
                    xent.plan_for(&case.shape, dtype, &case.opts)
                    && threads == Some(1024)
                    && msg.contains("launches with at most")
                {
                    // A kernel of more than 64 registers (the soft cap's 16-bit kernels took 72
                    // until session 32: at most 896 threads).
                    refused += 1;
                    continue;
                }
                cases += 1;
                let result = match dtype {
                    DType::Bf16 => weighted_smoothing_case::<bf16>(xent, &stream, &case, &labels),
                    DType::F16 => weighted_smoothing_case::<f16>(xent, &stream, &case, &labels),
                    DType::F32 => weighted_smoothing_case::<f32>(xent, &stream, &case, &labels),
                };
                if let Err(msg) = result {
                    failures.push(format!("{what}: {msg}"));
                }
            }
        }
    }
    xent_tests::report(&format!(
        "weighted smoothing at cluster shapes on the GPU: {cases} cases, {refused} refused before launch, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// One case of the test above: the fused call against the reference (loss, rows, gradient), then
/// a forward call's loss and per-row losses against the same reference.
fn weighted_smoothing_case<T: Element>(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    case: &Case,
    labels: &[i64],
) -> Result<(), String> {
    let logits: Vec<T> = xent_tests::random_logits(&case.shape, case.seed);
    let reference = xent_tests::Reference::new(case, logits.clone(), labels.to_vec())?;
    reference.check(xent, stream, case)?;
    let expected = reference.expected();
    let d_logits = stream.clone_htod(&logits).map_err(|e| e.to_string())?;
    let d_labels = stream.clone_htod(labels).map_err(|e| e.to_string())?;
    let mut fwd = xent::Loss::new(stream, case.shape.rows()).map_err(|e| e.to_string())?;
    xent.forward(
        stream, &d_logits, &d_labels, case.shape, &case.opts, &mut fwd,
    )
    .map_err(|e| e.to_string())?;
    let loss = fwd.read().map_err(|e| e.to_string())? as f64;
    if (loss - expected.loss).abs() > xent_tests::total_loss_tol(expected, &case.opts) {
        return Err(format!(
            "forward loss {loss} != reference {}",
            expected.loss
        ));
    }
    let row_loss = fwd.read_row_loss().map_err(|e| e.to_string())?;
    for (r, (&got, &want)) in row_loss.iter().zip(&expected.row_loss).enumerate() {
        if (got as f64 - want).abs() > xent_tests::loss_tol(want) {
            return Err(format!("forward, row {r}: loss {got} != reference {want}"));
        }
    }
    Ok(())
}

/// The predicted tokens on logits with many ties (integers in [-20, 20]: the first maximum wins),
/// a NaN row (the first NaN), a row of -inf (class 0), ignored rows (-1), every dtype and plan,
/// from the fused call and from the two-phase forward (which reads the logits only), against the
/// CPU reference exactly.
#[test]
fn gpu_predicted_tokens_take_the_first_maximum_in_every_plan_and_mode() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let mut plans = xent_tests::forced_plans(xent, 1024);
    plans.push(xent::PlanChoice::Auto);
    let (rows, vocab, stride) = (37, 3001, 3011);
    let shape = Shape::flat(rows, vocab).with_row_stride(stride);
    let mut data = integer_logits(rows, vocab, stride, 12345);
    data[3 * stride + 2000] = f32::NAN;
    data[3 * stride + 2500] = f32::NAN;
    for j in 0..vocab {
        data[5 * stride + j] = f32::NEG_INFINITY;
    }
    let labels = every_sixth_ignored(rows, vocab);
    let d_labels = stream.clone_htod(&labels).unwrap();
    let (mut failures, mut cases) = (Vec::new(), 0);
    for plan in &plans {
        for dtype in DTYPES {
            for two_phase in [false, true] {
                let opts = Options {
                    plan: *plan,
                    return_predicted_tokens: true,
                    ..Options::default()
                };
                cases += 1;
                let got = match dtype {
                    DType::F32 => {
                        loss_on_gpu(xent, &stream, &data, &d_labels, shape, &opts, two_phase)
                            .read_predicted_tokens()
                            .unwrap()
                    }
                    DType::F16 => {
                        let logits: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                        loss_on_gpu(xent, &stream, &logits, &d_labels, shape, &opts, two_phase)
                            .read_predicted_tokens()
                            .unwrap()
                    }
                    DType::Bf16 => {
                        let logits: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                        loss_on_gpu(xent, &stream, &logits, &d_labels, shape, &opts, two_phase)
                            .read_predicted_tokens()
                            .unwrap()
                    }
                };
                let mut reference = data.clone();
                let want = cpu::forward_backward(&mut reference, &labels, shape, &opts)
                    .unwrap()
                    .predicted_tokens;
                if got != want {
                    failures.push(format!(
                        "{plan:?} {dtype:?} two-phase {two_phase}: {got:?} != {want:?}"
                    ));
                }
            }
        }
    }
    xent_tests::report(&format!(
        "predicted tokens on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// The entropies on the GPU against the CPU reference for every dtype, from the fused call and
/// the two-phase forward: rows of integers in [-20, 20] (3001 classes, rows 3011 apart: an
/// unaligned start and tail), a peaked row, a row with half its logits -inf (masked), a NaN
/// row (NaN), a row of -inf (NaN, as PyTorch's), ignored rows (0), the soft cap on and off, and
/// a 128256-class row of spread logits (the summation's error over a long row).
#[test]
fn gpu_entropy_matches_the_reference_on_masked_peaked_and_long_rows() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let (mut failures, mut cases) = (Vec::new(), 0);
    for (rows, vocab, stride) in [(37usize, 3001usize, 3011usize), (3, 128256, 128256)] {
        let shape = Shape::flat(rows, vocab).with_row_stride(stride);
        let mut data = integer_logits(rows, vocab, stride, 777);
        if rows > 6 {
            data[stride + 17] = 80.0; // peaked: the entropy is about 0
            for j in (0..vocab).step_by(2) {
                data[2 * stride + j] = f32::NEG_INFINITY;
            }
            data[3 * stride + 2000] = f32::NAN;
            for j in 0..vocab {
                data[5 * stride + j] = f32::NEG_INFINITY;
            }
        }
        let labels = every_sixth_ignored(rows, vocab);
        let d_labels = stream.clone_htod(&labels).unwrap();
        for softcap in [None, Some(15.0)] {
            for dtype in DTYPES {
                for two_phase in [false, true] {
                    let opts = Options {
                        softcap,
                        return_entropy: true,
                        ..Options::default()
                    };
                    cases += 1;
                    // The reference on the values the GPU reads (rounded to the dtype).
                    let (got, rounded) = match dtype {
                        DType::F32 => (
                            loss_on_gpu(xent, &stream, &data, &d_labels, shape, &opts, two_phase)
                                .read_entropy()
                                .unwrap(),
                            data.clone(),
                        ),
                        DType::F16 => {
                            let logits: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                            let back = logits.iter().map(|x| x.to_f32()).collect();
                            (
                                loss_on_gpu(
                                    xent, &stream, &logits, &d_labels, shape, &opts, two_phase,
                                )
                                .read_entropy()
                                .unwrap(),
                                back,
                            )
                        }
                        DType::Bf16 => {
                            let logits: Vec<bf16> =
                                data.iter().map(|&x| bf16::from_f32(x)).collect();
                            let back = logits.iter().map(|x| x.to_f32()).collect();
                            (
                                loss_on_gpu(
                                    xent, &stream, &logits, &d_labels, shape, &opts, two_phase,
                                )
                                .read_entropy()
                                .unwrap(),
                                back,
                            )
                        }
                    };
                    let mut reference = rounded;
                    let want = cpu::forward_backward(&mut reference, &labels, shape, &opts)
                        .unwrap()
                        .entropy;
                    if let Err(e) = check_entropy(got, &want) {
                        failures.push(format!(
                            "{rows} x {vocab} {dtype:?} cap {softcap:?} two-phase {two_phase}: {e}"
                        ));
                    }
                }
            }
        }
    }
    xent_tests::report(&format!(
        "entropy on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// The two-phase backward with the entropies' gradient (`backward_with_entropy_into`) against
/// `cpu::forward_backward_entropy` on the logits the GPU reads, for every dtype: plain, the soft
/// cap, smoothing with class weights and the z-loss, and `Reduction::None` with a per-row upstream;
/// rows of integers in [-20, 20] (3001 classes, 3011 apart), a peaked row, a row half -inf, ignored
/// rows. Refused: a forward without entropies, an upstream shorter than the rows.
#[test]
fn gpu_entropy_gradient_matches_the_reference() {
    let Some(xent) = xent_tests::gpu() else {
        return;
    };
    let stream = xent.context().default_stream();
    let (rows, vocab, stride) = (37usize, 3001usize, 3011usize);
    let shape = Shape::flat(rows, vocab).with_row_stride(stride);
    let mut data = integer_logits(rows, vocab, stride, 4242);
    data[stride + 17] = 80.0; // peaked
    for j in (0..vocab).step_by(2) {
        data[2 * stride + j] = f32::NEG_INFINITY;
    }
    let labels = every_sixth_ignored(rows, vocab);
    let d_labels = stream.clone_htod(&labels).unwrap();
    let e_up: Vec<f32> = (0..rows).map(|r| ((r % 7) as f32 - 3.0) * 0.25).collect();
    let d_e_up = stream.clone_htod(&e_up).unwrap();
    let weights: Vec<f32> = (0..vocab).map(|j| 0.5 + (j % 5) as f32 * 0.25).collect();
    let option_sets = [
        ("plain", Options::default()),
        (
            "softcap",
            Options {
                softcap: Some(15.0),
                ..Options::default()
            },
        ),
        (
            "smoothing, weights, z-loss",
            Options {
                label_smoothing: 0.1,
                weight: Some(weights),
                lse_square_scale: 1e-3,
                ..Options::default()
            },
        ),
        (
            "none",
            Options {
                reduction: Reduction::None,
                ..Options::default()
            },
        ),
    ];
    let (mut failures, mut cases) = (Vec::new(), 0);
    for (name, opts) in &option_sets {
        let opts = Options {
            return_entropy: true,
            ..opts.clone()
        };
        let upstream: Vec<f32> = if opts.reduction == Reduction::None {
            (0..rows).map(|r| 1.0 - (r % 3) as f32 * 0.5).collect()
        } else {
            vec![0.75]
        };
        let d_upstream = stream.clone_htod(&upstream).unwrap();
        for dtype in DTYPES {
            cases += 1;
            let result = match dtype {
                DType::F32 => entropy_grad_case(
                    xent,
                    &stream,
                    &data,
                    &d_labels,
                    shape,
                    &opts,
                    &d_upstream,
                    &d_e_up,
                ),
                DType::F16 => {
                    let logits: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                    entropy_grad_case(
                        xent,
                        &stream,
                        &logits,
                        &d_labels,
                        shape,
                        &opts,
                        &d_upstream,
                        &d_e_up,
                    )
                }
                DType::Bf16 => {
                    let logits: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                    entropy_grad_case(
                        xent,
                        &stream,
                        &logits,
                        &d_labels,
                        shape,
                        &opts,
                        &d_upstream,
                        &d_e_up,
                    )
                }
            };
            let (got, rounded) = match result {
                Ok(pair) => pair,
                Err(e) => {
                    failures.push(format!("{name} {dtype:?}: {e}"));
                    continue;
                }
            };
            let mut want = rounded;
            let reference = cpu::forward_backward_entropy(
                &mut want,
                &labels,
                shape,
                &opts,
                &upstream,
                Some(&e_up),
            )
            .unwrap();
            let entropies = reference.entropy.clone().unwrap();
            let loss_scale = xent_tests::grad_tol_scale(&opts, &reference)
                * upstream.iter().fold(0.0f64, |m, &u| m.max(u.abs() as f64));
            let mut worst = None;
            for r in 0..rows {
                // The entropy term's f32 error: `lse - H` (the entropy's own tolerance and the
                // log-sum-exp's) times `p ≤ 1` times the row's upstream.
                let lse = reference.row_lse[r];
                let atol = xent_tests::grad_atol(dtype, loss_scale)
                    + e_up[r].abs() as f64
                        * (xent_tests::entropy_tol(entropies[r]) + 1e-5 * lse.abs().max(1.0));
                for j in 0..vocab {
                    let (g, w) = (got[r * stride + j], want[r * stride + j]);
                    if let Err((err, tol)) =
                        xent_tests::grad_error(g, w, xent_tests::grad_rtol(dtype), atol)
                    {
                        worst.get_or_insert(format!(
                            "row {r} class {j}: {g} against {w} (error {err:e}, tolerance {tol:e})"
                        ));
                    }
                }
            }
            if let Some(msg) = worst {
                failures.push(format!("{name} {dtype:?}: {msg}"));
            }
        }
    }
    // A forward without entropies, and an upstream one short, are refused.
    let d_logits = stream.clone_htod(&data).unwrap();
    let mut grad = stream.alloc_zeros::<f32>(data.len()).unwrap();
    let one = stream.clone_htod(&[1.0f32]).unwrap();
    let mut plain = xent::Loss::new(&stream, rows).unwrap();
    xent.forward(
        &stream,
        &d_logits,
        &d_labels,
        shape,
        &Options::default(),
        &mut plain,
    )
    .unwrap();
    let refused = xent.backward_with_entropy_into(
        &stream,
        &d_logits,
        &d_labels,
        shape,
        &Options::default(),
        &plain,
        &one,
        &d_e_up,
        &mut grad,
    );
    if !matches!(refused, Err(Error::InvalidOption(_))) {
        failures.push(format!("a forward without entropies: {refused:?}"));
    }
    let opts = Options {
        return_entropy: true,
        ..Options::default()
    };
    let mut out = xent::Loss::new(&stream, rows).unwrap();
    xent.forward(&stream, &d_logits, &d_labels, shape, &opts, &mut out)
        .unwrap();
    let short = stream.clone_htod(&e_up[..rows - 1]).unwrap();
    let refused = xent.backward_with_entropy_into(
        &stream, &d_logits, &d_labels, shape, &opts, &out, &one, &short, &mut grad,
    );
    if !matches!(refused, Err(Error::InvalidOption(_))) {
        failures.push(format!("an upstream one short: {refused:?}"));
    }
    xent_tests::report(&format!(
        "entropy gradient on the GPU: {cases} cases, {} failed",
        failures.len()
    ));
    assert_no_failures(&failures);
}

/// One two-phase call with the entropies' gradient: returns the gradient (the logits' layout, as
/// f64) and the logits the GPU read (as f64, for the reference).
#[allow(clippy::too_many_arguments)]
fn entropy_grad_case<T: Element>(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    logits: &[T],
    labels: &xent::cudarc::driver::CudaSlice<i64>,
    shape: Shape,
    opts: &Options,
    upstream: &xent::cudarc::driver::CudaSlice<f32>,
    entropy_upstream: &xent::cudarc::driver::CudaSlice<f32>,
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    let d_logits = stream.clone_htod(logits)?;
    let mut out = xent::Loss::new(stream, shape.rows())?;
    xent.forward(stream, &d_logits, labels, shape, opts, &mut out)?;
    let mut grad = stream.clone_htod(logits)?;
    xent.backward_with_entropy_into(
        stream,
        &d_logits,
        labels,
        shape,
        opts,
        &out,
        upstream,
        entropy_upstream,
        &mut grad,
    )?;
    let got = stream.clone_dtoh(&grad)?;
    Ok((
        got.iter().map(|x| x.to_f64()).collect(),
        logits.iter().map(|x| x.to_f64()).collect(),
    ))
}

/// `rows` rows of `vocab` integers in [-20, 20] (many ties), `stride` apart (padding 0).
fn integer_logits(rows: usize, vocab: usize, stride: usize, seed: u64) -> Vec<f32> {
    let mut rng = seed;
    let mut data = vec![0.0f32; rows * stride];
    for (i, x) in data.iter_mut().enumerate() {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = if i % stride < vocab {
            ((rng >> 33) % 41) as f32 - 20.0
        } else {
            0.0
        };
    }
    data
}

/// Labels of `rows` rows: every sixth row (from row 4) ignored, the others spread over `vocab`.
fn every_sixth_ignored(rows: usize, vocab: usize) -> Vec<i64> {
    (0..rows as i64)
        .map(|r| {
            if r % 6 == 4 {
                -100
            } else {
                (r * 97) % vocab as i64
            }
        })
        .collect()
}

/// One GPU call on `logits` (fused, or the two-phase forward), waited for by its reader.
fn loss_on_gpu<T: Element>(
    xent: &xent::CrossEntropy,
    stream: &std::sync::Arc<xent::cudarc::driver::CudaStream>,
    logits: &[T],
    labels: &xent::cudarc::driver::CudaSlice<i64>,
    shape: Shape,
    opts: &Options,
    two_phase: bool,
) -> xent::Loss {
    let mut d_logits = stream.clone_htod(logits).unwrap();
    if two_phase {
        let mut out = xent::Loss::new(stream, shape.rows()).unwrap();
        xent.forward(stream, &d_logits, labels, shape, opts, &mut out)
            .unwrap();
        out
    } else {
        xent.forward_backward(stream, &mut d_logits, labels, shape, opts)
            .unwrap()
    }
}
