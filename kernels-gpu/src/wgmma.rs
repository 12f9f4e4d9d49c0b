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

use crate::abi::{LseGemmParams, LseTmaParams};
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

/// Classes of [`lse_tma_bf16`]'s tile, its stages, and the bytes of one stage's two tiles (rows
/// 128 x 64, classes 256 x 64, bf16, each in TMA's 128-byte swizzle layout: 8-row atoms of 1024
/// bytes).
const TMA_BN: u32 = 256;
const TMA_STAGES: u32 = 4;
const TMA_A_BYTES: u32 = BM * BK * 2;
const TMA_STAGE_BYTES: u32 = TMA_A_BYTES + TMA_BN * BK * 2;
/// Warps that arrive on a stage's "empty" barrier: the two consumer warpgroups' eight.
const TMA_CONSUMER_WARPS: u32 = 8;

/// A CTA's share of a [`lse_tma_bf16`] launch: rows `[row0, row0 + 128)` against classes
/// `[col_begin, col_end)` of range `split`, in `total` steps of 256 classes by 64 of `D`. Block
/// `b` takes its row block and range so that the CTAs running together cover `group_rows` row
/// blocks (each through every range) and so share both operands' tiles in L2.
#[derive(Clone, Copy)]
struct TmaShare {
    row0: u32,
    split: u32,
    col_begin: u32,
    col_end: u32,
    k_steps: u32,
    total: u32,
}

impl TmaShare {
    #[inline(always)]
    fn of(p: &LseGemmParams, group_rows: u32) -> TmaShare {
        let row_blocks = p.n_rows.div_ceil(BM).max(1);
        let splits = p.vocab.div_ceil(p.vocab_per_split.max(1)).max(1);
        let group = group_rows.clamp(1, row_blocks);
        let b = prim::block_idx();
        let per_group = (group * splits).max(1);
        let first = b / per_group * group;
        let size = group.min(row_blocks.saturating_sub(first)).max(1);
        let local = b % per_group;
        let split = local / size;
        let col_begin = split * p.vocab_per_split;
        let col_end = (col_begin + p.vocab_per_split).min(p.vocab);
        let k_steps = (p.dim / BK).max(1);
        let tiles = if col_end > col_begin { (col_end - col_begin).div_ceil(TMA_BN) } else { 0 };
        TmaShare {
            row0: (first + local % size) * BM,
            split,
            col_begin,
            col_end,
            k_steps,
            total: tiles * k_steps,
        }
    }

    /// Step `it`'s first class and depth along `D`.
    #[inline(always)]
    fn step(self, it: u32) -> (u32, u32) {
        (self.col_begin + it / self.k_steps * TMA_BN, it % self.k_steps * BK)
    }
}

/// Launch: `row_blocks · splits` CTAs of 288 threads (two consumer warpgroups, then one producer
/// warp), dynamic shared memory `TMA_STAGES · TMA_STAGE_BYTES + 2048` (the stages 1024-byte
/// aligned, then the barriers). Same output as [`lse_wgmma_bf16`].
///
/// The producer warp's first lane walks the CTA's steps: it waits until a stage is free (its
/// "empty" barrier), then has the tensor memory accelerator copy the step's two tiles into it
/// (one `cp.async.bulk.tensor` each, completing on the stage's "full" barrier). Each consumer
/// warpgroup waits for a stage to be full, issues four `wgmma` m64n256k16 on its 64 rows, and
/// releases the stage the step before used once `wait_group 1` says those are done; a tile's last
/// step waits for all, releases both, and folds the tile into the rows' running (max, sum). No
/// barrier of the whole CTA after the start.
#[inline(always)]
pub unsafe fn lse_tma_bf16(tp: &LseTmaParams) {
    let p = &tp.call;
    // The tensor maps, read by the tensor memory accelerator in parameter space.
    let maps = crate::param_block_generic!("xent_lse_tma_bf16");
    let tid = thread_idx();
    let base = (prim::smem_base() + 1023) & !1023;
    let bars = base + TMA_STAGES * TMA_STAGE_BYTES;
    let full = |s: u32| bars + 8 * s;
    let empty = |s: u32| bars + 8 * (TMA_STAGES + s);
    let share = TmaShare::of(p, tp.group_rows);
    unsafe { init_pipeline(bars, TMA_STAGES, TMA_CONSUMER_WARPS, 0) };
    // The role by warp, uniform in ptxas' eyes: a branch it must assume divergent serialises
    // every `wgmma` behind it (C7518).
    let warp = prim::warp_uniform(tid / 32);
    if warp >= TMA_CONSUMER_WARPS {
        if tid % 32 == 0 {
            let mut it = 0;
            while it < share.total {
                let s = it % TMA_STAGES;
                // A fresh barrier's phase "before 0" counts as complete: the first round passes.
                unsafe { prim::mbarrier_wait(empty(s), (it / TMA_STAGES + 1) & 1) };
                let (col0, k0) = share.step(it);
                let a = base + s * TMA_STAGE_BYTES;
                unsafe {
                    prim::mbarrier_arrive_expect_tx(full(s), TMA_STAGE_BYTES);
                    prim::tma_load_2d(a, maps, k0, share.row0, full(s));
                    prim::tma_load_2d(a + TMA_A_BYTES, maps + 128, k0, col0, full(s));
                }
                it += 1;
            }
        }
        return;
    }
    let me = Place::of_thread();
    let lane0 = tid % 32 == 0;
    let mut run = [Lse2::EMPTY; 2];
    let (mut lo, mut hi) = ([0.0f32; 64], [0.0f32; 64]);
    // The stage of the step before, not yet released.
    let mut pending: Option<u32> = None;
    let mut it = 0;
    while it < share.total {
        let s = it % TMA_STAGES;
        unsafe { prim::mbarrier_wait(full(s), (it / TMA_STAGES) & 1) };
        let (col0, k0) = share.step(it);
        let a = base + s * TMA_STAGE_BYTES + me.warpgroup * 64 * 128;
        let b = base + s * TMA_STAGE_BYTES + TMA_A_BYTES;
        prim::wgmma_fence();
        let mut kk = 0;
        while kk < BK / 16 {
            let desc_a = prim::wgmma_desc_sw128(a + 32 * kk);
            let desc_b = prim::wgmma_desc_sw128(b + 32 * kk);
            prim::wgmma_m64n256k16_bf16::<0, 0>(&mut lo, &mut hi, desc_a, desc_b, k0 > 0 || kk > 0);
            kk += 1;
        }
        prim::wgmma_commit();
        // The fold reads the accumulators only on the path that waited for all (ptxas injects a
        // wait before every step's `wgmma`s if any path to a read might not have).
        if k0 + BK == share.k_steps * BK {
            prim::wgmma_wait_all();
            if lane0 {
                if let Some(before) = pending {
                    unsafe { prim::mbarrier_arrive(empty(before)) };
                }
                unsafe { prim::mbarrier_arrive(empty(s)) };
            }
            pending = None;
            fold(&mut run, &lo, col0 + 2 * me.q, share.col_end);
            fold(&mut run, &hi, col0 + 128 + 2 * me.q, share.col_end);
        } else {
            prim::wgmma_wait_one();
            if lane0 && let Some(before) = pending {
                unsafe { prim::mbarrier_arrive(empty(before)) };
            }
            pending = Some(s);
        }
        it += 1;
    }
    // Nothing is in flight here; said explicitly, ptxas stops injecting a wait at the loop's exit
    // branch (C7517), which serialised every step.
    prim::wgmma_wait_all();
    crate::each!(h in [0, 1] => {
        run[h] = quad_merge(run[h]);
        if me.q == 0 {
            let row = share.row0 + 64 * me.warpgroup + 16 * me.warp + me.g + 8 * h as u32;
            if row < p.n_rows {
                let out = p.partials + ((share.split as u64 * p.n_rows as u64 + row as u64) * 2) * 4;
                unsafe {
                    prim::st_global_u32(out, run[h].m.to_bits());
                    prim::st_global_u32(out + 4, run[h].s.to_bits());
                }
            }
        }
    });
}

/// The TMA kernels' barriers at `bars` (8 bytes each): per stage `s` of `stages`, "full" at
/// `bars + 8·s` (one arrival: the producer's, with the stage's bytes) and "empty" at
/// `bars + 8·(stages + s)` (`consumers` arrivals), then `extra` more of one arrival each. Thread
/// 0 initialises them; every thread returns after a barrier of the whole CTA.
#[inline(always)]
pub(crate) unsafe fn init_pipeline(bars: u32, stages: u32, consumers: u32, extra: u32) {
    if thread_idx() == 0 {
        let mut s = 0;
        while s < stages {
            unsafe {
                prim::mbarrier_init(bars + 8 * s, 1);
                prim::mbarrier_init(bars + 8 * (stages + s), consumers);
            }
            s += 1;
        }
        let mut e = 0;
        while e < extra {
            unsafe { prim::mbarrier_init(bars + 8 * (2 * stages + e), 1) };
            e += 1;
        }
        prim::fence_mbarrier_init();
    }
    prim::sync_threads();
}

