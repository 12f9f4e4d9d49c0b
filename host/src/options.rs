//! What a call computes: the logits' shape, the options (PyTorch's names and defaults), the
//! element and label types, and the validation shared by the GPU and CPU paths.

use crate::error::{Error, Result};
use crate::plan::PlanChoice;

/// How the per-row losses are reduced, as PyTorch's `reduction`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// Per-row losses; the scalar loss is their sum, and the gradient is that of the sum.
    None,
    /// Mean over rows whose label is not ignored (PyTorch's default).
    #[default]
    Mean,
    /// Sum over rows.
    Sum,
}

impl Reduction {
    pub(crate) fn code(self) -> u32 {
        match self {
            Reduction::None => crate::abi::REDUCTION_NONE,
            Reduction::Mean => crate::abi::REDUCTION_MEAN,
            Reduction::Sum => crate::abi::REDUCTION_SUM,
        }
    }
}

/// Options of a cross-entropy call. Every field has PyTorch's default where PyTorch has one.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Rows whose label equals this get zero loss and zero gradient. Default -100.
    pub ignore_index: i64,
    /// Default [`Reduction::Mean`].
    pub reduction: Reduction,
    /// Multiplies the gradient: a scale known at forward time (1 / accumulation steps, a loss
    /// scale) costs nothing extra here. Must be finite (else `InvalidOption`). Default 1.
    pub grad_scale: f32,
    /// Causal-LM shift: position `t` of each sequence is scored against label `t + 1` of the same
    /// sequence and the last position gets zero loss and gradient, without copying anything.
    /// Default false.
    pub causal_shift: bool,
    /// Which kernels to run. Default [`PlanChoice::Auto`].
    pub plan: PlanChoice,
    /// PyTorch's `label_smoothing` ε in `[0, 1]`: the target distribution of a row with class `c`
    /// becomes `(1 - ε)·onehot(c) + ε/V` (`V = vocab`). With `x` the logits (after
    /// [`softcap`](Self::softcap)), `lse = ln Σ_j e^{x_j}` and class weights `w` (all 1 without
    /// [`weight`](Self::weight)), a scored row's loss is
    /// `(1 - ε)·w_c·(lse - x_c) + (ε/V)·Σ_j w_j·(lse - x_j)`, as PyTorch's
    /// `cross_entropy_loss_label_smoothing` (only the first term carries `w_c`; the smoothing
    /// term weights each class by its own `w_j`); its gradient is
    /// `(1 - ε)·w_c·(softmax - onehot(c)) + (ε/V)·(W·softmax - w)` with `W = Σ_j w_j`
    /// (unweighted: `softmax - (1 - ε)·onehot(c) - ε/V`), times the reduction's scale.
    /// Default 0 (off).
    pub label_smoothing: f32,
    /// z-loss coefficient `s >= 0` (Liger's `lse_square_scale`, from PaLM): adds `s·lse²` to
    /// each scored row's loss, and `2·s·lse·softmax` to its gradient. As in Liger, the z-loss is
    /// not multiplied by class weights and its mean divides by the number of scored rows
    /// (`n_valid`), also when [`weight`](Self::weight) is set. Default 0 (off).
    pub lse_square_scale: f32,
    /// Logit soft-capping (Gemma 2): each logit `x` is replaced by `cap·tanh(x / cap)` before
    /// everything else (log-sum-exp, loss, smoothing), and the gradient flows through it:
    /// `d/dx = (1 - tanh²(x / cap))·(gradient w.r.t. the capped logit)`. Must be finite and
    /// positive. Default `None` (off).
    pub softcap: Option<f32>,
    /// PyTorch's per-class `weight` (one finite value per vocabulary entry): a scored row's
    /// negative log-likelihood is multiplied by `w[class]`, and [`Reduction::Mean`] divides the
    /// sum of the row losses by `Σ w[class]` over the scored rows (PyTorch's `total_weight`)
    /// instead of their count. With label smoothing see [`label_smoothing`](Self::label_smoothing).
    /// Default `None` (every weight 1).
    pub weight: Option<Vec<f32>>,
    /// Liger's `return_token_accuracy`: also report, per scored row, whether the first maximal
    /// logit (`torch.argmax`) is the label, and their fraction over the scored rows. The argmax is
    /// taken over the logits as given (before [`softcap`](Self::softcap), which preserves their
    /// order). Default false.
    pub return_token_accuracy: bool,
    /// Liger's `return_predicted_tokens`: also report each scored row's first maximal logit's
    /// class (`torch.argmax` of the logits as given, as token accuracy takes it; -1 for a row
    /// not scored). One more read of the logits (a kernel of its own, before the loss's), so it
    /// costs about half the loss's own time. Not an option of the loss: the kernels that compute
    /// it are the same with it on or off. Default false.
    pub return_predicted_tokens: bool,
    /// Also report each scored row's entropy, `-Σ p·ln p` over its softmax (of the soft-capped
    /// logits where [`softcap`](Self::softcap) is set: the distribution the loss scores), in
    /// nats, 0 for a row not scored (TRL's and the RL trainers' per-token entropy). No gradient
    /// flows through it. One more read of the logits, as the predicted tokens take (a kernel of
    /// its own, before the loss's). Default false.
    pub return_entropy: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ignore_index: -100,
            reduction: Reduction::Mean,
            grad_scale: 1.0,
            causal_shift: false,
            plan: PlanChoice::Auto,
            label_smoothing: 0.0,
            lse_square_scale: 0.0,
            softcap: None,
            weight: None,
            return_token_accuracy: false,
            return_predicted_tokens: false,
            return_entropy: false,
        }
    }
}

impl Options {
    /// Checks the option values for logits of `vocab` classes; the error names the option.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        self.validate_except_weight_values(vocab)?;
        match &self.weight {
            Some(weight) => check_weight_values(weight),
            None => Ok(()),
        }
    }

    /// `validate` without the O(vocab) scan of the class weights' values (their count is
    /// checked): the GPU path scans them only when they differ from the ones it uploaded last.
    pub(crate) fn validate_except_weight_values(&self, vocab: usize) -> Result<()> {
        let smoothing = self.label_smoothing;
        if !(0.0..=1.0).contains(&smoothing) {
            return Err(Error::InvalidOption(format!(
                "label_smoothing must be in [0, 1], got {smoothing}"
            )));
        }
        let g = self.grad_scale;
        if !g.is_finite() {
            return Err(Error::InvalidOption(format!(
                "grad_scale must be finite, got {g}"
            )));
        }
        let z = self.lse_square_scale;
        if !z.is_finite() || z < 0.0 {
            return Err(Error::InvalidOption(format!(
                "lse_square_scale must be finite and >= 0, got {z}"
            )));
        }
        if let Some(cap) = self.softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return Err(Error::InvalidOption(format!(
                "softcap must be finite and > 0, got {cap}"
            )));
        }
        if let Some(weight) = &self.weight
            && weight.len() != vocab
        {
            return Err(Error::InvalidOption(format!(
                "weight holds {} values, vocab is {vocab} (one weight per class)",
                weight.len()
            )));
        }
        Ok(())
    }

    /// Whether any loss option is on (label smoothing, z-loss, soft cap, class weights, token
    /// accuracy): the GPU path then runs the kernels that apply them (`*_coef_*` or `*_opt_*`);
    /// with all off it runs the plain ones, so an option that is off costs nothing.
    pub fn has_loss_options(&self) -> bool {
        self.label_smoothing != 0.0
            || self.lse_square_scale != 0.0
            || self.softcap.is_some()
            || self.weight.is_some()
            || self.return_token_accuracy
    }
}

/// An upstream gradient holds one value, or one per row.
pub(crate) fn check_upstream_len(rows: usize, len: usize) -> Result<()> {
    if len == 1 || len == rows {
        Ok(())
    } else {
        Err(Error::UpstreamLength { rows, len })
    }
}

/// The entropies' upstream gradient holds one value a row (at least `rows`; a call with no rows
/// reads none).
pub(crate) fn check_entropy_upstream(rows: usize, len: usize) -> Result<()> {
    if len >= rows {
        Ok(())
    } else {
        Err(Error::InvalidOption(format!(
            "the entropies' upstream gradient holds {len} values, the call has {rows} rows"
        )))
    }
}

/// Every class weight must be finite.
pub(crate) fn check_weight_values(weight: &[f32]) -> Result<()> {
    match weight.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        Some((class, w)) => Err(Error::InvalidOption(format!(
            "weight[{class}] is {w}: class weights must be finite"
        ))),
        None => Ok(()),
    }
}

/// The logits as `[batch, seq_len, vocab]` rows in memory: row `r = b * seq_len + t` starts at
/// element `r * row_stride`. Labels are `[batch, seq_len]`, contiguous, one per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub seq_len: usize,
    pub vocab: usize,
    /// Elements between the starts of consecutive rows (`vocab` when contiguous).
    pub row_stride: usize,
}

impl Shape {
    /// `[rows, vocab]`, contiguous (one sequence of `rows` positions).
    pub fn flat(rows: usize, vocab: usize) -> Shape {
        Shape {
            batch: 1,
            seq_len: rows,
            vocab,
            row_stride: vocab,
        }
    }

    /// `[batch, seq_len, vocab]`, contiguous.
    pub fn batched(batch: usize, seq_len: usize, vocab: usize) -> Shape {
        Shape {
            batch,
            seq_len,
            vocab,
            row_stride: vocab,
        }
    }

    /// The same shape with rows `row_stride` elements apart.
    pub fn with_row_stride(self, row_stride: usize) -> Shape {
        Shape { row_stride, ..self }
    }

    /// Number of logit rows, `batch * seq_len` (saturating: `validate` rejects an overflow).
    pub fn rows(&self) -> usize {
        self.batch.saturating_mul(self.seq_len)
    }

    /// Elements the logits buffer must hold: `(rows - 1) * row_stride + vocab`, 0 without rows.
    pub fn min_logits_len(&self) -> Option<usize> {
        match self.rows() {
            0 => Some(0),
            rows => (rows - 1)
                .checked_mul(self.row_stride)?
                .checked_add(self.vocab),
        }
    }

    /// Checks the shape against buffer lengths; the error names what is wrong.
    pub fn validate(&self, logits_len: usize, labels_len: usize) -> Result<()> {
        if self.vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        if self.vocab > (u32::MAX / 2) as usize {
            return Err(Error::VocabTooLarge { vocab: self.vocab });
        }
        if self.row_stride < self.vocab {
            return Err(Error::RowStrideTooSmall {
                row_stride: self.row_stride,
                vocab: self.vocab,
            });
        }
        let rows = self
            .batch
            .checked_mul(self.seq_len)
            .ok_or_else(|| Error::BadShape("batch * seq_len overflows".into()))?;
        let needed = self
            .min_logits_len()
            .ok_or_else(|| Error::BadShape("rows * row_stride overflows".into()))?;
        if logits_len < needed {
            return Err(Error::LogitsTooShort {
                needed,
                len: logits_len,
            });
        }
        if labels_len != rows {
            return Err(Error::LabelsLength {
                expected: rows,
                len: labels_len,
            });
        }
        if self.seq_len > u32::MAX as usize {
            return Err(Error::BadShape(format!(
                "seq_len {} exceeds u32",
                self.seq_len
            )));
        }
        Ok(())
    }
}

/// Element type of the logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Elements per 16-byte vector access in the kernels.
    pub fn vec(self) -> usize {
        16 / self.bytes()
    }

    /// Name used in kernel entry points and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// A logit element type: `f32`, [`half::f16`] or [`half::bf16`].
pub trait Element:
    cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    const DTYPE: DType;
    /// Exact widening.
    fn to_f64(self) -> f64;
    /// Rounds to nearest, ties to even (as the kernels' `cvt.rn`).
    fn from_f64(value: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

/// `value` rounded to f32 *to odd*: truncated toward zero, with the last mantissa bit set when
/// anything was cut off. Rounding that to nearest in a format of at most 22 mantissa bits (f16
/// has 10, bf16 7) is exactly one rounding of `value` to nearest, ties to even; rounding f64 to
/// nearest f32 first would round twice (and `half`'s own f64 conversions do: through f32 on x86
/// with F16C, by truncating bits for bf16).
fn f32_round_to_odd(value: f64) -> f32 {
    let nearest = value as f32;
    if nearest.is_nan() || nearest.is_infinite() || nearest as f64 == value {
        return nearest;
    }
    // Inexact: the truncation is `nearest`, or its neighbour toward zero if `nearest` rounded up
    // in magnitude (sign-magnitude bits: one less is one ulp toward zero).
    let mut bits = nearest.to_bits();
    if (nearest as f64).abs() > value.abs() {
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(value: f64) -> Self {
        half::f16::from_f32(f32_round_to_odd(value))
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(value: f64) -> Self {
        half::bf16::from_f32(f32_round_to_odd(value))
    }
}

/// A label type: `i64` (PyTorch's) or `i32`.
pub trait Label:
    cudarc::driver::DeviceRepr + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// Name used in kernel entry points.
    const NAME: &'static str;
    fn to_i64(self) -> i64;
}

impl Label for i64 {
    const NAME: &'static str = "i64";
    fn to_i64(self) -> i64 {
        self
    }
}

impl Label for i32 {
    const NAME: &'static str = "i32";
    fn to_i64(self) -> i64 {
        self as i64
    }
}

/// What row `row` is scored against; the one definition the CPU path uses (the kernels mirror it
/// in `kernels-gpu/src/xent/mod.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ignored,
    /// Label neither `ignore_index` nor in `[0, vocab)`.
    OutOfRange(i64),
    Class(usize),
}

/// Resolves the label of `row`, with the causal shift when `opts.causal_shift`.
pub fn row_target<L: Label>(labels: &[L], shape: &Shape, opts: &Options, row: usize) -> Target {
    let index = if opts.causal_shift {
        if row % shape.seq_len == shape.seq_len - 1 {
            return Target::Ignored;
        }
        row + 1
    } else {
        row
    };
    let label = labels[index].to_i64();
    if label == opts.ignore_index {
        Target::Ignored
    } else if label < 0 || label >= shape.vocab as i64 {
        Target::OutOfRange(label)
    } else {
        Target::Class(label as usize)
    }
}
