//! The CPU implementation of the same API, accumulating in f64: the oracle the GPU tests compare
//! against, and the fallback where no CUDA device exists.
//!
//! Row `r` with target class `c`: `lse = ln(sum_j exp(x_j))` (max-shifted), `loss = lse - x_c`,
//! `grad_j = (exp(x_j - lse) - [j == c]) * scale` with `scale = grad_scale / n_valid` for the mean
//! and `grad_scale` otherwise, rounded once to the element type. Ignored rows: loss, lse and
//! gradient 0.

use crate::error::{Error, Result};
use crate::options::{Element, Label, Options, Reduction, Shape, Target, row_target};

/// Results of a CPU call, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuLoss {
    /// The reduced loss (`none`: the sum of the per-row losses). NaN for a mean over no rows.
    pub loss: f64,
    /// Per-row loss (0 for ignored rows).
    pub row_loss: Vec<f64>,
    /// Per-row natural log-sum-exp (0 for ignored rows).
    pub row_lse: Vec<f64>,
    /// Rows whose label is a class (not ignored).
    pub n_valid: usize,
}

/// The gradient's scale for `n_valid` scored rows.
pub fn grad_scale(opts: &Options, n_valid: usize) -> f64 {
    match opts.reduction {
        Reduction::Mean => opts.grad_scale as f64 / n_valid as f64,
        Reduction::Sum | Reduction::None => opts.grad_scale as f64,
    }
}

/// Loss and gradient of `logits` (`shape`), the gradient written in place.
///
/// Fails before touching `logits` on a bad shape or a label out of range (the GPU path reports the
/// latter when its loss is read).
pub fn forward_backward<T: Element, L: Label>(
    logits: &mut [T],
    labels: &[L],
    shape: Shape,
    opts: &Options,
) -> Result<CpuLoss> {
    shape.validate(logits.len(), labels.len())?;
    let rows = shape.rows();
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
    let n_valid = targets
        .iter()
        .filter(|t| matches!(t, Target::Class(_)))
        .count();
    let scale = grad_scale(opts, n_valid);

    // Rows are independent once `scale` is known: split them over the machine's cores.
    let mut row_loss = vec![0.0; rows];
    let mut row_lse = vec![0.0; rows];
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    let per_worker = rows.div_ceil(workers.max(1)).max(1);
    std::thread::scope(|scope| {
        let mut rest = &mut logits[..];
        let mut outputs = row_loss
            .chunks_mut(per_worker)
            .zip(row_lse.chunks_mut(per_worker));
        for first in (0..rows).step_by(per_worker) {
            let count = per_worker.min(rows - first);
            let len = if first + count == rows {
                rest.len()
            } else {
                count * shape.row_stride
            };
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            let (losses, lses) = outputs.next().expect("one output chunk per worker");
            let targets = &targets[first..first + count];
            scope.spawn(move || {
                for (i, target) in targets.iter().enumerate() {
                    let start = i * shape.row_stride;
                    let row = &mut mine[start..start + shape.vocab];
                    (losses[i], lses[i]) = row_forward_backward(row, *target, scale);
                }
            });
        }
    });
    let sum: f64 = row_loss.iter().sum();
    let loss = match opts.reduction {
        Reduction::Mean => sum / n_valid as f64,
        Reduction::Sum | Reduction::None => sum,
    };
    Ok(CpuLoss {
        loss,
        row_loss,
        row_lse,
        n_valid,
    })
}

/// One row: returns (loss, lse) and writes the gradient over `row`; zeros for a row not scored.
fn row_forward_backward<T: Element>(row: &mut [T], target: Target, scale: f64) -> (f64, f64) {
    let Target::Class(class) = target else {
        row.fill(T::from_f64(0.0));
        return (0.0, 0.0);
    };
    let lse = log_sum_exp(row.iter().map(|x| x.to_f64()));
    let loss = lse - row[class].to_f64();
    for (j, x) in row.iter_mut().enumerate() {
        let p = (x.to_f64() - lse).exp();
        let onehot = if j == class { 1.0 } else { 0.0 };
        *x = T::from_f64((p - onehot) * scale);
    }
    (loss, lse)
}

/// `ln(sum exp(x))`, shifted by the maximum. NaN in, NaN out; all `-inf` gives `-inf`.
pub fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return if values.clone().any(f64::is_nan) {
            f64::NAN
        } else {
            f64::NEG_INFINITY
        };
    }
    max + values.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// Scales a gradient in place by `upstream[0]`, or by `upstream[r]` for row `r` when it holds one
/// value per row (the seed's `element_mul`).
pub fn scale_grad<T: Element>(grad: &mut [T], shape: Shape, upstream: &[f32]) -> Result<()> {
    shape.validate(grad.len(), shape.rows())?;
    let rows = shape.rows();
    if upstream.len() != 1 && upstream.len() != rows {
        return Err(Error::UpstreamLength {
            rows,
            len: upstream.len(),
        });
    }
    for r in 0..rows {
        let factor = upstream[if upstream.len() == 1 { 0 } else { r }] as f64;
        for x in &mut grad[r * shape.row_stride..r * shape.row_stride + shape.vocab] {
            *x = T::from_f64(x.to_f64() * factor);
        }
    }
    Ok(())
}
