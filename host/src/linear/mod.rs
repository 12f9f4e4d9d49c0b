//! Linear layer + cross-entropy (issue 12): the shape, the chunking of rows under a memory budget,
//! the f64 reference, and the GPU path ([`gpu`]: cuBLASLt GEMMs around xent's kernel, one chunk of
//! logits at a time).
//!
//! With hidden states `h: [N, D]`, the LM-head weight `W: [V, D]` and an optional bias `b: [V]`,
//! `logits = h·Wᵀ + b` and the loss is xent's of those logits with the same [`Options`]. With
//! `G = d loss / d logits` (`grad_scale` folded in, as xent writes it):
//! `grad_hidden = G·W` (`[N, D]`), `grad_weight = Gᵀ·h` (`[V, D]`), `grad_bias = Σ_rows G`.

pub mod gemm_tn;
pub mod gpu;
pub mod lse_gemm;
pub mod scheme;

pub use gpu::{
    LinearGrads, LinearPass, LinearScratch, LinearScratchLens, LinearShardScratchLens, RawGrad,
    RawLinearCall, RawLinearGrads, RawLinearScratch, RawLinearShardCall,
};
pub use scheme::{
    CardRates, ROW_SCHEME_MAX_ROWS, ROW_SCHEME_MIN_ROWS, row_scheme_min_rows, row_scheme_rows,
};

use crate::cpu::{self, CpuLoss};
use crate::error::{Error, Result};
use crate::options::{DType, Element, Label, Options, Shape};

/// The hidden states as `[batch, seq_len]` rows of `hidden` features, scored against `vocab`
/// classes; rows and labels contiguous (the causal shift works on `[batch, seq_len]` as in
/// [`Shape::batched`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl LinearShape {
    /// `[rows, hidden]` hidden states, one sequence.
    pub fn flat(rows: usize, hidden: usize, vocab: usize) -> LinearShape {
        LinearShape {
            batch: 1,
            seq_len: rows,
            hidden,
            vocab,
        }
    }

    /// Number of rows, `batch * seq_len` (saturating; `validate` rejects an overflow).
    pub fn rows(&self) -> usize {
        self.batch.saturating_mul(self.seq_len)
    }

    /// The logits' shape: `[batch, seq_len, vocab]`, contiguous.
    pub fn logits(&self) -> Shape {
        Shape::batched(self.batch, self.seq_len, self.vocab)
    }

    /// Checks the shape against the buffers' lengths (`bias` `None` without a bias).
    pub fn validate(
        &self,
        hidden_len: usize,
        weight_len: usize,
        bias_len: Option<usize>,
        labels_len: usize,
    ) -> Result<()> {
        if self.hidden == 0 {
            return Err(Error::BadShape("hidden size is 0".into()));
        }
        let rows = self
            .batch
            .checked_mul(self.seq_len)
            .ok_or_else(|| Error::BadShape("batch * seq_len overflows".into()))?;
        let product = |a: usize, b: usize, what: &str| {
            a.checked_mul(b)
                .ok_or_else(|| Error::BadShape(format!("{what} overflows")))
        };
        let need_hidden = product(rows, self.hidden, "rows * hidden")?;
        if hidden_len != need_hidden {
            return Err(Error::BadShape(format!(
                "hidden states hold {hidden_len} values, [{rows}, {}] needs {need_hidden}",
                self.hidden
            )));
        }
        let need_weight = product(self.vocab, self.hidden, "vocab * hidden")?;
        if weight_len != need_weight {
            return Err(Error::BadShape(format!(
                "the weight holds {weight_len} values, [{}, {}] needs {need_weight}",
                self.vocab, self.hidden
            )));
        }
        if let Some(len) = bias_len
            && len != self.vocab
        {
            return Err(Error::BadShape(format!(
                "the bias holds {len} values, it needs one per class ({})",
                self.vocab
            )));
        }
        self.logits().validate(rows * self.vocab, labels_len)
    }
}

/// The default memory budget of a call: an eighth of the whole `[N, V]` logits (the issue's
/// target: at most 1/8 of the unfused path's extra memory), and at least [`MIN_CHUNK_BYTES`], so
/// that a chunk keeps the GEMMs large enough to run at speed. Of it, [`GEMM_SHARE`] goes to
/// cuBLASLt's workspace ([`gemm_workspace_bytes`]) and the rest to a chunk of logits.
pub const DEFAULT_BUDGET_FRACTION: usize = 8;
/// The smallest default budget: 64 MiB holds 256 rows of a 128256-class bf16 vocabulary (Liger's
/// chunk).
pub const MIN_CHUNK_BYTES: usize = 64 << 20;
/// cuBLASLt's workspace takes 1/GEMM_SHARE of the default budget (between 4 and 32 MiB).
pub const GEMM_SHARE: usize = 16;

/// cuBLASLt's workspace for chunks of `logits_bytes`: a sixteenth of them, between 4 MiB and
/// 32 MiB (NVIDIA's advice for Hopper), plus 256 bytes the call keeps for itself.
pub fn gemm_workspace_bytes(logits_bytes: usize) -> usize {
    (logits_bytes / GEMM_SHARE).clamp(4 << 20, 32 << 20) + 256
}

/// The default memory of a call's chunks (a chunk of logits and cuBLASLt's workspace together):
/// [`DEFAULT_BUDGET_FRACTION`] of the whole `[rows, vocab]` logits, at least [`MIN_CHUNK_BYTES`].
pub fn default_budget_bytes(rows: usize, vocab: usize, dtype: DType) -> usize {
    let logits = rows.saturating_mul(vocab).saturating_mul(dtype.bytes());
    (logits / DEFAULT_BUDGET_FRACTION).max(MIN_CHUNK_BYTES)
}

/// The memory a call of `rows` rows may give its chunks: `budget_bytes` of logits (the caller's)
/// and cuBLASLt's workspace for them, or, without a budget, [`default_budget_bytes`] (the
/// workspace inside it). What a caller that holds other memory for the call (a copy of its scored
/// rows, say) subtracts that from, to keep the call within the same budget
/// ([`logits_budget_within`]).
pub fn chunks_budget_bytes(
    rows: usize,
    vocab: usize,
    dtype: DType,
    budget_bytes: Option<usize>,
) -> usize {
    match budget_bytes {
        Some(budget) => budget.saturating_add(gemm_workspace_bytes(budget)),
        None => default_budget_bytes(rows, vocab, dtype),
    }
}

/// The largest budget of logits whose chunk and cuBLASLt's workspace for it
/// ([`gemm_workspace_bytes`]) take at most `total` bytes together; 0 where the workspace alone
/// does not fit.
pub fn logits_budget_within(total: usize) -> usize {
    let fits = |logits: usize| logits.saturating_add(gemm_workspace_bytes(logits)) <= total;
    if !fits(0) {
        return 0;
    }
    // `logits + workspace(logits)` grows with `logits`: the last that fits, by bisection.
    let (mut lo, mut hi) = (0, total);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) { lo = mid } else { hi = mid - 1 }
    }
    lo
}

/// Rows per chunk of logits for `rows` rows of `vocab` classes of `dtype` under `budget_bytes`
/// (`None`: the default, [`DEFAULT_BUDGET_FRACTION`] of the whole logits but at least
/// [`MIN_CHUNK_BYTES`], less cuBLASLt's share): at least 1 and at most `rows`. The rows are
/// split into as few chunks of equal size as fit (the last one may be shorter), rounded to whole
/// GEMM tiles ([`chunk_granule`] rows) or to 16 rows where whole tiles would not fit.
pub fn chunk_rows(rows: usize, vocab: usize, dtype: DType, budget_bytes: Option<usize>) -> usize {
    let row_bytes = vocab.saturating_mul(dtype.bytes()).max(1);
    let budget = budget_bytes.unwrap_or_else(|| {
        let total = default_budget_bytes(rows, vocab, dtype);
        total - total / GEMM_SHARE
    });
    let rows = rows.max(1);
    let fit = (budget / row_bytes).clamp(1, rows);
    if fit >= rows {
        return rows;
    }
    let granule = chunk_granule(fit);
    if granule == 1 {
        return fit;
    }
    // As few chunks as fit, of equal size rounded up to the granule, else to 16 rows (a short
    // last chunk costs more than a partial tile: H200, 8192 x 4096 x 128256 bf16, nine chunks of
    // 912 rows 40.76 / 41.63 ms against 41.39 / 42.17 for nine of 896 and a tail of 128), else
    // down to the granule (one chunk more).
    let chunks = rows.div_ceil(fit);
    let even = rows.div_ceil(chunks);
    let (whole, sixteens) = (even.next_multiple_of(granule), even.next_multiple_of(16));
    if whole <= fit {
        whole
    } else if granule > 16 && sixteens <= fit {
        sixteens
    } else {
        fit / granule * granule
    }
}

/// Rows per chunk of a call over one rank's shard of a head split by vocabulary (`vocab` classes
/// over `world` ranks): [`chunk_rows`] over the widest shard of the even split, whatever this
/// rank's width. Every rank chunks its rows alike (each chunk's summaries meet in one all-gather:
/// ranks of uneven shards sizing chunks by their own widths could disagree, 17 of 24265 shapes
/// at the default budget and most at a given one), and no shard of the even split holds more
/// logits than the budget.
pub fn shard_chunk_rows(
    rows: usize,
    vocab: usize,
    world: usize,
    dtype: DType,
    budget_bytes: Option<usize>,
) -> usize {
    chunk_rows(rows, vocab.div_ceil(world.max(1)), dtype, budget_bytes)
}

/// The multiple a chunk of `fit` rows is rounded to first: 128 (a whole tile of cuBLASLt's
/// kernels on the rows' side) from 512 rows; 32 from 128 (a 224-row chunk, Liger's memory less
/// cuBLASLt's, would otherwise round down to 128), 8 from 8, else 1. [`chunk_rows`] takes 16
/// where the granule would cost a chunk more.
pub fn chunk_granule(fit: usize) -> usize {
    match fit {
        512.. => 128,
        128..=511 => 32,
        8..=127 => 8,
        _ => 1,
    }
}

/// Classes per block of the vocabulary-blocked backward ([`gpu`]): the block's `[rows, block]`
/// logits fit where `chunk` rows of the whole vocabulary do; a multiple of 64 when at least 64
/// (GEMM tiles), of 8 otherwise, at least 8 and at most `vocab`.
pub fn vocab_block(rows: usize, vocab: usize, chunk: usize) -> usize {
    let fit = chunk.saturating_mul(vocab) / rows.max(1);
    let block = if fit >= 64 {
        fit / 64 * 64
    } else {
        (fit / 8 * 8).max(8)
    };
    block.min(vocab)
}

/// The results of the reference: the loss (as [`cpu::forward_backward`] reports it) and the
/// gradients, unrounded.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuLinear {
    pub loss: CpuLoss,
    /// `[N, D]`.
    pub grad_hidden: Vec<f64>,
    /// `[V, D]`.
    pub grad_weight: Vec<f64>,
    /// `[V]`, with a bias.
    pub grad_bias: Option<Vec<f64>>,
}

/// The f64 reference of linear + cross-entropy: logits `h·Wᵀ + b` in f64 (not rounded to `T`),
/// xent's CPU reference on them (every option, the causal shift), then the gradients of the
/// hidden states, the weight and the bias. O(N·V·D): for tests and small shapes.
pub fn cpu_forward_backward<T: Element, L: Label>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    labels: &[L],
    shape: LinearShape,
    opts: &Options,
) -> Result<CpuLinear> {
    cpu_forward_backward_upstream(hidden, weight, bias, labels, shape, opts, &[1.0])
}

/// [`cpu_forward_backward`] with the gradients of `upstream · loss`: `upstream` one value, or one
/// per row for [`Reduction::None`](crate::Reduction::None) (as
/// [`cpu::forward_backward_upstream`] takes it).
pub fn cpu_forward_backward_upstream<T: Element, L: Label>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    labels: &[L],
    shape: LinearShape,
    opts: &Options,
    upstream: &[f32],
) -> Result<CpuLinear> {
    shape.validate(
        hidden.len(),
        weight.len(),
        bias.map(<[T]>::len),
        labels.len(),
    )?;
    let (rows, d, v) = (shape.rows(), shape.hidden, shape.vocab);
    let h = |r: usize, k: usize| hidden[r * d + k].to_f64();
    let w = |j: usize, k: usize| weight[j * d + k].to_f64();
    let mut logits = vec![0.0f64; rows * v];
    for r in 0..rows {
        for j in 0..v {
            let dot: f64 = (0..d).map(|k| h(r, k) * w(j, k)).sum();
            logits[r * v + j] = dot + bias.map_or(0.0, |b| b[j].to_f64());
        }
    }
    // The gradient of the logits, written over them (f64: not rounded).
    let loss = cpu::forward_backward_upstream(&mut logits, labels, shape.logits(), opts, upstream)?;
    let g = &logits;
    let mut grad_hidden = vec![0.0f64; rows * d];
    let mut grad_weight = vec![0.0f64; v * d];
    for r in 0..rows {
        for j in 0..v {
            let gij = g[r * v + j];
            if gij == 0.0 {
                continue;
            }
            for k in 0..d {
                grad_hidden[r * d + k] += gij * w(j, k);
                grad_weight[j * d + k] += gij * h(r, k);
            }
        }
    }
    let grad_bias = bias.map(|_| {
        (0..v)
            .map(|j| (0..rows).map(|r| g[r * v + j]).sum())
            .collect()
    });
    Ok(CpuLinear {
        loss,
        grad_hidden,
        grad_weight,
        grad_bias,
    })
}
