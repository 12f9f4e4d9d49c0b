//! The kernel ABI: parameter blocks passed by value to the PTX entry points.
//!
//! This file is shared, word for word, by the host crate and `kernels-gpu` (which includes it with
//! `#[path]`), so both sides agree on every field's offset. It uses `core` only. Pointers travel as
//! `u64` device addresses.

/// `reduction` code: per-row losses, no reduction (the scalar is their sum).
pub const REDUCTION_NONE: u32 = 0;
/// `reduction` code: mean over non-ignored rows.
pub const REDUCTION_MEAN: u32 = 1;
/// `reduction` code: sum over rows.
pub const REDUCTION_SUM: u32 = 2;

/// `XentParams::mode`: loss and gradient in one pass (the gradient over the logits).
pub const MODE_FUSED: u32 = 0;
/// `XentParams::mode`: the loss and per-row log-sum-exp only; nothing written to the logits.
pub const MODE_FORWARD: u32 = 1;

/// Index into the `counts` buffer: rows whose label is a class in `[0, vocab)`.
pub const COUNT_VALID: usize = 0;
/// Index into the `counts` buffer: rows whose label is neither `ignore_index` nor in `[0, vocab)`.
pub const COUNT_BAD: usize = 1;
/// Index into the `counts` buffer: the f32 bits of `Σ weight[label]` over the rows counted as
/// valid (class weights only; written by a count launch of one block, so the sum's order is
/// fixed).
pub const COUNT_WEIGHT: usize = 2;
/// Index into the `counts` buffer: the f32 bits of `Σ_j weight[j]` over the whole vocabulary
/// (class weights with label smoothing only; written by the count launch of one block, summed in
/// f64 in a fixed order), so that class weights can live in device memory the host never reads.
pub const COUNT_CLASS_WEIGHT_SUM: usize = 3;
/// Index into the `counts` buffer: the small calls' done counter (see
/// `XentParams::self_finish`). Zero when the buffer is made, and zero again after each call that
/// uses it (its last CTA wraps it), so a buffer xent allocated zeroed never needs a reset.
pub const COUNT_DONE: usize = 4;
/// The most rows a small call (`XentParams::self_finish`) of the plain loss may have for the
/// cluster plan's `xent_cluster_small_*` kernels, which count the labels two a lane of each warp.
pub const SMALL_KERNEL_ROWS: usize = 64;
/// Length of the `counts` buffer in `u32` words.
pub const COUNT_WORDS: usize = 5;

/// Bytes of dynamic shared memory reserved at its start for block reductions (32 warps x 8 bytes).
pub const SMEM_REDUCTION_BYTES: u32 = 256;
/// Offset of the chunk summary a CTA publishes to the other CTAs of its cluster: max, sum, and
/// with options the weighted logit sum and the accuracy's violation count (4 words).
pub const SMEM_CLUSTER_SLOT: u32 = SMEM_REDUCTION_BYTES;
/// Offset, inside the reduction scratch, of the slots where the cluster kernel's CTA that holds a
/// row's label collects the other CTAs' shares of the class-weighted smoothing sum when the
/// gradient pass takes it (one f32 a CTA of the cluster, at most 16). A block reduction of one
/// word a warp (at most 32 warps) stays below it.
pub const SMEM_WSUM_SLOTS: u32 = 128;
const _: () =
    assert!(32 * 4 <= SMEM_WSUM_SLOTS && SMEM_WSUM_SLOTS + 16 * 4 <= SMEM_REDUCTION_BYTES);
/// Offset, inside the reduction scratch, of the mbarriers of the soft cap's cluster kernels'
/// second and later pieces of a chunk (8 bytes each, at most 4: the kernels assert it of their
/// `CAP_PIECES`): above the smoothing slots, and reached by a block merge (16 bytes a warp) only
/// in blocks of more than 14 warps, which wait until the pieces are done with them.
pub const SMEM_PIECE_MBARRIERS: u32 = 224;
const _: () = assert!(
    SMEM_WSUM_SLOTS + 16 * 4 <= SMEM_PIECE_MBARRIERS
        && SMEM_PIECE_MBARRIERS + 4 * 8 <= SMEM_REDUCTION_BYTES
);
/// Offset of the mbarrier the sm_90 bulk copy of a chunk completes on (8 bytes).
pub const SMEM_MBARRIER: u32 = SMEM_CLUSTER_SLOT + 16;
/// Offset of a small call's label counts, as the CTA counted them itself (`self_finish`): the
/// valid rows and the f32 bits of their total class weight (2 words, after the mbarrier).
pub const SMEM_COUNTS: u32 = SMEM_MBARRIER + 8;
/// Offset of the row stash (plus `row address % 16`, so vectors stay 16-byte aligned).
pub const SMEM_STASH_OFFSET: u32 = SMEM_MBARRIER + 16;
/// The cluster kernels without per-element options (plain and `coef_`) keep the first
/// `CLUSTER_KEEP x threads` vectors
/// of their chunk in registers (vector `t + k x threads` in thread `t`, `k < CLUSTER_KEEP`)
/// from the load to the gradient, and only the rest in shared memory (from `SMEM_STASH_OFFSET`,
/// the chunk's scalar head and tail in registers too), so more CTAs fit on an SM. The `opt_`
/// variants keep none (their register budget is spent: they take 56-64 registers).
pub const CLUSTER_KEEP: u32 = 2;
/// `u32` words per chunk in the chunked plan's `partials`: the chunk summary, as the cluster
/// slot.
pub const PARTIAL_WORDS: usize = 4;
/// Summary slots a CTA of the split_l2 plan (`split::split_l2`) cycles through: a CTA stores its
/// summary of the group's `k`-th scored row only after it has merged row `k - 2`'s, for which every
/// CTA of the group had stored row `k - 2`'s summary, and so had finished merging row `k - 4`'s (a
/// CTA merges row `j` before it reduces row `j + 2`); rows `k - 3` to `k - 1` may still be read.
/// Four slots, the row's index modulo four, never overwrite a summary still to be read.
pub const SPLIT_L2_SLOTS: usize = 4;

/// Where each row's label lives. Shared by every cross-entropy kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowsParams {
    /// Device address of the logits (element type fixed by the entry point).
    pub logits: u64,
    /// Device address of the labels (`i32` or `i64`, fixed by the entry point).
    pub labels: u64,
    /// Number of logit rows.
    pub n_rows: u64,
    /// Elements between the starts of consecutive rows (>= `vocab`).
    pub row_stride: u64,
    /// Classes per row.
    pub vocab: u32,
    /// 0: row `r` is scored against `labels[r]`. T > 0: causal shift over sequences of length T:
    /// row `r` (position `t = r % T`) is scored against `labels[r + 1]`, and the last position of
    /// each sequence is ignored.
    pub seq_len: u32,
    /// Label value that marks a row as ignored.
    pub ignore_index: i64,
}

/// Parameters of the fused and chunked cross-entropy kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct XentParams {
    pub rows: RowsParams,
    /// Device address of `[u32; COUNT_WORDS]`, filled by the count kernel.
    pub counts: u64,
    /// Device address of `[f32; n_rows]`: each row's loss (0 for ignored rows).
    pub row_loss: u64,
    /// Device address of `[f32; n_rows]`: each row's natural log-sum-exp (0 for ignored rows).
    pub row_lse: u64,
    /// Device address of `[f32; PARTIAL_WORDS * n_rows * n_chunks]`: the summary of each chunk
    /// ((max, sum) in log2 units, weighted logit sum, accuracy violations). Chunked plan only.
    pub partials: u64,
    /// One of the `REDUCTION_*` codes.
    pub reduction: u32,
    /// Multiplies the gradient (after the mean's division, if any).
    pub grad_scale: f32,
    /// Chunks per row: blocks of the chunked plan, or CTAs of a cluster (1 for the fused plan).
    pub n_chunks: u32,
    /// Elements per chunk, a multiple of 8 (`vocab` for the fused plan).
    pub chunk_len: u32,
    /// One of the `MODE_*` codes (the backward kernel ignores it).
    pub mode: u32,
    /// Backward: 1 when `upstream` holds one value per row, 0 for one value.
    pub upstream_per_row: u32,
    /// Backward: bytes from each logit to its gradient (0: in place; a multiple of 16).
    pub grad_delta: u64,
    /// Backward: device address of the upstream gradient (`[f32; 1]` or `[f32; n_rows]`).
    pub upstream: u64,
    /// The loss options; read only by the `*_coef_*` and `*_opt_*` entry points.
    pub opts: OptParams,
    /// Backward only: with `slice_len` > 0 the logits hold columns `[slice_start, slice_start +
    /// slice_len)` of rows of `rows.vocab` classes (`rows.row_stride` apart), and the gradient of
    /// those columns is written; 0: whole rows.
    pub slice_start: u32,
    pub slice_len: u32,
    /// Vocabulary-parallel calls (`ranks` > 1; 0 or 1 otherwise). The chunked plan's first kernel
    /// writes the label's logit (as stored) of each row whose label is in its slice to
    /// `label_logits` (`[f32; n_rows]`, zeroed before), beside its partials. The second kernel
    /// merges the partials of every rank, `rank_stride` bytes apart from `partials`, takes the
    /// label's logit as the sum of every rank's `label_logits` (the same stride), and the block of
    /// each row's first chunk writes the row's outputs. With `label_logits` set, the smoothing
    /// sum's reference is 0 (every rank must take the same).
    pub label_logits: u64,
    pub rank_stride: u64,
    pub ranks: u32,
    /// Small calls (rows at most the block's threads; fused and cluster kernels only; not class
    /// weights with label smoothing): 1 makes one launch do the work of three. Every CTA counts
    /// the labels itself instead of reading `counts`; the CTA that finishes last (the done
    /// counter `counts[COUNT_DONE]`, which must be 0 before the launch) stores the counts and
    /// reduces the rows' losses into `loss` and `extras` as the finish kernel does, in the same
    /// order. 0: the count and finish kernels do that.
    pub self_finish: u32,
    /// With `self_finish`: device addresses of the loss (`[f32; 1]`) and the extras (`[f32; 2]`,
    /// or 0), as in `FinishParams`.
    pub loss: u64,
    pub extras: u64,
    /// Backward only, the `*_opt_*` kernels: device addresses of each row's entropy `H` (`[f32;
    /// n_rows]`, as the entropy kernel wrote it for the forward) and of its upstream gradient
    /// (`[f32; n_rows]`); the gradient of `Σ_r entropy_upstream[r]·H_r` is added to the loss's,
    /// `dH/dy_j = p_j·(lse - H - y_j)` (`y` the soft-capped logits). 0: none.
    pub entropy: u64,
    pub entropy_upstream: u64,
}

/// The loss options, as the `*_coef_*` and `*_opt_*` kernels read them. Every field's zero is
/// "off".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OptParams {
    /// Device address of `[f32; vocab]` class weights, or 0 (every weight 1).
    pub weight: u64,
    /// Device address of `[u32; n_rows]`: 1 where the row's first maximal logit is its label,
    /// or 0 (no token accuracy).
    pub row_correct: u64,
    /// Label smoothing ε.
    pub label_smoothing: f32,
    /// z-loss coefficient.
    pub lse_square_scale: f32,
    /// Soft cap (0: none).
    pub softcap: f32,
    /// With the soft cap: the largest `x²` (exclusive) where the cluster kernels take `tanh(x /
    /// cap)` from `tanh_poly` and `exp_poly` instead of element by element; 0 (the default)
    /// never. The host's `kernels::set_softcap` fills these.
    pub poly_x2_max: f32,
    /// `P` with `tanh(x / cap) ≈ x·P(x²)` where `x²` is below `poly_x2_max`: coefficients of
    /// `x⁰, x², ..., x⁸`.
    pub tanh_poly: [f32; 5],
    /// `cap·log2(e)·P`: the first pass's exponent `x·exp_poly(x²) - cap·log2(e)` in one FMA.
    pub exp_poly: [f32; 5],
    /// The same for a vector whose `x²` all lie below `short_x2_max` (at most `poly_x2_max`; 0:
    /// never), with a polynomial one degree shorter ([`TANH_Q_SHORT`]): one FMA fewer an element.
    pub short_x2_max: f32,
    pub tanh_short: [f32; 4],
    pub exp_short: [f32; 4],
    /// The same for a vector whose `x²` all lie below `wide_x2_max` (at least `poly_x2_max`; 0:
    /// never), with the longer polynomial [`TANH_Q_WIDE`] that holds to `|x / cap| < 1`: three
    /// FMAs more an element than `tanh_poly`, and no exponential or division.
    pub wide_x2_max: f32,
    pub tanh_wide: [f32; 8],
    pub exp_wide: [f32; 8],
}

/// `q(s)` of `tanh(u) = u + u·s·q(s)` (`s = u²`, `|u| < 0.4`), coefficients of `s⁰` to `s³`: a
/// cubic fitted to the least maximum of `s·|q - q_true|` (the error it puts into `tanh(u)/u`) by
/// reweighted least squares on 4000 Chebyshev nodes (`bench/tanh_poly.py`). In f32 over every
/// `|u| < 0.4` it is within 0.66 ulp of the correctly rounded `cap·tanh(x/cap)` (as `x + x·s·q`),
/// where the odd Taylor series to `u^13` (two more FMAs) was within 0.64.
pub const TANH_Q: [f32; 4] = [-0.333333, 0.13331234, -0.05356413, 0.018751191];

/// `|x / cap|` below which the kernels take [`TANH_Q`]'s polynomial.
pub const TANH_POLY_WIDEST: f64 = 0.4;

/// [`TANH_Q`] one degree shorter, fitted the same way on `|u| < 0.3` (`bench/tanh_poly.py
/// --short`): `x·P(x²)` is as close to `tanh(x / cap)` there (within 2.5 ulp in f32) as the
/// cubic's is on `|u| < 0.4`.
pub const TANH_Q_SHORT: [f32; 3] = [-0.33333063, 0.13314907, -0.050372254];

/// `|x / cap|` below which the kernels may take [`TANH_Q_SHORT`]'s polynomial.
pub const TANH_SHORT_WIDEST: f64 = 0.3;

/// `q` of degree 6, fitted the same way on `|u| < 1` (`bench/tanh_poly.py --wide`): `x·P(x²)` is
/// within 2.3 ulp of `tanh(x / cap)` there in f32 (caps 1 to 50). Its `P` has coefficients down to
/// `q_6 / cap^15`, normal f32 for caps up to about 199; above that the kernels do without it (and
/// logits of 0.4 times such a cap are rare).
pub const TANH_Q_WIDE: [f32; 7] = [
    -0.333333,
    0.13332412,
    -0.0538841,
    0.021499386,
    -0.00796519,
    0.0023154486,
    -0.00036251798,
];

/// `|x / cap|` below which the kernels may take [`TANH_Q_WIDE`]'s polynomial.
pub const TANH_WIDE_WIDEST: f64 = 1.0;

/// Parameters of the count kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CountParams {
    pub rows: RowsParams,
    /// Device address of `[u32; COUNT_WORDS]`, zeroed before a launch of several blocks (one
    /// block stores every word).
    pub counts: u64,
    /// Device address of `[f32; vocab]` class weights, or 0. With weights the launch must be one
    /// block (it stores `COUNT_WEIGHT`).
    pub weight: u64,
    /// 1: also store `Σ_j weight[j]` over the vocabulary in `counts[COUNT_CLASS_WEIGHT_SUM]`
    /// (label smoothing with class weights needs it); only with `weight`.
    pub sum_class_weights: u32,
    pub _pad: u32,
}

/// Parameters of the kernel that reduces per-row losses to the scalar loss.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FinishParams {
    /// Device address of `[f32; n_rows]`.
    pub row_loss: u64,
    /// Device address of `[u32; COUNT_WORDS]`.
    pub counts: u64,
    /// Device address of one `f32`: the loss.
    pub loss: u64,
    pub n_rows: u64,
    /// One of the `REDUCTION_*` codes.
    pub reduction: u32,
    /// 1: the mean's cross-entropy part divides by `counts[COUNT_WEIGHT]` (class weights).
    pub weighted: u32,
    /// Device address of `[f32; n_rows]`, the per-row log-sum-exp (for the z-loss part).
    pub row_lse: u64,
    /// Device address of `[u32; n_rows]` (token accuracy), or 0.
    pub row_correct: u64,
    /// Device address of `[f32; 2]`: the z-loss part of the loss, and the token accuracy.
    pub extras: u64,
    /// z-loss coefficient (0: off).
    pub lse_square_scale: f32,
    pub _pad: u32,
}

/// Parameters of the prototype that takes the log-sum-exp of every row of `hidden · weightᵀ`
/// without writing the logits (`xent_lse_gemm_bf16`, issue 12's "beyond").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LseGemmParams {
    /// Device address of `hidden [n_rows, dim]`, bf16, rows contiguous.
    pub hidden: u64,
    /// Device address of `weight [vocab, dim]`, bf16, rows contiguous.
    pub weight: u64,
    /// Device address of `[splits, n_rows, 2]` f32: each range's (max, sum) per row, the max in
    /// log2 units (`x·log2(e)`) and the sum of `2^(x·log2(e) - max)`.
    pub partials: u64,
    pub n_rows: u32,
    pub vocab: u32,
    /// A positive multiple of 64.
    pub dim: u32,
    /// Classes per range; range `s` is `[s·vocab_per_split, (s + 1)·vocab_per_split)`.
    pub vocab_per_split: u32,
}

/// Parameters of `xent_lse_tma_bf16` (sm_90a): `LseGemmParams`' call, with two TMA tensor maps
/// (`CUtensorMap`, 128 bytes) of `hidden` and `weight` by value (boxes of 64 along `dim` by 128
/// rows and by 256 classes, 128-byte swizzle), which the kernel names in parameter space (as
/// [`GemmParams`]' maps).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LseTmaParams {
    pub tmap_hidden: [u64; 16],
    pub tmap_weight: [u64; 16],
    pub call: LseGemmParams,
    /// Row blocks (of 128) that run side by side, each through every range, so that CTAs
    /// running together share both operands' tiles in L2.
    pub group_rows: u32,
    pub _pad: u32,
}

/// Parameters of `xent_gemm_tn_bf16` (sm_90a): `C = alpha·Aᵀ·B + beta·C` for `A [K, M]`,
/// `B [K, N]` and `C [M, N]`, all bf16 and row-major, through three TMA tensor maps
/// (`CUtensorMap`, 128 bytes) passed here by value, which the kernel names in parameter space
/// (`cvta.param`; rustc declares the block 16-byte aligned, the most its NVPTX kernel ABI allows,
/// and `cargo xtask ptx` raises that to the 64 bytes a tensor map needs): `A`'s and `B`'s boxes
/// 64 wide by 64 rows, `C`'s 64 wide by 128 rows, all with the 128-byte swizzle. The weight
/// gradient of the linear path, `Gᵀ·h`, accumulated over chunks of rows.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmParams {
    pub tmap_a: [u64; 16],
    pub tmap_b: [u64; 16],
    pub tmap_c: [u64; 16],
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub alpha: f32,
    /// 0: `C` is not read.
    pub beta: f32,
    pub _pad: u32,
    /// Device address of a `u32` that is 0 at the launch: the next output tile to take.
    pub counter: u64,
}

/// Parameters of `xent_gemm_grads_bf16` (sm_90a): both gradient GEMMs of a linear chunk in one
/// launch, `grad_hidden = G·W` (written) and `grad_weight = Gᵀ·h + beta·grad_weight`, all bf16
/// and row-major, f32 accumulated and rounded once, through four TMA tensor maps by value (as
/// [`GemmParams`]'): `G [rows, vocab]`, `h [rows, dim]` and `W [vocab, dim]` in boxes 64 wide by
/// 64 rows, `grad_weight [vocab, dim]` in boxes 64 wide by 128 rows, 128-byte swizzle.
/// `grad_hidden`'s tiles of 128 x 256 may be split in two halves of the vocabulary, added through
/// `partials` (`f32` addition is commutative: the sum is the same whichever half comes first).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradGemmParams {
    pub tmap_g: [u64; 16],
    pub tmap_h: [u64; 16],
    pub tmap_grad_weight: [u64; 16],
    pub tmap_w: [u64; 16],
    /// Device address of `grad_hidden [rows, dim]`, rows `dim` elements apart.
    pub grad_hidden: u64,
    /// Device address of a `u32` that is 0 at the launch: the next item to take.
    pub counter: u64,
    pub rows: u32,
    pub vocab: u32,
    /// A multiple of 256 (`grad_hidden`'s tiles are whole columns).
    pub dim: u32,
    /// 0: `grad_weight` is not read.
    pub beta: f32,
    /// Device address of two `u32` a `grad_hidden` tile, 0 at the launch, when `splits` is 2:
    /// the tile's halves that have finished, and whether the first one's sums are in
    /// `partials`.
    pub flags: u64,
    /// Device address, 16-byte aligned, of 128 KiB of `f32` a `grad_hidden` tile when `splits`
    /// is 2: the sums of the half of the vocabulary that finishes first.
    pub partials: u64,
    /// 1: each `grad_hidden` tile is one item over the whole vocabulary; 2: two items, one a
    /// half (at least two steps of 64 classes).
    pub splits: u32,
    pub _pad: u32,
}

/// Parameters of the predicted-tokens kernel (Liger's `return_predicted_tokens`): each scored
/// row's first maximal logit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ArgmaxParams {
    pub rows: RowsParams,
    /// Device address of `[i64; n_rows]`: each row's first maximal logit's class (`torch.argmax`:
    /// a NaN counts as the maximum), -1 for a row not scored (ignored, or past a sequence's end
    /// under the causal shift, or with a label out of range).
    pub out: u64,
}

/// Parameters of the entropy kernel (`return_entropy`): each scored row's entropy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EntropyParams {
    pub rows: RowsParams,
    /// Device address of `[f32; n_rows]`: each row's entropy in nats (of the soft-capped logits
    /// where `softcap > 0`), 0 for a row not scored.
    pub out: u64,
    /// The soft cap (0: none).
    pub softcap: f32,
    /// `1 / softcap` (0 without).
    pub inv_softcap: f32,
}

/// Dynamic shared memory of the entropy kernel: three `f32` a warp, for up to 32 warps.
pub const SMEM_ENTROPY_BYTES: u32 = 3 * 32 * 4;

/// f32 values a row of a rank's entropy summary ([`ShardEntropyParams::out`]): `m`,
/// `Σ 2^(z - m)` and `Σ 2^(z - m)·(z - m)`.
pub const SHARD_ENTROPY_WORDS: usize = 3;

/// Parameters of the vocabulary-parallel entropies, step 1 (`return_entropy`): each scored row's
/// entropy summary over one rank's shard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardEntropyParams {
    /// The shard's logits (`row_stride` apart), the labels, and the whole vocabulary's size
    /// (`vocab`: the labels' range).
    pub rows: RowsParams,
    /// Device address of `[[u32; 3]; n_rows]`: each row's summary of its shard's (soft-capped)
    /// logits `z` in log2 units, the f32 bits of `m = max z`, `s = Σ 2^(z - m)` and
    /// `t = Σ 2^(z - m)·(z - m)`; `[-inf, 0, 0]` for a row not scored.
    pub out: u64,
    /// The shard's columns a row.
    pub width: u32,
    /// The soft cap (0: none).
    pub softcap: f32,
    /// `1 / softcap` (0 without).
    pub inv_softcap: f32,
    pub _pad: u32,
}

/// Parameters of the vocabulary-parallel entropies, step 3: each row's entropy over the whole
/// vocabulary from every rank's summary ([`ShardEntropyParams::out`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardEntropyMergeParams {
    /// The labels and the whole vocabulary (`logits` and `row_stride` unused).
    pub rows: RowsParams,
    /// Device address of the gathered values: `ranks` blocks of `rank_stride` bytes, each with
    /// its summaries `offset` bytes in.
    pub gathered: u64,
    pub rank_stride: u64,
    pub offset: u64,
    /// Device address of `[f32; n_rows]`: each row's entropy in nats, 0 for a row not scored.
    pub out: u64,
    pub ranks: u32,
    pub _pad: u32,
}

/// Parameters of the vocabulary-parallel argmax, step 1 (token accuracy and predicted tokens):
/// each scored row's first maximal logit in one rank's shard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardArgmaxParams {
    /// The shard's logits (`row_stride` apart), the labels, and the whole vocabulary's size
    /// (`vocab`: the labels' range).
    pub rows: RowsParams,
    /// Device address of `[[u32; 2]; n_rows]`: each row's pair, the f32 bits of its shard's first
    /// maximal logit and that logit's class (`start` + its column); `[-inf, u32::MAX]` for a row
    /// not scored.
    pub out: u64,
    /// The shard's columns a row.
    pub width: u32,
    /// The shard's first class.
    pub start: u32,
}

/// Parameters of the vocabulary-parallel argmax, step 3: each row's class from every rank's
/// pair ([`ShardArgmaxParams::out`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardMergeParams {
    /// The labels and the whole vocabulary (`logits` and `row_stride` unused).
    pub rows: RowsParams,
    /// Device address of the gathered values: `ranks` blocks of `rank_stride` bytes, each with
    /// its pairs `pairs_offset` bytes in.
    pub gathered: u64,
    pub rank_stride: u64,
    pub pairs_offset: u64,
    /// Device address of `[i64; n_rows]`: each row's class (`torch.argmax` over the whole
    /// vocabulary), -1 for a row not scored; 0: not asked.
    pub predicted: u64,
    /// Device address of `[u32; n_rows]`: 1 where the row's class is its label, else 0; 0: not
    /// asked.
    pub row_correct: u64,
    pub ranks: u32,
    pub _pad: u32,
}

/// Parameters of the kernel that scales a gradient in place by an upstream gradient.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScaleParams {
    /// Device address of the gradient rows.
    pub grad: u64,
    /// Device address of the upstream gradient: one `f32`, or one per row.
    pub upstream: u64,
    pub n_rows: u64,
    pub row_stride: u64,
    pub vocab: u32,
    /// 0: `upstream[0]` scales every row; 1: `upstream[r]` scales row `r`.
    pub per_row: u32,
    /// Elements per tile along a row (a multiple of 8).
    pub tile_len: u32,
    /// Tiles per row. Block `b` scales tiles `b, b + grid, ...` of the `n_rows * n_tiles`.
    pub n_tiles: u32,
}
