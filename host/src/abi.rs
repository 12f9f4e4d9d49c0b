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

/// Index into the `counts` buffer: rows whose label is a class in `[0, vocab)`.
pub const COUNT_VALID: usize = 0;
/// Index into the `counts` buffer: rows whose label is neither `ignore_index` nor in `[0, vocab)`.
pub const COUNT_BAD: usize = 1;
/// Length of the `counts` buffer in `u32` words.
pub const COUNT_WORDS: usize = 2;

/// Bytes of dynamic shared memory reserved at its start for block reductions (32 warps x 8 bytes).
pub const SMEM_REDUCTION_BYTES: u32 = 256;
/// Offset of the (max, sum) a CTA publishes to the other CTAs of its cluster.
pub const SMEM_CLUSTER_SLOT: u32 = SMEM_REDUCTION_BYTES;
/// Offset of the mbarrier the sm_90 bulk copy of a chunk completes on (8 bytes, in the slot's
/// 16-byte cell).
pub const SMEM_MBARRIER: u32 = SMEM_CLUSTER_SLOT + 8;
/// Offset of the row stash (plus `row address % 16`, so vectors stay 16-byte aligned).
pub const SMEM_STASH_OFFSET: u32 = SMEM_CLUSTER_SLOT + 16;

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
    /// Device address of `[f32; 2 * n_rows * n_chunks]`: (max, sum) per chunk, in log2 units.
    /// Chunked plan only.
    pub partials: u64,
    /// One of the `REDUCTION_*` codes.
    pub reduction: u32,
    /// Multiplies the gradient (after the mean's division, if any).
    pub grad_scale: f32,
    /// Chunks per row: blocks of the chunked plan, or CTAs of a cluster (1 for the fused plan).
    pub n_chunks: u32,
    /// Elements per chunk, a multiple of 8 (`vocab` for the fused plan).
    pub chunk_len: u32,
}

/// Parameters of the count kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CountParams {
    pub rows: RowsParams,
    /// Device address of `[u32; COUNT_WORDS]`, zeroed before the launch.
    pub counts: u64,
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
    /// Elements per block along a row (a multiple of 8).
    pub tile_len: u32,
    /// Tiles per row.
    pub n_tiles: u32,
}
