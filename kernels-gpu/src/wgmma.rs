//! Prototype (issue 12, "beyond"; sm_90a, its own PTX): [`crate::lse_gemm`]'s log-sum-exp of
//! `hidden · weightᵀ` on Hopper's warpgroup MMA. A CTA of two warpgroups (256 threads) takes 128
//! rows and a range of the vocabulary; per tile of 128 classes each warpgroup multiplies its 64
//! rows by the tile (`wgmma` m64n128k16, bf16 in, f32 accumulated, both operands read from
//! shared memory through descriptors), two stages of 64 along `D` filled by `cp.async` in the
//! no-swizzle core-matrix layout, then folds the tile into each row's running (max, sum). Same
//! parameters and output as `xent_lse_gemm_bf16`. `xent_lse_wgmma_pipe_bf16` is the same with
//! four stages, copies two steps ahead and `wgmma`s left in flight ([`lse_wgmma_pipe_bf16`]).
//!
//! Shared memory, per stage and operand (128 rows x 64 of `D`, bf16): core matrices of 8 rows x
//! 8 elements (128 contiguous bytes, row `r % 8` at `16·(r % 8)`), core matrix (row group `i`,
//! `D` group `j`) at `128·(8·i + j)`: 128 bytes between neighbours along `D` (the descriptor's
//! leading offset) and 1024 along the rows (its stride offset). If the first GPU run finds the
//! products wrong, those two offsets swapped is the first suspect.

use crate::abi::LseGemmParams;
use crate::lse_gemm::{BK, BM, Share, quad_merge};
use crate::prim::{self, thread_idx};
use crate::reduce::Lse2;
use core::f32::consts::LOG2_E;

/// Bytes of one operand's tile in one stage (no padding: the core-matrix layout).
const TILE_BYTES: u32 = BM * BK * 2;
/// Core-matrix offsets: along `D` (leading) and along the rows (stride).
const LEADING: u32 = 128;
const STRIDE: u32 = 1024;

/// Where piece (row `r`, `D` group `j`) of a tile goes: core matrix (`r / 8`, `j`), row `r % 8`.
#[inline(always)]
fn core_matrix(r: u32, j: u32) -> u32 {
    (8 * (r / 8) + j) * LEADING + (r % 8) * 16
}

/// Launch: as `xent_lse_gemm_bf16` (`row_blocks · splits` CTAs of 256 threads, see
/// [`Share`]), dynamic shared memory `4 · TILE_BYTES` (65536 bytes).
#[inline(always)]
pub unsafe fn lse_wgmma_bf16(p: &LseGemmParams) {
    let me = Place::of_thread();
    let share = Share::of(p);
    // The thread's two rows of its warpgroup's 64: `16·warp + g` and 8 further, in log2 units.
    let mut run = [Lse2::EMPTY; 2];
    let mut acc = [0.0f32; 64];
    unsafe { share.start(p, stage, core_matrix) };
    let mut it = 0;
    while it < share.total {
        let (col0, k0) = share.step(it);
        unsafe { share.advance(p, it, stage, core_matrix) };
        // This thread's copies, then everyone's, visible to the MMA's async proxy.
        prim::fence_proxy_async_shared();
        prim::sync_threads();
        mma_step(&mut acc, stage(it % 2), me.warpgroup, k0);
        prim::wgmma_wait_all();
        // Every warpgroup done with this stage before the next step's copies overwrite it.
        prim::sync_threads();
        if k0 + BK == share.k_steps * BK {
            fold(&mut run, &acc, col0 + 2 * me.q, share.col_end);
        }
        it += 1;
    }
    unsafe { store_rows(p, &share, run, me) };
}

/// Issues and commits the warpgroup's `wgmma`s of one step: its 64 rows of the stage's rows tile
/// (`a_base`) by the stage's 128 classes (`b_base`), 64 along `D`, added to `acc` except at a
/// tile's first step (`k0` 0). Returns without waiting for them.
#[inline(always)]
fn mma_step(acc: &mut [f32; 64], (a_base, b_base): (u32, u32), warpgroup: u32, k0: u32) {
    // The warpgroup's 64 rows: 8 row groups of 8 core matrices.
    let a_rows = a_base + warpgroup * 8 * STRIDE;
    prim::wgmma_fence();
    let mut kk = 0;
    while kk < BK / 16 {
        // Each k16 step is two core matrices along `D`.
        let desc_a = prim::wgmma_desc(a_rows + kk * 2 * LEADING, LEADING, STRIDE);
        let desc_b = prim::wgmma_desc(b_base + kk * 2 * LEADING, LEADING, STRIDE);
        prim::wgmma_m64n128k16_bf16(acc, desc_a, desc_b, k0 > 0 || kk > 0);
        kk += 1;
    }
    prim::wgmma_commit();
}

/// Folds a finished tile's accumulators into the thread's two rows' running (max, sum):
/// accumulator `4·j + 2·h + e` is row `16·warp + g + 8·h`, class `first + 8·j + e` (`first` =
/// the tile's first class + `2·q`); classes from `col_end` on are not the range's.
#[inline(always)]
fn fold(run: &mut [Lse2; 2], acc: &[f32; 64], first: u32, col_end: u32) {
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
            run[h].add_log2(&vals, 8);
        });
    });
}

/// Stores each of the thread's two rows' (max, sum) once its quad has merged them.
#[inline(always)]
unsafe fn store_rows(p: &LseGemmParams, share: &Share, mut run: [Lse2; 2], me: Place) {
    crate::each!(h in [0, 1] => {
        run[h] = quad_merge(run[h]);
        if me.q == 0 {
            let row = share.row0 + 64 * me.warpgroup + 16 * me.warp + me.g + 8 * h as u32;
            unsafe { share.store(p, row, run[h]) };
        }
    });
}

/// A thread's place in the CTA: its warpgroup (64 rows each), its warp in it, and its lane's
/// row (`g`, and 8 further) and column pair (`2·q`) in the MMA's accumulator fragments.
#[derive(Clone, Copy)]
struct Place {
    warpgroup: u32,
    warp: u32,
    g: u32,
    q: u32,
}

impl Place {
    #[inline(always)]
    fn of_thread() -> Place {
        let tid = thread_idx();
        let lane = tid % 32;
        Place { warpgroup: tid / 128, warp: (tid / 32) % 4, g: lane / 4, q: lane % 4 }
    }
}

/// Stage `s`'s two tiles in shared memory: the rows' and the weight's.
#[inline(always)]
fn stage(s: u32) -> (u32, u32) {
    let base = prim::smem_base() + s * 2 * TILE_BYTES;
    (base, base + TILE_BYTES)
}

/// Stages of [`lse_wgmma_pipe_bf16`]'s pipeline, and how many steps ahead its copies run: a
/// stage is refilled two steps after its `wgmma`s were issued, once a `wait_group 1` and a
/// barrier say they are done.
const STAGES: u32 = 4;
const AHEAD: u32 = STAGES - 2;

/// Launch: as [`lse_wgmma_bf16`], dynamic shared memory `2 · STAGES · TILE_BYTES` (131072
/// bytes). The same tiles and layout, pipelined: copies run two steps ahead into four stages,
/// and each step's `wgmma`s stay in flight while the next step's copies are waited for (`wait_group
/// 1`); only a tile's last step waits for all of them, before its fold.
#[inline(always)]
pub unsafe fn lse_wgmma_pipe_bf16(p: &LseGemmParams) {
    let me = Place::of_thread();
    let share = Share::of(p);
    let mut run = [Lse2::EMPTY; 2];
    let mut acc = [0.0f32; 64];
    // Steps 0 .. AHEAD, one copy group each (empty past the end, so that the count of groups
    // in flight is the same at every step).
    let mut s = 0;
    while s < AHEAD {
        if s < share.total {
            unsafe { share.load(p, s, stage(s % STAGES), core_matrix) };
        }
        prim::cp_async_commit();
        s += 1;
    }
    let mut it = 0;
    while it < share.total {
        let (col0, k0) = share.step(it);
        // This thread's copies of step `it` (the one group younger than them may still fly).
        prim::cp_async_wait_one();
        prim::fence_proxy_async_shared();
        // Everyone's copies of step `it` have landed, and every warpgroup's `wgmma`s of step
        // `it - 2` are done (each waited for all but its newest group before arriving): stage
        // `(it + AHEAD) % STAGES`, step `it - 2`'s, is free.
        prim::sync_threads();
        let ahead = it + AHEAD;
        if ahead < share.total {
            unsafe { share.load(p, ahead, stage(ahead % STAGES), core_matrix) };
        }
        prim::cp_async_commit();
        mma_step(&mut acc, stage(it % STAGES), me.warpgroup, k0);
        if k0 + BK == share.k_steps * BK {
            // The tile's last step: its sums are read now.
            prim::wgmma_wait_all();
            fold(&mut run, &acc, col0 + 2 * me.q, share.col_end);
        } else {
            prim::wgmma_wait_one();
        }
        it += 1;
    }
    prim::wgmma_wait_all();
    unsafe { store_rows(p, &share, run, me) };
}
