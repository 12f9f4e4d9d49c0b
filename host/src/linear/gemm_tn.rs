//! The weight-gradient GEMM of the linear path on Hopper (`xent_gemm_tn_bf16`, sm_90a):
//! `C = alpha·Aᵀ·B + beta·C` for row-major bf16 `A [K, M]`, `B [K, N]`, `C [M, N]`, f32
//! accumulated and rounded once. Per chunk of rows the linear path adds `Gᵀ·h` (`A` the chunk's
//! logit gradient, `B` its hidden states) to the weight's gradient; cuBLAS reads and writes that
//! `[V, D]` gradient after its products, where this kernel has the tensor memory accelerator
//! bring each output tile's `C` in while the tile's products run and store it back while the next
//! tile's run. See `kernels-gpu/src/gemm.rs`.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::CrossEntropy;
use crate::abi::{GemmParams, GradGemmParams};
use crate::error::{Error, Result};
use crate::linear::CardRates;

/// Dynamic shared memory: three stages of a 64 x 128 and a 64 x 256 bf16 tile, `C`'s 128 x 256
/// tile, 1024 bytes to align them, and the barriers.
pub(crate) const SMEM_BYTES: u32 = 3 * 64 * (128 + 256) * 2 + 128 * 256 * 2 + 2048;
/// Three warpgroups: two consumers, the producer.
const THREADS: u32 = 384;

/// The most rows a chunk may hold for the linear path to take this GEMM for its weight gradient
/// by itself (without `XENT_GEMM_TN`): where reading and writing the `[V, D]` gradient costs as
/// much as the products. On an H100 at 256-row chunks it made the in-place path 8% faster (54.2
/// against 58.7 ms at 8192 x 4096 x 128256 bf16) and at 512 rows 3% slower (82.4 against 79.9 at
/// 16384); on the H200 alone, `Gᵀ·h` into `[128256, 4096]`: 0.739 against cuBLASLt's 0.850 ms at
/// 256 rows and 1.466 against 1.390 at 896.
pub const ALONE_MAX_ROWS: usize = 256;

/// The least flops a byte of device memory ([`CardRates::flops_per_byte`]: the card's dense
/// 16-bit tensor-core rate over its bandwidth) at which the linear path takes this GEMM by itself.
/// In place at 256-row chunks (8192 x 4096 x 128256 bf16, `xent_linear_small`, ms random /
/// peaked) it was 5-7% faster than cuBLASLt on an H100 SXM (319 flop/byte: 56.04 / 56.75 against
/// 59.74 / 59.69, two rounds, session 64) and 3-5% slower on the H200 (218: 51.65 / 52.14 against
/// 49.34 / 50.16, two rounds, session 65), where the GEMM alone is the faster (above). The line
/// lies between the two cards (their geometric mean); where between them is not measured.
pub const ALONE_MIN_FLOPS_PER_BYTE: f64 = 264.0;

/// Whether the linear path takes this GEMM for a chunk's weight gradient, given the call's
/// shapes fit it (bf16, compute capability 9.0, [`fits`]): `XENT_GEMM_TN=1` always, `=0` never,
/// and by default where the GEMM runs `alone` on the call's stream (no hidden-state gradient
/// GEMM beside it, as in place) for chunks of at most [`ALONE_MAX_ROWS`] rows, on a card of
/// `rates` with at least [`ALONE_MIN_FLOPS_PER_BYTE`] (an H100 SXM, not the H200; not a card
/// whose rates are unknown). Beside the hidden states' GEMM on a second stream it loses
/// (session 13: 56.7 against 54.9 ms at Liger's memory on the H200): its one 215 KiB CTA an SM
/// leaves that GEMM no room, where cuBLASLt's kernels share the SMs.
pub fn takes_weight_grad(rows: usize, alone: bool, rates: Option<CardRates>) -> bool {
    wanted(
        std::env::var("XENT_GEMM_TN").ok().as_deref(),
        rows,
        alone,
        rates,
    )
}

/// [`takes_weight_grad`] with the knob's value given.
fn wanted(knob: Option<&str>, rows: usize, alone: bool, rates: Option<CardRates>) -> bool {
    match knob {
        Some("1") => true,
        Some("0") => false,
        _ => {
            alone
                && rows <= ALONE_MAX_ROWS
                && rates.is_some_and(|r| r.flops_per_byte() >= ALONE_MIN_FLOPS_PER_BYTE)
        }
    }
}

/// One operand of [`CrossEntropy::gemm_tn_bf16`]: a row-major bf16 matrix of `rows` rows of
/// `cols` elements at device address `ptr`, rows `ld` elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl Matrix {
    /// `rows` rows of `cols` elements, rows contiguous.
    pub fn dense(ptr: u64, rows: usize, cols: usize) -> Matrix {
        Matrix {
            ptr,
            rows,
            cols,
            ld: cols,
        }
    }

    /// Its TMA tensor map (`CUtensorMap`'s 128 bytes): boxes of `boxes[0]` elements along a row
    /// by `boxes[1]` rows, 128-byte swizzle (a box row is 128 bytes), zeros outside the matrix.
    /// The address and row stride must be multiples of 16 bytes ([`Matrix::unfit`]).
    pub(crate) fn tensor_map(&self, boxes: [u32; 2]) -> Result<[u64; 16]> {
        use cudarc::driver::sys::{
            CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
            CUtensorMapL2promotion, CUtensorMapSwizzle, cuTensorMapEncodeTiled,
        };
        let mut map = CUtensorMap { opaque: [0; 16] };
        let dims = [self.cols as u64, self.rows as u64];
        // Bytes between rows (the innermost dimension's stride is implied).
        let strides = [self.ld as u64 * 2];
        let element_strides = [1u32, 1];
        // SAFETY: every pointer names a live local array of the rank's length; the driver only
        // reads them and writes `map`.
        unsafe {
            cuTensorMapEncodeTiled(
                &mut map,
                CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                self.ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
            .map_err(|err| Error::Driver(format!("cuTensorMapEncodeTiled: {err}")))?;
        }
        Ok(map.opaque)
    }

    /// Why the tensor memory accelerator cannot take it (address and row stride multiples of 16
    /// bytes, sizes within its 32-bit coordinates), if it cannot.
    fn unfit(&self, what: &str) -> Option<String> {
        if !self.ptr.is_multiple_of(16) || !self.ld.is_multiple_of(8) {
            Some(format!(
                "gemm_tn: {what}'s address and row stride must be multiples of 16 bytes (ld {})",
                self.ld
            ))
        } else if self.ld < self.cols || self.rows == 0 || self.cols == 0 {
            Some(format!(
                "gemm_tn: {what} is {} x {} with ld {}",
                self.rows, self.cols, self.ld
            ))
        } else if self.rows > i32::MAX as usize || self.cols > i32::MAX as usize {
            Some(format!("gemm_tn: {what} exceeds 2^31 rows or columns"))
        } else {
            None
        }
    }
}

/// Why [`CrossEntropy::gemm_tn_bf16`] cannot take these operands, if it cannot: one the tensor
/// memory accelerator cannot address ([`Matrix::unfit`]), or shapes that do not make `C = Aᵀ·B`.
fn check(a: &Matrix, b: &Matrix, c: &Matrix) -> Result<()> {
    for (m, what) in [(a, "A"), (b, "B"), (c, "C")] {
        if let Some(why) = m.unfit(what) {
            return Err(Error::InvalidOption(why));
        }
    }
    if a.rows != b.rows || c.rows != a.cols || c.cols != b.cols {
        return Err(Error::InvalidOption(format!(
            "gemm_tn: A {} x {}, B {} x {} and C {} x {} do not make C = Aᵀ·B",
            a.rows, a.cols, b.rows, b.cols, c.rows, c.cols
        )));
    }
    Ok(())
}

/// Whether [`CrossEntropy::gemm_tn_bf16`] takes these operands (the linear path falls back to
/// cuBLASLt where it does not).
pub fn fits(a: &Matrix, b: &Matrix, c: &Matrix) -> bool {
    check(a, b, c).is_ok()
}

impl CrossEntropy {
    /// Enqueues `C = alpha·Aᵀ·B + beta·C` (`A [K, M]`, `B [K, N]`, `C [M, N]`, bf16, row-major)
    /// on `stream`; with `beta` 0, `C` is only written. Compute capability 9.0 only
    /// ([`Error::UnsupportedComputeCapability`] elsewhere).
    ///
    /// # Safety
    /// Each matrix must be a live device allocation of at least `(rows - 1)·ld + cols` bf16
    /// elements, on this handle's device, not written by anything else until the GEMM is done;
    /// `C` must not overlap `A` or `B`.
    pub unsafe fn gemm_tn_bf16(
        &self,
        stream: &Arc<CudaStream>,
        a: Matrix,
        b: Matrix,
        c: Matrix,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.check_stream(stream)?;
        // The tile counter, zeroed in stream order and freed in stream order after the launch.
        let counter = stream.alloc_zeros::<u32>(1)?;
        let (counter_ptr, _guard) = cudarc::driver::DevicePtr::device_ptr(&counter, stream);
        // SAFETY: the caller's promises, `stream` is this handle's context's, and the counter is
        // a zeroed word nothing else uses.
        unsafe { self.gemm_tn_bf16_raw(stream.cu_stream(), a, b, c, (alpha, beta), counter_ptr, 0) }
    }

    /// [`gemm_tn_bf16`](Self::gemm_tn_bf16) on a raw stream of this handle's context (the
    /// linear path's side stream), its CTAs taking output tiles from the `u32` at `counter`:
    /// one CTA an SM, at most `max_ctas` of them (0: as many as the device has SMs), so that a
    /// GEMM on another stream can have the other SMs.
    ///
    /// # Safety
    /// As `gemm_tn_bf16`; `stream` must belong to this handle's context, and `counter` must be a
    /// device word that is 0 when the launch starts and that nothing else touches until it ends.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_tn_bf16_raw(
        &self,
        stream: cudarc::driver::sys::CUstream,
        a: Matrix,
        b: Matrix,
        c: Matrix,
        (alpha, beta): (f32, f32),
        counter: u64,
        max_ctas: u32,
    ) -> Result<()> {
        check(&a, &b, &c)?;
        let function = &self.wgmma_functions()?[3];
        let mut params = GemmParams {
            tmap_a: a.tensor_map([64, 64])?,
            tmap_b: b.tensor_map([64, 64])?,
            tmap_c: c.tensor_map([64, 128])?,
            m: c.rows as u32,
            n: c.cols as u32,
            k: a.rows as u32,
            alpha,
            beta,
            _pad: 0,
            counter,
        };
        let tiles = c.rows.div_ceil(128) * c.cols.div_ceil(256);
        // SAFETY: `params` is the parameter block the entry point declares; the tensor maps name
        // the caller's matrices, which the caller vouches for, and `stream` is of this context
        // (the caller's promise).
        unsafe { self.launch_persistent(function, stream, &mut params, tiles, max_ctas) }
    }

    /// Launches `function`, one of the persistent GEMMs here, with `params` as its parameter
    /// block: one CTA of [`THREADS`] threads an SM (at most `max_ctas`, 0: as many as there are
    /// SMs), no more than `items`, with [`SMEM_BYTES`] of shared memory.
    ///
    /// # Safety
    /// `P` must be the parameter block `function` declares, naming memory the kernel may read
    /// and write; `stream` must belong to this handle's context.
    unsafe fn launch_persistent<P>(
        &self,
        function: &cudarc::driver::CudaFunction,
        stream: cudarc::driver::sys::CUstream,
        params: &mut P,
        items: usize,
        max_ctas: u32,
    ) -> Result<()> {
        let sms = self.limits().sm_count.max(1);
        let ctas = items.min(match max_ctas {
            0 => sms,
            cap => cap.min(sms),
        } as usize) as u32;
        let mut args = [params as *mut P as *mut std::ffi::c_void];
        // SAFETY: the caller's promises; the driver copies the block at the launch.
        unsafe {
            self.context().bind_to_thread()?;
            cudarc::driver::result::launch_kernel(
                function.cu_function(),
                (ctas, 1, 1),
                (THREADS, 1, 1),
                SMEM_BYTES,
                stream,
                &mut args,
            )?;
        }
        Ok(())
    }
}

/// The operands of [`CrossEntropy::gemm_grads_bf16`]: a chunk's logit gradient `g [rows, V]`,
/// its hidden states `h [rows, D]`, the LM head's `w [V, D]`, the weight's gradient
/// `grad_weight [V, D]` (added to with `beta` 1, overwritten with 0) and `grad_hidden [rows, D]`
/// (overwritten; rows `D` elements apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradOperands {
    pub g: Matrix,
    pub h: Matrix,
    pub w: Matrix,
    pub grad_weight: Matrix,
    pub grad_hidden: u64,
}

impl GradOperands {
    /// Why [`CrossEntropy::gemm_grads_bf16`] cannot take them, if it cannot: what
    /// [`Matrix::unfit`] refuses, shapes that do not match, or `D` not a multiple of 256 (the
    /// hidden states' tiles are whole columns).
    fn check(&self) -> Result<()> {
        for (m, what) in [
            (&self.g, "G"),
            (&self.h, "h"),
            (&self.w, "W"),
            (&self.grad_weight, "grad_weight"),
        ] {
            if let Some(why) = m.unfit(what) {
                return Err(Error::InvalidOption(why.replace("gemm_tn", "gemm_grads")));
            }
        }
        let (rows, v, d) = (self.g.rows, self.g.cols, self.h.cols);
        if self.h.rows != rows
            || (self.w.rows, self.w.cols) != (v, d)
            || (self.grad_weight.rows, self.grad_weight.cols) != (v, d)
        {
            return Err(Error::InvalidOption(format!(
                "gemm_grads: G {rows} x {v}, h {} x {d}, W {} x {} and grad_weight {} x {} do not \
                 make G·W and Gᵀ·h",
                self.h.rows, self.w.rows, self.w.cols, self.grad_weight.rows, self.grad_weight.cols
            )));
        }
        if !d.is_multiple_of(256) || self.grad_hidden == 0 || !self.grad_hidden.is_multiple_of(4) {
            return Err(Error::InvalidOption(format!(
                "gemm_grads: D = {d} must be a multiple of 256 and grad_hidden a 4-byte aligned \
                 address"
            )));
        }
        if rows > u32::MAX as usize / 2 || v > u32::MAX as usize / 2 {
            return Err(Error::InvalidOption(
                "gemm_grads: too many rows or classes".into(),
            ));
        }
        Ok(())
    }

    /// Whether [`CrossEntropy::gemm_grads_bf16`] takes them.
    pub fn fit(&self) -> bool {
        self.check().is_ok()
    }
}

/// The scratch of [`CrossEntropy::gemm_grads_bf16`] at `splits` 2 for `rows` rows and a hidden
/// size `dim`: the item counter (4 bytes, then to 256), two flag words a `grad_hidden` tile (to
/// the next 256 bytes), then 128 KiB of partial sums a tile. With `splits` 1 only the counter.
/// Returns (bytes to zero before the launch, bytes in all).
pub fn grads_scratch_bytes(rows: usize, dim: usize, splits: u32) -> (usize, usize) {
    if splits < 2 {
        return (4, 4);
    }
    let tiles = rows.div_ceil(128) * dim.div_ceil(256);
    let zeroed = (256 + 8 * tiles).next_multiple_of(256);
    (zeroed, zeroed + tiles * 128 * 256 * 4)
}

/// The splits of [`CrossEntropy::gemm_grads_bf16`]'s `grad_hidden` tiles on a device of `sms`
/// SMs: 2 (each tile two items of half the vocabulary) when both halves of every tile fit the
/// device at once and the vocabulary has at least two steps of 64, so that a short chunk's few
/// long items do not outlast the weight gradient's tiles; else 1.
pub fn grads_splits(rows: usize, vocab: usize, dim: usize, sms: usize) -> u32 {
    let tiles = rows.div_ceil(128) * dim.div_ceil(256);
    if 2 * tiles <= sms && splits_fit(2, vocab) {
        2
    } else {
        1
    }
}

/// Whether [`CrossEntropy::gemm_grads_bf16`] takes `splits` for a vocabulary of `vocab`
/// classes: 1 always, 2 when each half has at least one step of 64 classes.
pub fn splits_fit(splits: u32, vocab: usize) -> bool {
    splits == 1 || splits == 2 && vocab > 64
}

impl CrossEntropy {
    /// Enqueues both gradient GEMMs of a linear chunk as one launch on `stream`:
    /// `grad_hidden = G·W` and `grad_weight = Gᵀ·h + beta·grad_weight`, bf16, f32 accumulated and
    /// rounded once (`xent_gemm_grads_bf16`, see `kernels-gpu/src/gemm.rs`), with `grad_hidden`'s
    /// tiles split in `splits` (1 or 2) parts of the vocabulary (`None`: [`grads_splits`]'s
    /// choice; 2 needs a vocabulary of more than 64 classes). Compute capability 9.0 only
    /// ([`Error::UnsupportedComputeCapability`] elsewhere).
    ///
    /// # Safety
    /// Each matrix must be a live device allocation of at least `(rows - 1)·ld + cols` bf16
    /// elements (`grad_hidden` of `rows·D`), on this handle's device, not written by anything
    /// else until the GEMMs are done; the outputs must not overlap the inputs or each other.
    pub unsafe fn gemm_grads_bf16(
        &self,
        stream: &Arc<CudaStream>,
        ops: GradOperands,
        beta: f32,
        splits: Option<u32>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let (rows, v, d) = (ops.g.rows, ops.g.cols, ops.h.cols);
        let splits =
            splits.unwrap_or_else(|| grads_splits(rows, v, d, self.limits().sm_count as usize));
        let (_, bytes) = grads_scratch_bytes(rows, d, splits);
        // The counter, flags and partial sums, zeroed in stream order and freed in stream order
        // after the launch.
        let scratch = stream.alloc_zeros::<u8>(bytes)?;
        let (scratch_ptr, _guard) = cudarc::driver::DevicePtr::device_ptr(&scratch, stream);
        // SAFETY: the caller's promises, `stream` is this handle's context's, and the scratch is
        // zeroed memory of the size the splits need, which nothing else uses.
        unsafe { self.gemm_grads_bf16_raw(stream.cu_stream(), ops, beta, (scratch_ptr, splits), 0) }
    }

    /// [`gemm_grads_bf16`](Self::gemm_grads_bf16) on a raw stream of this handle's context, in
    /// the scratch at `scratch` (its first word the item counter; [`grads_scratch_bytes`] for
    /// `splits`), at most `max_ctas` CTAs (0: one an SM).
    ///
    /// # Safety
    /// As `gemm_grads_bf16`; the scratch must hold [`grads_scratch_bytes`]' bytes, the first
    /// ones zero when the launch starts, and nothing else may touch it until the launch ends.
    pub(crate) unsafe fn gemm_grads_bf16_raw(
        &self,
        stream: cudarc::driver::sys::CUstream,
        ops: GradOperands,
        beta: f32,
        (scratch, splits): (u64, u32),
        max_ctas: u32,
    ) -> Result<()> {
        ops.check()?;
        let (rows, v, d) = (ops.g.rows, ops.g.cols, ops.h.cols);
        if !splits_fit(splits, v) {
            return Err(Error::InvalidOption(format!(
                "gemm_grads: {splits} splits of a vocabulary of {v} (1, or 2 above 64 classes)"
            )));
        }
        if !scratch.is_multiple_of(256) {
            return Err(Error::InvalidOption(
                "gemm_grads: the scratch must be 256-byte aligned".into(),
            ));
        }
        let function = &self.wgmma_functions()?[4];
        let (zeroed, _) = grads_scratch_bytes(rows, d, splits);
        let mut params = GradGemmParams {
            tmap_g: ops.g.tensor_map([64, 64])?,
            tmap_h: ops.h.tensor_map([64, 64])?,
            tmap_grad_weight: ops.grad_weight.tensor_map([64, 128])?,
            tmap_w: ops.w.tensor_map([64, 64])?,
            grad_hidden: ops.grad_hidden,
            counter: scratch,
            rows: rows as u32,
            vocab: v as u32,
            dim: d as u32,
            beta,
            flags: scratch + 256,
            partials: scratch + zeroed as u64,
            splits,
            _pad: 0,
        };
        let items = rows.div_ceil(128) * (d / 256) * splits as usize + v.div_ceil(128) * (d / 256);
        // SAFETY: `params` is the parameter block the entry point declares; the maps name the
        // caller's matrices and the scratch the caller's, which the caller vouches for, and
        // `stream` is of this context.
        unsafe { self.launch_persistent(function, stream, &mut params, items, max_ctas) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_gradient_takes_this_gemm_alone_at_short_chunks_on_some_cards_or_when_asked() {
        let (h100, h200) = (Some(CardRates::H100_SXM), Some(CardRates::H200));
        for (knob, rows, alone, rates, want) in [
            (None, 256, true, h100, true),
            (None, 16, true, h100, true),
            (None, 257, true, h100, false),
            (None, 256, false, h100, false),
            (None, 256, true, h200, false),
            (None, 256, true, None, false),
            (Some(""), 192, true, h100, true),
            (Some("0"), 192, true, h100, false),
            (Some("1"), 4096, false, h200, true),
            (Some("1"), 192, true, None, true),
        ] {
            assert_eq!(
                wanted(knob, rows, alone, rates),
                want,
                "{knob:?}, {rows} rows, alone {alone}, {rates:?}"
            );
        }
        // The line lies between the two cards measured.
        let line = ALONE_MIN_FLOPS_PER_BYTE;
        assert!(
            CardRates::H200.flops_per_byte() < line && line < CardRates::H100_SXM.flops_per_byte()
        );
    }
}
