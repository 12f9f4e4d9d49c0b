//! Prototype (issue 12, "beyond"; sm_90a, its own PTX): [`crate::lse_gemm`]'s log-sum-exp of
//! `hidden · weightᵀ` on Hopper's warpgroup MMA. A CTA of two warpgroups (256 threads) takes 128
//! rows and a range of the vocabulary; per tile of 128 classes each warpgroup multiplies its 64
//! rows by the tile (`wgmma` m64n128k16, bf16 in, f32 accumulated, both operands read from
//! shared memory through descriptors), two stages of 64 along `D` filled by `cp.async` in the
//! no-swizzle core-matrix layout, then folds the tile into each row's running (max, sum). Same
//! parameters and output as `xent_lse_gemm_bf16`.
//!
//! Shared memory, per stage and operand (128 rows x 64 of `D`, bf16): core matrices of 8 rows x
//! 8 elements (128 contiguous bytes, row `r % 8` at `16·(r % 8)`), core matrix (row group `i`,
//! `D` group `j`) at `128·(8·i + j)`: 128 bytes between neighbours along `D` (the descriptor's
//! leading offset) and 1024 along the rows (its stride offset). If the first GPU run finds the
//! products wrong, those two offsets swapped is the first suspect.

use crate::abi::LseGemmParams;
use crate::prim::{self, thread_idx};
use core::f32::consts::LOG2_E;

const BM: u32 = 128;
const BN: u32 = 128;
const BK: u32 = 64;
/// Bytes of one operand's tile in one stage (no padding: the core-matrix layout).
const TILE_BYTES: u32 = BM * BK * 2;
/// Core-matrix offsets: along `D` (leading) and along the rows (stride).
const LEADING: u32 = 128;
const STRIDE: u32 = 1024;

/// Issues the copies of one stage: for each operand, 128 rows x 8 pieces of 16 bytes, piece
/// (row `r`, `D` group `j`) to core matrix (`r / 8`, `j`), row `r % 8`.
#[inline(always)]
unsafe fn load_stage(p: &LseGemmParams, a_base: u32, row0: u32, col0: u32, k0: u32, col_end: u32) {
    let b_base = a_base + TILE_BYTES;
    let mut i = thread_idx();
    while i < BM * (BK / 8) {
        let (r, j) = (i / (BK / 8), i % (BK / 8));
        let dst = (8 * (r / 8) + j) * 128 + (r % 8) * 16;
        let k = (k0 + 8 * j) as u64;
        let row = row0 + r;
        let a_src = p.hidden + ((row.min(p.n_rows - 1) as u64) * p.dim as u64 + k) * 2;
        unsafe { prim::cp_async_16(a_base + dst, a_src, row < p.n_rows) };
        let col = col0 + r;
        let b_src = p.weight + ((col.min(p.vocab - 1) as u64) * p.dim as u64 + k) * 2;
        unsafe { prim::cp_async_16(b_base + dst, b_src, col < col_end) };
        i += prim::block_dim();
    }
}

/// Launch: as `xent_lse_gemm_bf16` (`row_blocks · splits` CTAs of 256 threads, block `b`: row
/// block `b % row_blocks`, range `b / row_blocks`), dynamic shared memory `4 · TILE_BYTES`
/// (65536 bytes).
#[inline(always)]
pub unsafe fn lse_wgmma_bf16(p: &LseGemmParams) {
    let tid = thread_idx();
    let (warpgroup, warp, lane) = (tid / 128, (tid / 32) % 4, tid % 32);
    let row_blocks = p.n_rows.div_ceil(BM).max(1);
    let block = prim::block_idx();
    let (rb, split) = (block % row_blocks, block / row_blocks);
    let row0 = rb * BM;
    let col_begin = split * p.vocab_per_split;
    let col_end = (col_begin + p.vocab_per_split).min(p.vocab);
    let smem = prim::smem_base();
    let (g, q) = (lane / 4, lane % 4);
    // The thread's two rows of its warpgroup's 64: `16·warp + g` and 8 further.
    let mut run_m = [f32::NEG_INFINITY; 2];
    let mut run_s = [0.0f32; 2];
    let k_steps = (p.dim / BK).max(1);
    let tiles = if col_end > col_begin { (col_end - col_begin).div_ceil(BN) } else { 0 };
    let total = tiles * k_steps;
    let mut acc = [0.0f32; 64];
    if total > 0 {
        unsafe { load_stage(p, smem, row0, col_begin, 0, col_end) };
    }
    prim::cp_async_commit();
    let mut it = 0;
    while it < total {
        let (tile, ks) = (it / k_steps, it % k_steps);
        let col0 = col_begin + tile * BN;
        if it + 1 < total {
            let (next_tile, next_ks) = ((it + 1) / k_steps, (it + 1) % k_steps);
            let next_base = smem + ((it + 1) % 2) * 2 * TILE_BYTES;
            unsafe { load_stage(p, next_base, row0, col_begin + next_tile * BN, next_ks * BK, col_end) };
            prim::cp_async_commit();
            prim::cp_async_wait_one();
        } else {
            prim::cp_async_wait_all();
        }
        // This thread's copies, then everyone's, visible to the MMA's async proxy.
        prim::fence_proxy_async_shared();
        prim::sync_threads();
        let a_base = smem + (it % 2) * 2 * TILE_BYTES;
        let b_base = a_base + TILE_BYTES;
        // The warpgroup's 64 rows: 8 row groups of 8 core matrices.
        let a_rows = a_base + warpgroup * 8 * STRIDE;
        prim::wgmma_fence();
        let mut kk = 0;
        while kk < BK / 16 {
            // Each k16 step is two core matrices along `D`.
            let desc_a = prim::wgmma_desc(a_rows + kk * 2 * LEADING, LEADING, STRIDE);
            let desc_b = prim::wgmma_desc(b_base + kk * 2 * LEADING, LEADING, STRIDE);
            prim::wgmma_m64n128k16_bf16(&mut acc, desc_a, desc_b, ks > 0 || kk > 0);
            kk += 1;
        }
        prim::wgmma_commit();
        prim::wgmma_wait_all();
        // Every warpgroup done with this stage before the next step's copies overwrite it.
        prim::sync_threads();
        if ks == k_steps - 1 {
            // Accumulator `4·j + 2·h + e`: row `16·warp + g + 8·h`, class `8·j + 2·q + e`.
            let first = col0 + 2 * q;
            crate::each!(h in [0, 1] => {
                crate::each!(quarter in [0, 1, 2, 3] => {
                    let mut vals = [f32::NEG_INFINITY; 8];
                    crate::each!(jj in [0, 1, 2, 3] => {
                        let j = 4 * quarter + jj;
                        crate::each!(e in [0, 1] => {
                            if first + ((8 * j + e) as u32) < col_end {
                                vals[2 * jj + e] = acc[4 * j + 2 * h + e] * LOG2_E;
                            }
                        });
                    });
                    crate::lse_gemm::fold(&mut run_m[h], &mut run_s[h], &vals);
                });
            });
        }
        it += 1;
    }
    crate::each!(h in [0, 1] => {
        crate::each!(mask in [1, 2] => {
            let om = prim::shfl_xor_f32(run_m[h], mask as u32);
            let os = prim::shfl_xor_f32(run_s[h], mask as u32);
            crate::lse_gemm::merge(&mut run_m[h], &mut run_s[h], om, os);
        });
    });
    if q == 0 {
        crate::each!(h in [0, 1] => {
            let row = row0 + 64 * warpgroup + 16 * warp + g + 8 * h as u32;
            if row < p.n_rows {
                let out = p.partials + ((split as u64 * p.n_rows as u64 + row as u64) * 2) * 4;
                unsafe {
                    prim::st_global_u32(out, run_m[h].to_bits());
                    prim::st_global_u32(out + 4, run_s[h].to_bits());
                }
            }
        });
    }
}
