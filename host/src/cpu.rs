//! The CPU implementation of the same API, accumulating in f64: the oracle the GPU tests compare
//! against, and the fallback where no CUDA device exists.
//!
//! Row `r` with target class `c`: `lse = ln(sum_j exp(x_j))` (max-shifted), `loss = lse - x_c`,
//! `grad_j = (exp(x_j - lse) - [j == c]) * scale` with `scale = grad_scale / n_valid` for the mean
//! and `grad_scale` otherwise, rounded once to the element type. Ignored rows: loss, lse and
//! gradient 0.
//!
//! With the options of issue 4 (see [`Options`] for each one's definition), `x` is first
//! soft-capped to `y_j = cap·tanh(x_j / cap)`, `lse = ln Σ_j e^{y_j}`, `p = softmax(y)`, and with
//! class weights `w` (1 without), `W = Σ_j w_j`, smoothing ε, z-loss scale `s`, `V = vocab`:
//!
//! - `ce = (1 - ε)·w_c·(lse - y_c) + (ε/V)·Σ_j w_j·(lse - y_j)` (PyTorch), `z = s·lse²` (Liger);
//!   the row's loss is `ce + z`;
//! - `mean`: `loss = Σ ce / Σ w_c + Σ z / n_valid` (sums over scored rows); `sum`, `none`:
//!   `loss = Σ ce + Σ z`;
//! - `grad_j = ((1 - ε)·w_c·(p_j - [j == c]) + (ε/V)·(W·p_j - w_j))·ce_scale
//!   + 2·s·lse·p_j·z_scale`, times `1 - tanh²(x_j / cap)` with a soft cap, where
//!   `ce_scale = grad_scale / Σ w_c` and `z_scale = grad_scale / n_valid` for the mean, both
//!   `grad_scale` otherwise.

use crate::error::{Error, Result};
use crate::options::{Element, Label, Options, Reduction, Shape, Target, row_target};

/// A value the reference computes on: the logit element types, and `f64` itself (the linear
/// layer's reference keeps its logits and their gradient unrounded).
pub trait Value: Copy + Send + Sync {
    fn widen(self) -> f64;
    /// Rounds once to nearest, ties to even (exact for `f64`).
    fn narrow(value: f64) -> Self;
}

impl<T: Element> Value for T {
    fn widen(self) -> f64 {
        self.to_f64()
    }
    fn narrow(value: f64) -> Self {
        T::from_f64(value)
    }
}

impl Value for f64 {
    fn widen(self) -> f64 {
        self
    }
    fn narrow(value: f64) -> Self {
        value
    }
}

/// Results of a CPU call, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuLoss {
    /// The reduced loss (`none`: the sum of the per-row losses), z-loss included. NaN for a mean
    /// over no rows.
    pub loss: f64,
    /// Per-row loss, z-loss included (0 for ignored rows).
    pub row_loss: Vec<f64>,
    /// Per-row natural log-sum-exp, of the soft-capped logits with `softcap` (0 for ignored
    /// rows).
    pub row_lse: Vec<f64>,
    /// Rows whose label is a class (not ignored).
    pub n_valid: usize,
    /// The z-loss part of `loss`: `Σ lse_square_scale·lse²` over the scored rows, divided by
    /// `n_valid` for the mean (Liger's `z_loss`). 0 when `lse_square_scale` is 0.
    pub z_loss: f64,
    /// `Σ w[class]` over the scored rows (PyTorch's `total_weight`): the divisor of the mean's
    /// cross-entropy part; `n_valid` without class weights.
    pub total_weight: f64,
    /// With `return_token_accuracy`: per row, whether the first maximal logit is the label
    /// (false for ignored rows).
    pub row_correct: Option<Vec<bool>>,
    /// With `return_token_accuracy`: the fraction of scored rows whose argmax is the label (NaN
    /// without scored rows), whatever the reduction.
    pub accuracy: Option<f64>,
    /// With `return_predicted_tokens`: per row, its first maximal logit's class (`torch.argmax`
    /// of the logits as given), -1 for a row not scored.
    pub predicted_tokens: Option<Vec<i64>>,
    /// With `return_entropy`: per row, the entropy of its softmax (of the soft-capped logits
    /// with a soft cap) in nats, `Σ p·(lse - y)`; 0 for a row not scored.
    pub entropy: Option<Vec<f64>>,
}

/// The gradient's scale for `n_valid` scored rows, without class weights (with them, the mean's
/// cross-entropy part is scaled by `grad_scale / total_weight` instead).
pub fn grad_scale(opts: &Options, n_valid: usize) -> f64 {
    match opts.reduction {
        Reduction::Mean => opts.grad_scale as f64 / n_valid as f64,
        Reduction::Sum | Reduction::None => opts.grad_scale as f64,
    }
}

/// Loss and gradient of `logits` (`shape`), the gradient written in place.
///
/// Fails before touching `logits` on a bad shape, a bad option value ([`Options::validate`]) or a
/// label out of range (the GPU path reports the latter when its loss is read).
pub fn forward_backward<T: Element, L: Label>(
    logits: &mut [T],
    labels: &[L],
    shape: Shape,
    opts: &Options,
) -> Result<CpuLoss> {
    forward_backward_upstream(logits, labels, shape, opts, &[1.0])
}

/// Two-phase mode's reference: the gradient of `upstream · loss` (`upstream` one value, or one
/// per row: row `r`'s gradient times `upstream[r]`), as the GPU's `forward` + `backward_into`
/// compute it, written over `logits`; returns the loss of the forward.
pub fn forward_backward_upstream<T: Value, L: Label>(
    logits: &mut [T],
    labels: &[L],
    shape: Shape,
    opts: &Options,
    upstream: &[f32],
) -> Result<CpuLoss> {
    forward_backward_entropy(logits, labels, shape, opts, upstream, None)
}

/// [`forward_backward_upstream`] with the entropies' gradient added where `entropy_upstream` is
/// given (one value a row): the gradient of `upstream · loss + Σ_r entropy_upstream[r]·H_r`, `H_r`
/// the entropy of row `r`'s softmax (of the soft-capped logits; rows not scored have none), as
/// the GPU's `backward_with_entropy_into` computes it.
pub fn forward_backward_entropy<T: Value, L: Label>(
    logits: &mut [T],
    labels: &[L],
    shape: Shape,
    opts: &Options,
    upstream: &[f32],
    entropy_upstream: Option<&[f32]>,
) -> Result<CpuLoss> {
    let rows = shape.rows();
    crate::options::check_upstream_len(rows, upstream.len())?;
    if let Some(e) = entropy_upstream {
        crate::options::check_entropy_upstream(rows, e.len())?;
    }
    shape.validate(logits.len(), labels.len())?;
    opts.validate(shape.vocab)?;
    let targets: Vec<Target> = (0..rows)
        .map(|r| row_target(labels, &shape, opts, r))
        .collect();
    let bad: Vec<(usize, i64)> = targets
        .iter()
        .enumerate()
        .filter_map(|(r, t)| match t {
            Target::OutOfRange(label) => Some((r, *label)),
            _ => None,
        })
        .collect();
    if let Some(&(row, label)) = bad.first() {
        return Err(Error::LabelOutOfRange {
            count: bad.len(),
            row: Some(row),
            label: Some(label),
        });
    }
    let classes = || {
        targets.iter().filter_map(|t| match t {
            Target::Class(c) => Some(*c),
            _ => None,
        })
    };
    let n_valid = classes().count();
    let weight = opts.weight.as_deref();
    let total_weight: f64 = match weight {
        Some(w) => classes().map(|c| w[c] as f64).sum(),
        None => n_valid as f64,
    };
    let math = RowMath {
        ce_scale: match opts.reduction {
            Reduction::Mean => opts.grad_scale as f64 / total_weight,
            Reduction::Sum | Reduction::None => opts.grad_scale as f64,
        },
        z_scale: grad_scale(opts, n_valid),
        smoothing: opts.label_smoothing as f64,
        lse_square_scale: opts.lse_square_scale as f64,
        softcap: opts.softcap.map(f64::from),
        weight,
        class_weight_sum: weight.map_or(shape.vocab as f64, |w| w.iter().map(|&x| x as f64).sum()),
        accuracy: opts.return_token_accuracy,
        predicted: opts.return_predicted_tokens,
        entropy: opts.return_entropy,
    };

    // Rows are independent once the scales are known: split them over the machine's cores, each
    // thread given at least `MIN_ELEMENTS_PER_THREAD` logits (starting a thread costs more than a
    // small call's whole work: 2 x 8 logits took 180 µs in a thread of their own, a few µs inline).
    let mut outs = vec![RowOut::UNSCORED; rows];
    let workers = cores()
        .min(rows.max(1))
        .min((rows.saturating_mul(shape.vocab) / MIN_ELEMENTS_PER_THREAD).max(1));
    let per_worker = rows.div_ceil(workers.max(1)).max(1);
    // Rows `first..` of `mine` (the logits from row `first` on) into `outs`.
    let run_rows = |mine: &mut [T], outs: &mut [RowOut], first: usize, targets: &[Target]| {
        for (i, target) in targets.iter().enumerate() {
            let start = i * shape.row_stride;
            let row = &mut mine[start..start + shape.vocab];
            let factor = upstream[if upstream.len() == 1 { 0 } else { first + i }];
            let entropy_factor = entropy_upstream.map(|e| e[first + i] as f64);
            outs[i] = row_forward_backward(row, *target, &math, factor as f64, entropy_factor);
        }
    };
    if workers <= 1 {
        run_rows(logits, &mut outs, 0, &targets);
    } else {
        std::thread::scope(|scope| {
            let mut rest = &mut logits[..];
            let mut outputs = outs.chunks_mut(per_worker);
            for first in (0..rows).step_by(per_worker) {
                let count = per_worker.min(rows - first);
                let len = if first + count == rows {
                    rest.len()
                } else {
                    count * shape.row_stride
                };
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len);
                rest = tail;
                let outs = outputs.next().expect("one output chunk per worker");
                let targets = &targets[first..first + count];
                let run_rows = &run_rows;
                scope.spawn(move || run_rows(mine, outs, first, targets));
            }
        });
    }
    let ce_sum: f64 = outs.iter().map(|o| o.ce).sum();
    let z_sum: f64 = outs.iter().map(|o| o.z).sum();
    let ce_loss = match opts.reduction {
        Reduction::Mean => ce_sum / total_weight,
        Reduction::Sum | Reduction::None => ce_sum,
    };
    // 0 without the z-loss (not NaN for a mean over no rows): adding it then leaves the
    // cross-entropy loss bit for bit.
    let z_loss = match opts.reduction {
        _ if opts.lse_square_scale == 0.0 => 0.0,
        Reduction::Mean => z_sum / n_valid as f64,
        Reduction::Sum | Reduction::None => z_sum,
    };
    let loss = ce_loss + z_loss;
    let (row_correct, accuracy) = if opts.return_token_accuracy {
        let correct: Vec<bool> = outs.iter().map(|o| o.correct).collect();
        let hits = correct.iter().filter(|&&c| c).count();
        (Some(correct), Some(hits as f64 / n_valid as f64))
    } else {
        (None, None)
    };
    Ok(CpuLoss {
        loss,
        row_loss: outs.iter().map(|o| o.ce + o.z).collect(),
        row_lse: outs.iter().map(|o| o.lse).collect(),
        n_valid,
        z_loss,
        total_weight,
        row_correct,
        accuracy,
        predicted_tokens: opts
            .return_predicted_tokens
            .then(|| outs.iter().map(|o| o.predicted).collect()),
        entropy: opts
            .return_entropy
            .then(|| outs.iter().map(|o| o.entropy).collect()),
    })
}

/// The machine's cores, asked once: `available_parallelism` reads the cgroup's files each time
/// (tens of µs, more than a small call's work).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The fewest logits a thread of the CPU reference takes (about 0.5 ms of work): below, the rows
/// are computed on the calling thread.
const MIN_ELEMENTS_PER_THREAD: usize = 1 << 16;

/// What every row's computation shares: the options in f64 and the reduction's scales.
struct RowMath<'a> {
    /// Scale of the cross-entropy part of the gradient (`grad_scale / Σ w_c` for the mean).
    ce_scale: f64,
    /// Scale of the z-loss part of the gradient (`grad_scale / n_valid` for the mean).
    z_scale: f64,
    smoothing: f64,
    lse_square_scale: f64,
    softcap: Option<f64>,
    weight: Option<&'a [f32]>,
    /// `W = Σ_j w_j` over the whole vocabulary (`V` without weights).
    class_weight_sum: f64,
    accuracy: bool,
    predicted: bool,
    entropy: bool,
}

impl RowMath<'_> {
    /// The logit the softmax sees, and its derivative w.r.t. the logit as stored.
    fn capped(&self, x: f64) -> (f64, f64) {
        match self.softcap {
            Some(cap) => {
                let t = (x / cap).tanh();
                (cap * t, 1.0 - t * t)
            }
            None => (x, 1.0),
        }
    }

    fn weight(&self, class: usize) -> f64 {
        self.weight.map_or(1.0, |w| w[class] as f64)
    }
}

/// One row's results; all zero (not correct, predicted -1) for a row not scored.
#[derive(Clone, Copy, Debug)]
struct RowOut {
    /// Cross-entropy part of the row's loss (weighted, smoothed).
    ce: f64,
    /// z-loss part, `lse_square_scale·lse²`.
    z: f64,
    lse: f64,
    /// The first maximal logit is the label (only computed with `return_token_accuracy`).
    correct: bool,
    /// The first maximal logit's class (only computed with `return_predicted_tokens`; -1 for a
    /// row not scored or without classes).
    predicted: i64,
    /// The entropy of the row's softmax (only computed with `return_entropy`).
    entropy: f64,
}

impl RowOut {
    const UNSCORED: RowOut = RowOut {
        ce: 0.0,
        z: 0.0,
        lse: 0.0,
        correct: false,
        predicted: -1,
        entropy: 0.0,
    };
}

/// One row: returns its results and writes the gradient (times `factor`, plus `entropy_factor`
/// times the entropy's where given) over `row`; zeros for a row not scored.
fn row_forward_backward<T: Value>(
    row: &mut [T],
    target: Target,
    math: &RowMath,
    factor: f64,
    entropy_factor: Option<f64>,
) -> RowOut {
    let Target::Class(class) = target else {
        row.fill(T::narrow(0.0));
        return RowOut::UNSCORED;
    };
    let vocab = row.len() as f64;
    let capped = |x: &T| math.capped(x.widen()).0;
    let (max, ln_sum) = log_sum_exp_parts(row.iter().map(capped));
    let lse = max + ln_sum;
    // `lse - y` as `(max - y) + ln(sum)`: its error scales with the difference, not with the
    // logits' magnitude (the kernels compute it so too).
    let lse_minus = |y: f64| (max - y) + ln_sum;
    let smoothing = math.smoothing;
    let w_class = math.weight(class);
    // Without options: `(1 - 0)·1·(lse - x_c)`, the seed's loss exactly.
    let mut ce = (1.0 - smoothing) * w_class * lse_minus(capped(&row[class]));
    if smoothing > 0.0 {
        let smooth: f64 = row
            .iter()
            .enumerate()
            .map(|(j, x)| math.weight(j) * lse_minus(capped(x)))
            .sum();
        ce += smoothing / vocab * smooth;
    }
    let z = math.lse_square_scale * lse * lse;
    // The argmax, once, for token accuracy and the predicted tokens.
    let argmax = if math.accuracy || math.predicted {
        first_argmax(row)
    } else {
        None
    };
    let correct = math.accuracy && argmax == Some(class);
    let predicted = match (math.predicted, argmax) {
        (true, Some(j)) => j as i64,
        _ => -1,
    };

    // `Σ p·(lse - y)`, each term non-negative.
    let entropy = match math.entropy || entropy_factor.is_some() {
        true => row
            .iter()
            .map(|x| {
                // `d` is +inf for a logit of -inf (p = 0): the term's limit, 0.
                let d = lse_minus(capped(x));
                if d == f64::INFINITY {
                    0.0
                } else {
                    (-d).exp() * d
                }
            })
            .sum(),
        false => 0.0,
    };

    let onehot_coef = (1.0 - smoothing) * w_class * math.ce_scale * factor;
    let smooth_coef = smoothing / vocab * math.ce_scale * factor;
    let z_coef = 2.0 * math.lse_square_scale * lse * math.z_scale * factor;
    for (j, x) in row.iter_mut().enumerate() {
        let (y, dy_dx) = math.capped(x.widen());
        let p = (y - lse).exp();
        let onehot = if j == class { 1.0 } else { 0.0 };
        let mut grad = (p - onehot) * onehot_coef;
        if smoothing > 0.0 {
            grad += (math.class_weight_sum * p - math.weight(j)) * smooth_coef;
        }
        if math.lse_square_scale != 0.0 {
            grad += p * z_coef;
        }
        // `dH/dy = -p·(ln p + H) = p·(lse - y - H)`; 0 where `p` is (`y = -inf`).
        if let Some(e) = entropy_factor
            && p != 0.0
        {
            grad += e * p * (lse_minus(y) - entropy);
        }
        *x = T::narrow(grad * dy_dx);
    }
    RowOut {
        ce,
        z,
        lse,
        correct,
        predicted,
        entropy,
    }
}

/// Index of the first maximal value, as `torch.argmax` (a NaN counts as the maximum); `None` for
/// an empty row.
fn first_argmax<T: Value>(row: &[T]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (j, x) in row.iter().enumerate() {
        let x = x.widen();
        match best {
            Some((_, b)) if b.is_nan() => break,
            Some((_, b)) if !(x > b || x.is_nan()) => {}
            _ => best = Some((j, x)),
        }
    }
    best.map(|(j, _)| j)
}

/// `ln(sum exp(x))`, shifted by the maximum. NaN in, NaN out; all `-inf` gives `-inf`.
pub fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let (max, ln_sum) = log_sum_exp_parts(values);
    max + ln_sum
}

/// The log-sum-exp as `(max, ln Σ exp(x - max))`; `(-inf, 0)` when every value is -inf, NaN in
/// the second when a value is NaN and nothing is larger than -inf.
fn log_sum_exp_parts(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return if values.clone().any(f64::is_nan) {
            (f64::NEG_INFINITY, f64::NAN)
        } else {
            (f64::NEG_INFINITY, 0.0)
        };
    }
    (max, values.map(|x| (x - max).exp()).sum::<f64>().ln())
}

/// Scales a gradient in place by `upstream[0]`, or by `upstream[r]` for row `r` when it holds one
/// value per row (the seed's `element_mul`).
pub fn scale_grad<T: Element>(grad: &mut [T], shape: Shape, upstream: &[f32]) -> Result<()> {
    shape.validate(grad.len(), shape.rows())?;
    let rows = shape.rows();
    crate::options::check_upstream_len(rows, upstream.len())?;
    for r in 0..rows {
        let factor = upstream[if upstream.len() == 1 { 0 } else { r }] as f64;
        for x in &mut grad[r * shape.row_stride..r * shape.row_stride + shape.vocab] {
            *x = T::from_f64(x.to_f64() * factor);
        }
    }
    Ok(())
}
