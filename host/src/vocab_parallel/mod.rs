//! Vocabulary-parallel cross-entropy (issue 15), the protocol and its f64 model: with the LM head
//! split by vocabulary, rank `r` holds logits `[N, width_r]` for the classes
//! `[start_r, start_r + width_r)` of a `vocab`-class row and never sees a whole row.
//!
//! One collective per call (TransformerEngine's scheme, with label smoothing, token accuracy and
//! the entropies):
//! 1. every rank summarises each row of its shard in [`STATS_WORDS`] numbers ([`RowStats`]):
//!    the shard's largest (soft-capped) logit `max`, `sum = Σ exp(y_j - max)`, the weighted sum
//!    `Σ w_j·y_j` (label smoothing's), the label's logit when the label is one of its classes
//!    (else 0), the first column of its largest raw logit (token accuracy) and
//!    `Σ exp(y_j - max)·(y_j - max)` (the entropy's);
//! 2. one all-gather of those stats (`P · N · STATS_WORDS` values);
//! 3. every rank merges the P summaries of each row into the row's log-sum-exp and loss (the
//!    same on every rank) and writes the gradient of its own columns.
//!
//! This module is the protocol in f64 on the CPU ([`cpu_shard_stats`], [`cpu_shard_backward`]),
//! checked against xent's CPU reference over the whole vocabulary (`tests/vocab_parallel.rs`),
//! and on the GPU ([`ShardCall`], `CrossEntropy::raw_shard_stats` / `raw_shard_backward`,
//! `gpu.rs`), whose first kernel's stats are the chunked plan's partials: its collective carries
//! those instead of the five words per row of the CPU model.

mod gpu;

pub use gpu::{Collective, ShardCall, ShardLayout};

use crate::cpu::{CpuLoss, Value};
use crate::error::{Error, Result};
use crate::options::{Label, Options, Reduction, Shape, Target, row_target};

/// Numbers per row per rank in the collective: max, sum, weighted sum, label logit, argmax,
/// the entropy's sum.
pub const STATS_WORDS: usize = 6;

/// A rank's slice of the vocabulary: classes `start..start + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub start: usize,
    pub width: usize,
}

impl Shard {
    /// `vocab` classes over `world` ranks, as even as can be: the first `vocab % world` ranks
    /// take one class more (Megatron's split). Errors for no ranks or more ranks than classes.
    pub fn split(vocab: usize, world: usize) -> Result<Vec<Shard>> {
        if world == 0 || world > vocab {
            return Err(Error::InvalidOption(format!(
                "{vocab} classes cannot be split over {world} ranks"
            )));
        }
        let (base, extra) = (vocab / world, vocab % world);
        let mut start = 0;
        Ok((0..world)
            .map(|r| {
                let width = base + usize::from(r < extra);
                let shard = Shard { start, width };
                start += width;
                shard
            })
            .collect())
    }

    /// Whether the class is this shard's.
    pub fn owns(&self, class: usize) -> bool {
        (self.start..self.start + self.width).contains(&class)
    }

    /// The shape of this shard's logits, packed (`row_stride` = `width`), of a call of shape
    /// `whole` over the whole vocabulary.
    pub fn shape_in(&self, whole: Shape) -> Shape {
        Shape {
            vocab: self.width,
            row_stride: self.width,
            ..whole
        }
    }

    /// This shard's columns of every row of `logits` (shape `whole`), packed: the logits a rank
    /// of a vocabulary-parallel LM head holds.
    pub fn columns<T: Clone>(&self, logits: &[T], whole: Shape) -> Vec<T> {
        (0..whole.rows())
            .flat_map(|r| {
                let at = r * whole.row_stride + self.start;
                logits[at..at + self.width].iter().cloned()
            })
            .collect()
    }
}

/// One row of one shard, as the collective carries it (f64 in this model, f32 on the GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowStats {
    /// The shard's largest (soft-capped) logit; -inf for a row not scored.
    pub max: f64,
    /// `Σ exp(y_j - max)` over the shard.
    pub sum: f64,
    /// `Σ w_j·y_j` over the shard (`w_j` 1 without class weights).
    pub weighted: f64,
    /// The label's (soft-capped) logit if the label is the shard's, else 0.
    pub label: f64,
    /// The first column (in the whole vocabulary) of the shard's largest raw logit, with its
    /// value (NaN first, as `argmax` treats it).
    pub argmax: Option<(usize, f64)>,
    /// `Σ exp(y_j - max)·(y_j - max)` over the shard (at most 0; a logit of -inf adds 0): with
    /// `sum`, the row's entropy once the ranks' are merged.
    pub ent: f64,
}

impl RowStats {
    const UNSCORED: RowStats = RowStats {
        max: f64::NEG_INFINITY,
        sum: 0.0,
        weighted: 0.0,
        label: 0.0,
        argmax: None,
        ent: 0.0,
    };
}

/// The soft-capped logit and its derivative w.r.t. the logit as stored.
fn capped(softcap: Option<f32>, x: f64) -> (f64, f64) {
    match softcap {
        Some(cap) => {
            let cap = cap as f64;
            let t = (x / cap).tanh();
            (cap * t, 1.0 - t * t)
        }
        None => (x, 1.0),
    }
}

fn class_weight(opts: &Options, class: usize) -> f64 {
    opts.weight.as_deref().map_or(1.0, |w| w[class] as f64)
}

/// Checks a shard's call: `shape` is the shard's `[rows, width]` layout (batch and sequence as
/// the whole call's, for the causal shift), and returns the whole vocabulary's shape.
fn whole_shape(shape: &Shape, shard: Shard, vocab: usize, opts: &Options) -> Result<Shape> {
    if shard.width == 0 || shard.start + shard.width > vocab || shape.vocab != shard.width {
        return Err(Error::InvalidOption(format!(
            "shard [{}, {}) of {vocab} classes with rows of {}",
            shard.start,
            shard.start + shard.width,
            shape.vocab
        )));
    }
    opts.validate(vocab)?;
    Ok(Shape {
        vocab,
        row_stride: vocab,
        ..*shape
    })
}

/// The targets of every row against the whole vocabulary (an error for a label out of range).
fn targets<L: Label>(labels: &[L], whole: &Shape, opts: &Options) -> Result<Vec<Target>> {
    let targets: Vec<Target> = (0..whole.rows())
        .map(|r| row_target(labels, whole, opts, r))
        .collect();
    if let Some((row, label)) = targets.iter().enumerate().find_map(|(r, t)| match t {
        Target::OutOfRange(label) => Some((r, *label)),
        _ => None,
    }) {
        let count = targets
            .iter()
            .filter(|t| matches!(t, Target::OutOfRange(_)))
            .count();
        return Err(Error::LabelOutOfRange {
            count,
            row: Some(row),
            label: Some(label),
        });
    }
    Ok(targets)
}

/// Step 1 on one rank: the stats of every row of its shard (`logits` `[rows, width]` laid out as
/// `shape`), against the global `labels`.
pub fn cpu_shard_stats<T: Value, L: Label>(
    logits: &[T],
    labels: &[L],
    shape: Shape,
    shard: Shard,
    vocab: usize,
    opts: &Options,
) -> Result<Vec<RowStats>> {
    let whole = whole_shape(&shape, shard, vocab, opts)?;
    shape.validate(logits.len(), labels.len())?;
    let targets = targets(labels, &whole, opts)?;
    Ok(targets
        .iter()
        .enumerate()
        .map(|(r, target)| {
            let Target::Class(class) = *target else {
                return RowStats::UNSCORED;
            };
            let row = &logits[r * shape.row_stride..r * shape.row_stride + shard.width];
            let y: Vec<f64> = row
                .iter()
                .map(|x| capped(opts.softcap, x.widen()).0)
                .collect();
            let max = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let (sum, ent) = if max == f64::NEG_INFINITY {
                (0.0, 0.0)
            } else {
                let terms = y.iter().filter(|&&v| v != f64::NEG_INFINITY);
                (
                    terms.clone().map(|v| (v - max).exp()).sum(),
                    terms.map(|v| (v - max).exp() * (v - max)).sum(),
                )
            };
            let weighted = y
                .iter()
                .enumerate()
                .map(|(j, v)| class_weight(opts, shard.start + j) * v)
                .sum();
            let label = if shard.owns(class) {
                y[class - shard.start]
            } else {
                0.0
            };
            let mut argmax: Option<(usize, f64)> = None;
            for (j, x) in row.iter().enumerate() {
                let x = x.widen();
                match argmax {
                    Some((_, b)) if b.is_nan() => break,
                    Some((_, b)) if !(x > b || x.is_nan()) => {}
                    _ => argmax = Some((shard.start + j, x)),
                }
            }
            RowStats {
                max,
                sum,
                weighted,
                label,
                argmax,
                ent,
            }
        })
        .collect())
}

/// One row's P summaries merged.
struct Merged {
    max: f64,
    /// `ln Σ exp(y - max)` over the whole row.
    ln_sum: f64,
    label: f64,
    weighted: f64,
    argmax: Option<usize>,
    /// The entropy of the row's softmax: `ln S - T / S` with `S = Σ exp(y - max)` and
    /// `T = Σ exp(y - max)·(y - max)`; NaN where no logit is finite.
    entropy: f64,
}

fn merge(parts: &[&RowStats]) -> Merged {
    let max = parts
        .iter()
        .map(|p| p.max)
        .fold(f64::NEG_INFINITY, f64::max);
    // A shard without a finite logit (max -inf) holds no mass.
    let massive = || parts.iter().filter(|p| p.max != f64::NEG_INFINITY);
    let sum: f64 = massive().map(|p| p.sum * (p.max - max).exp()).sum();
    let t: f64 = massive()
        .map(|p| (p.max - max).exp() * (p.ent + p.sum * (p.max - max)))
        .sum();
    let label = parts.iter().map(|p| p.label).sum();
    let weighted = parts.iter().map(|p| p.weighted).sum();
    let mut argmax: Option<(usize, f64)> = None;
    for &(j, x) in parts.iter().filter_map(|p| p.argmax.as_ref()) {
        match argmax {
            Some((_, b)) if b.is_nan() => break,
            Some((_, b)) if !(x > b || x.is_nan()) => {}
            _ => argmax = Some((j, x)),
        }
    }
    Merged {
        max,
        ln_sum: sum.ln(),
        label,
        weighted,
        argmax: argmax.map(|(j, _)| j),
        entropy: sum.ln() - t / sum,
    }
}

/// Step 3 on one rank: from every rank's stats (`gathered`, in shard order, each one per row),
/// the loss (the same on every rank; per-row losses and log-sum-exps as xent reports them, and
/// with `return_entropy` the entropies over the whole vocabulary) and the gradient of
/// `upstream · loss` (one value, or one per row) w.r.t. this shard's logits, written over them.
#[allow(clippy::too_many_arguments)]
pub fn cpu_shard_backward<T: Value, L: Label>(
    logits: &mut [T],
    labels: &[L],
    shape: Shape,
    shard: Shard,
    vocab: usize,
    opts: &Options,
    gathered: &[Vec<RowStats>],
    upstream: &[f32],
) -> Result<CpuLoss> {
    cpu_shard_backward_entropy(
        logits, labels, shape, shard, vocab, opts, gathered, upstream, None,
    )
}

/// [`cpu_shard_backward`] with the entropies' gradient added where `entropy_upstream` is given
/// (one value a row): the gradient of `upstream · loss + Σ_r entropy_upstream[r]·H_r` w.r.t.
/// this shard's logits, `H_r` row `r`'s entropy over the whole vocabulary, as
/// [`crate::cpu::forward_backward_entropy`] computes it on the whole rows.
#[allow(clippy::too_many_arguments)]
pub fn cpu_shard_backward_entropy<T: Value, L: Label>(
    logits: &mut [T],
    labels: &[L],
    shape: Shape,
    shard: Shard,
    vocab: usize,
    opts: &Options,
    gathered: &[Vec<RowStats>],
    upstream: &[f32],
    entropy_upstream: Option<&[f32]>,
) -> Result<CpuLoss> {
    let whole = whole_shape(&shape, shard, vocab, opts)?;
    shape.validate(logits.len(), labels.len())?;
    let rows = shape.rows();
    crate::options::check_upstream_len(rows, upstream.len())?;
    if let Some(e) = entropy_upstream {
        crate::options::check_entropy_upstream(rows, e.len())?;
    }
    if gathered.is_empty() || gathered.iter().any(|g| g.len() != rows) {
        return Err(Error::InvalidOption(format!(
            "the gathered stats must hold {rows} rows from each rank"
        )));
    }
    let targets = targets(labels, &whole, opts)?;
    let classes: Vec<usize> = targets
        .iter()
        .filter_map(|t| match t {
            Target::Class(c) => Some(*c),
            _ => None,
        })
        .collect();
    let n_valid = classes.len();
    let total_weight: f64 = classes.iter().map(|&c| class_weight(opts, c)).sum();
    let (ce_scale, z_scale) = match opts.reduction {
        Reduction::Mean => (
            opts.grad_scale as f64 / total_weight,
            opts.grad_scale as f64 / n_valid as f64,
        ),
        Reduction::Sum | Reduction::None => (opts.grad_scale as f64, opts.grad_scale as f64),
    };
    let eps = opts.label_smoothing as f64;
    let s = opts.lse_square_scale as f64;
    let class_weight_sum: f64 = opts
        .weight
        .as_deref()
        .map_or(vocab as f64, |w| w.iter().map(|&x| x as f64).sum());
    let (mut ce_sum, mut z_sum, mut hits) = (0.0, 0.0, 0usize);
    let mut row_loss = vec![0.0; rows];
    let mut row_lse = vec![0.0; rows];
    let mut row_correct = vec![false; rows];
    let mut entropy = vec![0.0; rows];
    for (r, target) in targets.iter().enumerate() {
        let row = &mut logits[r * shape.row_stride..r * shape.row_stride + shard.width];
        let Target::Class(class) = *target else {
            row.fill(T::narrow(0.0));
            continue;
        };
        let parts: Vec<&RowStats> = gathered.iter().map(|g| &g[r]).collect();
        let Merged {
            max,
            ln_sum,
            label: y_label,
            weighted,
            argmax,
            entropy: h,
        } = merge(&parts);
        let lse = max + ln_sum;
        entropy[r] = h;
        let w_class = class_weight(opts, class);
        let mut ce = (1.0 - eps) * w_class * ((max - y_label) + ln_sum);
        if eps > 0.0 {
            ce += eps / vocab as f64 * (class_weight_sum * lse - weighted);
        }
        let z = s * lse * lse;
        ce_sum += ce;
        z_sum += z;
        row_loss[r] = ce + z;
        row_lse[r] = lse;
        row_correct[r] = argmax == Some(class);
        hits += usize::from(row_correct[r]);
        let factor = upstream[if upstream.len() == 1 { 0 } else { r }] as f64;
        let onehot_coef = (1.0 - eps) * w_class * ce_scale * factor;
        let smooth_coef = eps / vocab as f64 * ce_scale * factor;
        let z_coef = 2.0 * s * lse * z_scale * factor;
        let entropy_factor = entropy_upstream.map(|e| e[r] as f64);
        for (j, x) in row.iter_mut().enumerate() {
            let column = shard.start + j;
            let (y, dy_dx) = capped(opts.softcap, x.widen());
            let p = (y - lse).exp();
            let onehot = if column == class { 1.0 } else { 0.0 };
            let mut grad = (p - onehot) * onehot_coef;
            if eps > 0.0 {
                grad += (class_weight_sum * p - class_weight(opts, column)) * smooth_coef;
            }
            if s != 0.0 {
                grad += p * z_coef;
            }
            // `dH/dy = p·(lse - y - H)`; 0 where `p` is (`y = -inf`).
            if let Some(e) = entropy_factor
                && p != 0.0
            {
                grad += e * p * ((max - y) + ln_sum - h);
            }
            *x = T::narrow(grad * dy_dx);
        }
    }
    let ce_loss = match opts.reduction {
        Reduction::Mean => ce_sum / total_weight,
        Reduction::Sum | Reduction::None => ce_sum,
    };
    let z_loss = match opts.reduction {
        _ if s == 0.0 => 0.0,
        Reduction::Mean => z_sum / n_valid as f64,
        Reduction::Sum | Reduction::None => z_sum,
    };
    let (row_correct, accuracy) = if opts.return_token_accuracy {
        (Some(row_correct), Some(hits as f64 / n_valid as f64))
    } else {
        (None, None)
    };
    Ok(CpuLoss {
        loss: ce_loss + z_loss,
        row_loss,
        row_lse,
        n_valid,
        z_loss,
        total_weight,
        row_correct,
        accuracy,
        predicted_tokens: None,
        entropy: opts.return_entropy.then_some(entropy),
    })
}
