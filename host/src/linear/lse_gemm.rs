//! Prototype (issue 12, "beyond"; not yet run on a GPU): the log-sum-exp of every row of
//! `hidden · weightᵀ` on the tensor cores without writing the logits (CCE's idea, in Rust):
//! `xent_lse_gemm_bf16` multiplies tiles of 128 rows by 128 classes with `mma.sync` (bf16 in,
//! f32 accumulated) and folds each tile into the rows' running (max, sum) in registers. It is the
//! forward's expensive half; the loss also needs each row's label logit (one dot product a row)
//! and the gradients. Its rate against cuBLASLt's GEMM alone is what `cargo bench -p xent
//! --bench lse_gemm` reports.

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use super::gemm_tn::Matrix;
use crate::CrossEntropy;
use crate::abi::{LseGemmParams, LseTmaParams};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, PTX_SM90A};

/// Threads of a CTA (8 warps: 2 along the rows x 4 along the classes).
const THREADS: u32 = 256;
/// Rows of a CTA's tile.
pub const ROWS_PER_CTA: usize = 128;
/// `dim` must be a multiple of this (the depth of a tile along `D`).
pub const DIM_MULTIPLE: usize = 64;
/// Dynamic shared memory of a CTA: two stages of two 128 x 72 bf16 tiles.
const SMEM_BYTES: u32 = 2 * 2 * 128 * 72 * 2;
/// The same for the warpgroup-MMA kernel: two stages of two 128 x 64 bf16 tiles (no padding).
const WGMMA_SMEM_BYTES: u32 = 2 * 2 * 128 * 64 * 2;
/// The pipelined `wgmma` kernel's: four stages (one CTA an SM).
const WGMMA_PIPE_SMEM_BYTES: u32 = 4 * 2 * 128 * 64 * 2;
/// The TMA kernel's: four stages of a 128 x 64 and a 256 x 64 bf16 tile, 1024 bytes to align
/// them, and the stages' barriers.
const TMA_SMEM_BYTES: u32 = 4 * (128 + 256) * 64 * 2 + 2048;
/// The TMA kernel's threads: two consumer warpgroups and one producer warp.
const TMA_THREADS: u32 = 288;
/// The TMA kernel's classes per tile (rows: [`ROWS_PER_CTA`]) and its rows' tile along `D`.
const TMA_BOX: [u32; 3] = [64, 128, 256];
/// Row blocks the TMA kernel's CTAs take side by side (`LseGemmParams::group_rows`), unless
/// `XENT_LSE_GROUP` says otherwise.
const TMA_GROUP_ROWS: u32 = 16;

/// Ranges of the vocabulary per row block for `rows` rows on `sm_count` SMs, for kernels that
/// hold two CTAs an SM ([`auto_splits_for`] with 2).
pub fn auto_splits(rows: usize, vocab: usize, sm_count: u32) -> usize {
    auto_splits_for(rows, vocab, sm_count, 2)
}

/// Ranges of the vocabulary per row block for `rows` rows on `sm_count` SMs, `per_sm` CTAs
/// resident an SM ([`LseGemmKernel::ctas_per_sm`]): the count (at most four times what one wave
/// needs, and at most one per tile of 128 classes) whose CTAs fill their last wave best, the
/// smaller on a tie (every range reloads the rows' tiles for each of its class tiles, so the
/// count moves no traffic; only the waves' tail); with one CTA an SM, at least
/// [`ONE_CTA_MIN_SPLITS`].
pub fn auto_splits_for(rows: usize, vocab: usize, sm_count: u32, per_sm: u32) -> usize {
    let row_blocks = rows.div_ceil(ROWS_PER_CTA).max(1);
    let slots = per_sm.max(1) as usize * sm_count.max(1) as usize;
    let most = (4 * slots.div_ceil(row_blocks)).clamp(1, vocab.div_ceil(128).max(1));
    let fill = |splits: usize| {
        let ctas = row_blocks * splits;
        ctas as f64 / (ctas.div_ceil(slots) * slots) as f64
    };
    let best = (1..=most).fold(
        1,
        |best, s| if fill(s) > fill(best) + 1e-9 { s } else { best },
    );
    if per_sm == 1 {
        best.max(ONE_CTA_MIN_SPLITS.min(vocab.div_ceil(128).max(1)))
    } else {
        best
    }
}

/// The fewest ranges [`auto_splits_for`] gives a kernel of one CTA an SM (the TMA kernel): a
/// CTA that sweeps the whole vocabulary of its row block runs one long wave, and the slowest SM
/// sets its end; shorter ranges in several waves even it out. Measured on an H200 (2026-12-02,
/// `xent_lse_tma_bf16`, N x 4096 x 128256, TFLOP/s): 8192 rows, 2 ranges (the fullest wave) 635
/// and 654 in two runs, 8 ranges 670; 16384 rows, 1 range 552-561, 8 ranges 623-632.
pub const ONE_CTA_MIN_SPLITS: usize = 8;

/// Which kernel [`CrossEntropy::lse_gemm_partials`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LseGemmKernel {
    /// `xent_lse_gemm_bf16`: `mma.sync` (sm_80 and later), in the main PTX.
    MmaSync,
    /// `xent_lse_wgmma_bf16`: Hopper's warpgroup MMA, from the sm_90a PTX (compute capability
    /// 9.0 only; [`Error::UnsupportedComputeCapability`] elsewhere).
    Wgmma,
    /// `xent_lse_wgmma_pipe_bf16`: the same, pipelined (four stages, copies two steps ahead,
    /// `wgmma`s left in flight across steps); sm_90a as [`Wgmma`](Self::Wgmma).
    WgmmaPipelined,
    /// `xent_lse_tma_bf16`: tiles of 128 rows by 256 classes copied by the tensor memory
    /// accelerator (128-byte swizzle) into four stages by a producer warp, `wgmma` m64n256k16
    /// by two consumer warpgroups, stages handed over through mbarriers; sm_90a.
    Tma,
}

impl LseGemmKernel {
    /// Every kernel, the sm_90a ones last.
    pub const ALL: [LseGemmKernel; 4] = [
        LseGemmKernel::MmaSync,
        LseGemmKernel::Wgmma,
        LseGemmKernel::WgmmaPipelined,
        LseGemmKernel::Tma,
    ];

    /// Whether it lives in the sm_90a module (compute capability 9.0 only).
    pub fn needs_sm90a(self) -> bool {
        self != LseGemmKernel::MmaSync
    }

    /// CTAs an H100/H200 SM holds of it (registers and shared memory): two of the two-stage
    /// kernels (128 and 122 registers, 72 and 64 KiB), one of the pipelined one (128 KiB) and
    /// of the TMA one (194 KiB).
    pub fn ctas_per_sm(self) -> u32 {
        match self {
            LseGemmKernel::WgmmaPipelined | LseGemmKernel::Tma => 1,
            _ => 2,
        }
    }
}

impl CrossEntropy {
    /// Enqueues `kernel` for `hidden [rows, dim]` and `weight [vocab, dim]` (bf16, rows
    /// contiguous): writes into `partials` (`[splits, rows, 2]` f32) each of `splits` equal
    /// ranges of the vocabulary's (max, sum) per row, the max in log2 units and the sum of
    /// `2^(x·log2(e) - max)`; [`merge_partials`] turns them into each row's log-sum-exp.
    /// Prototype: see the module doc.
    #[allow(clippy::too_many_arguments)]
    pub fn lse_gemm_partials(
        &self,
        stream: &Arc<CudaStream>,
        kernel: LseGemmKernel,
        hidden: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        (rows, vocab, dim): (usize, usize, usize),
        splits: usize,
        partials: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let bad = |what: String| Err(Error::InvalidOption(what));
        if rows == 0 || vocab == 0 {
            return bad(format!(
                "lse_gemm: rows {rows} and vocab {vocab} must be positive"
            ));
        }
        if dim == 0 || !dim.is_multiple_of(DIM_MULTIPLE) {
            return bad(format!(
                "lse_gemm: dim {dim} must be a positive multiple of {DIM_MULTIPLE}"
            ));
        }
        if splits == 0 || splits > vocab {
            return bad(format!("lse_gemm: splits {splits} must be in [1, vocab]"));
        }
        let as_u32 = |v: usize, what: &str| {
            u32::try_from(v)
                .map_err(|_| Error::InvalidOption(format!("lse_gemm: {what} {v} exceeds u32")))
        };
        let need = |len: usize, want: usize, what: &str| {
            if len < want {
                Err(Error::InvalidOption(format!(
                    "lse_gemm: {what} holds {len} elements, needs {want}"
                )))
            } else {
                Ok(())
            }
        };
        need(hidden.len(), rows * dim, "hidden")?;
        need(weight.len(), vocab * dim, "weight")?;
        need(partials.len(), splits * rows * 2, "partials")?;
        let row_blocks = rows.div_ceil(ROWS_PER_CTA);
        let blocks = as_u32(row_blocks * splits, "CTAs")?;
        let wgmma = match kernel {
            LseGemmKernel::MmaSync => None,
            LseGemmKernel::Wgmma => Some((&self.wgmma_functions()?[0], WGMMA_SMEM_BYTES)),
            LseGemmKernel::WgmmaPipelined => {
                Some((&self.wgmma_functions()?[1], WGMMA_PIPE_SMEM_BYTES))
            }
            // Launched below with its own parameter block.
            LseGemmKernel::Tma => None,
        };
        let (hidden_ptr, _h) = hidden.device_ptr(stream);
        let (weight_ptr, _w) = weight.device_ptr(stream);
        let (partials_ptr, _p) = partials.device_ptr_mut(stream);
        let params = LseGemmParams {
            hidden: hidden_ptr,
            weight: weight_ptr,
            partials: partials_ptr,
            n_rows: as_u32(rows, "rows")?,
            vocab: as_u32(vocab, "vocab")?,
            dim: as_u32(dim, "dim")?,
            vocab_per_split: as_u32(vocab.div_ceil(splits), "vocab per split")?,
        };
        if kernel == LseGemmKernel::Tma {
            let group_rows = std::env::var("XENT_LSE_GROUP")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(TMA_GROUP_ROWS);
            let tma = LseTmaParams {
                tmap_hidden: Matrix::dense(hidden_ptr, rows, dim)
                    .tensor_map([TMA_BOX[0], TMA_BOX[1]])?,
                tmap_weight: Matrix::dense(weight_ptr, vocab, dim)
                    .tensor_map([TMA_BOX[0], TMA_BOX[2]])?,
                call: params,
                group_rows,
                _pad: 0,
            };
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (TMA_THREADS, 1, 1),
                shared_mem_bytes: TMA_SMEM_BYTES,
            };
            // SAFETY: `tma` is the parameter block the entry point declares; its addresses and
            // tensor maps were checked against the shape above.
            unsafe {
                stream
                    .launch_builder(&self.wgmma_functions()?[2])
                    .arg(&tma)
                    .launch(cfg)
            }?;
            return Ok(());
        }
        match wgmma {
            None => {
                self.preload([Some(Kernel::LseGemm)])?;
                self.launch(
                    stream,
                    Kernel::LseGemm,
                    &params,
                    blocks,
                    THREADS,
                    SMEM_BYTES,
                )
            }
            Some((function, smem)) => {
                let cfg = LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: smem,
                };
                // SAFETY: `params` is the parameter block the entry point declares; every address
                // in it was checked against the shape above.
                unsafe { stream.launch_builder(function).arg(&params).launch(cfg) }?;
                Ok(())
            }
        }
    }

    /// The sm_90a module's functions (`xent_lse_wgmma_bf16`, `xent_lse_wgmma_pipe_bf16`,
    /// `xent_lse_tma_bf16`, `xent_gemm_tn_bf16`, `xent_gemm_grads_bf16`), loading it the first
    /// time.
    pub(crate) fn wgmma_functions(&self) -> Result<&[CudaFunction; 5]> {
        let loaded = self.wgmma.get_or_init(|| {
            let load = || -> Result<[CudaFunction; 5]> {
                let (major, minor) = self.context().compute_capability()?;
                if (major, minor) != (9, 0) {
                    return Err(Error::UnsupportedComputeCapability { major, minor });
                }
                let module = self.context().load_module(Ptx::from_src(PTX_SM90A))?;
                let function = |name: &str, smem: u32| -> Result<CudaFunction> {
                    let function = module.load_function(name)?;
                    function.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )?;
                    Ok(function)
                };
                Ok([
                    function("xent_lse_wgmma_bf16", WGMMA_SMEM_BYTES)?,
                    function("xent_lse_wgmma_pipe_bf16", WGMMA_PIPE_SMEM_BYTES)?,
                    function("xent_lse_tma_bf16", TMA_SMEM_BYTES)?,
                    function("xent_gemm_tn_bf16", super::gemm_tn::SMEM_BYTES)?,
                    function("xent_gemm_grads_bf16", super::gemm_tn::SMEM_BYTES)?,
                ])
            };
            load().map_err(|err| err.to_string())
        });
        loaded
            .as_ref()
            .map_err(|why| Error::Driver(format!("the sm_90a module: {why}")))
    }
}

/// Each row's natural log-sum-exp from [`CrossEntropy::lse_gemm_partials`]'s `partials`
/// (`[splits, rows, 2]`), merged in f64.
pub fn merge_partials(partials: &[f32], rows: usize, splits: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let pairs = (0..splits).map(|s| {
                let at = 2 * (s * rows + r);
                (partials[at] as f64, partials[at + 1] as f64)
            });
            let m = pairs
                .clone()
                .map(|(m, _)| m)
                .fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                return f64::NEG_INFINITY;
            }
            let s: f64 = pairs.map(|(pm, ps)| ps * (pm - m).exp2()).sum();
            (m + s.log2()) * std::f64::consts::LN_2
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_splits_fill_the_last_wave_of_two_ctas_per_sm() {
        // 64 row blocks on 132 SMs: 4 ranges make 256 CTAs, 97% of one wave of 264.
        assert_eq!(auto_splits(8192, 128256, 132), 4);
        assert_eq!(auto_splits(16384, 128256, 132), 2);
        // One row block: as many ranges as fill a wave, at most one per class tile.
        assert_eq!(auto_splits(1, 128256, 132), 264);
        assert_eq!(auto_splits(1, 1000, 132), 8);
        // One CTA an SM: 64 row blocks fill 132 slots best with 2 ranges, but the waves of
        // that long a range end with their slowest SM: at least 8.
        assert_eq!(auto_splits_for(8192, 128256, 132, 1), ONE_CTA_MIN_SPLITS);
        assert_eq!(auto_splits_for(16384, 128256, 132, 1), ONE_CTA_MIN_SPLITS);
        // Few rows still fill a wave; a vocabulary of 3 class tiles has 3 ranges at most.
        assert_eq!(auto_splits_for(128, 128256, 132, 1), 132);
        assert_eq!(auto_splits_for(8192, 300, 132, 1), 3);
    }

    #[test]
    fn merge_partials_combines_ranges_in_log2_units() {
        // Two ranges of one row: (max 1, sum 1) and (max 3, sum 2), log2 units: 2^1 + 2·2^3.
        let lse = merge_partials(&[1.0, 1.0, 3.0, 2.0], 1, 2);
        assert!((lse[0] - (2f64 + 16.0).ln()).abs() < 1e-12, "{lse:?}");
        // An empty range, (-inf, 0), adds nothing.
        let lse = merge_partials(&[f32::NEG_INFINITY, 0.0, 0.0, 1.0], 1, 2);
        assert!(lse[0].abs() < 1e-12, "{lse:?}");
    }
}
