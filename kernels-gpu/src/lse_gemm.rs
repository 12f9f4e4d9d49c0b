//! Prototype (issue 12, "beyond"): the log-sum-exp of every row of `hidden · weightᵀ` without
//! writing the logits. A CTA of 256 threads takes 128 rows of `hidden [N, D]` and a range of the
//! vocabulary; per tile of 128 classes it multiplies on the tensor cores (`mma.sync` m16n8k16,
//! bf16 in, f32 accumulated, `ldmatrix` from shared memory filled by `cp.async`, two stages of
//! 64 along `D`), then folds the tile into each row's running (max, sum) in registers. It writes
//! one (max, sum) pair per row and range (`LseGemmParams::partials`); merging the ranges is the
//! caller's. `mma.sync` runs on sm_80 and sm_90 alike; Hopper's own `wgmma` (sm_90a) is the next
//! step.

use crate::abi::LseGemmParams;
use crate::prim::{self, thread_idx};
use crate::reduce::Lse2;
use core::f32::consts::LOG2_E;

/// Repeats `$body` with `$i` bound to each value given, so that arrays indexed by `$i` stay in
/// registers (LLVM left the epilogue's loops rolled, which put the accumulators on the stack).
#[macro_export]
macro_rules! each {
    ($i:ident in [$($v:expr),*] => $body:block) => {{
        $( { let $i: usize = $v; $body } )*
    }};
}

/// Rows and classes of a CTA's tile, and its depth along `D` (both prototypes).
pub(crate) const BM: u32 = 128;
pub(crate) const BN: u32 = 128;
pub(crate) const BK: u32 = 64;
/// Elements between rows of a tile in shared memory (64 and 8 of padding: `ldmatrix`'s eight
/// row addresses fall in different banks).
const LDS: u32 = BK + 8;
/// Bytes of one operand's tile in one stage.
const TILE_BYTES: u32 = BM * LDS * 2;

/// A CTA's share of a launch (both prototypes): rows `[row0, row0 + 128)` against the classes
/// `[col_begin, col_end)` of range `split`, in `total` steps of one tile of 128 classes by 64 of
/// `D` (block `b`: row block `b % row_blocks`, range `b / row_blocks`, so that CTAs running
/// together read the same weight tiles).
#[derive(Clone, Copy)]
pub(crate) struct Share {
    pub row0: u32,
    pub split: u32,
    pub col_begin: u32,
    pub col_end: u32,
    pub k_steps: u32,
    pub total: u32,
}

impl Share {
    #[inline(always)]
    pub(crate) fn of(p: &LseGemmParams) -> Share {
        let row_blocks = p.n_rows.div_ceil(BM).max(1);
        let block = prim::block_idx();
        let split = block / row_blocks;
        let col_begin = split * p.vocab_per_split;
        let col_end = (col_begin + p.vocab_per_split).min(p.vocab);
        let k_steps = (p.dim / BK).max(1);
        let tiles = if col_end > col_begin { (col_end - col_begin).div_ceil(BN) } else { 0 };
        Share { row0: block % row_blocks * BM, split, col_begin, col_end, k_steps, total: tiles * k_steps }
    }

    /// Step `it`'s first class and depth along `D`.
    #[inline(always)]
    pub(crate) fn step(self, it: u32) -> (u32, u32) {
        (self.col_begin + it / self.k_steps * BN, it % self.k_steps * BK)
    }

    /// Issues the copies of step `it`, each thread four 16-byte pieces of each operand: piece
    /// (row `r`, `D` group `j`) of the rows' tile to `a_base + place(r, j)`, of the weight's to
    /// `b_base + place(r, j)`; rows and classes past the matrix or the range are zeros.
    #[inline(always)]
    pub(crate) unsafe fn load(self, p: &LseGemmParams, it: u32, (a_base, b_base): (u32, u32), place: impl Fn(u32, u32) -> u32) {
        let (col0, k0) = self.step(it);
        let mut i = thread_idx();
        while i < BM * (BK / 8) {
            let (r, j) = (i / (BK / 8), i % (BK / 8));
            let dst = place(r, j);
            let k = (k0 + 8 * j) as u64;
            let row = self.row0 + r;
            let a_src = p.hidden + ((row.min(p.n_rows - 1) as u64) * p.dim as u64 + k) * 2;
            unsafe { prim::cp_async_16(a_base + dst, a_src, row < p.n_rows) };
            let col = col0 + r;
            let b_src = p.weight + ((col.min(p.vocab - 1) as u64) * p.dim as u64 + k) * 2;
            unsafe { prim::cp_async_16(b_base + dst, b_src, col < self.col_end) };
            i += prim::block_dim();
        }
    }

    /// Starts the two-stage pipeline: step 0's copies into stage 0 (`stage(s)`: the operands'
    /// tile addresses of stage `s`).
    #[inline(always)]
    pub(crate) unsafe fn start(self, p: &LseGemmParams, stage: impl Fn(u32) -> (u32, u32), place: impl Fn(u32, u32) -> u32) {
        if self.total > 0 {
            unsafe { self.load(p, 0, stage(0), place) };
        }
        prim::cp_async_commit();
    }

    /// Step `it` of the pipeline: issues step `it + 1`'s copies into the other stage, if any, and
    /// waits for this thread's copies of step `it` (the caller's barrier makes them everyone's).
    #[inline(always)]
    pub(crate) unsafe fn advance(
        self,
        p: &LseGemmParams,
        it: u32,
        stage: impl Fn(u32) -> (u32, u32),
        place: impl Fn(u32, u32) -> u32,
    ) {
        if it + 1 < self.total {
            unsafe { self.load(p, it + 1, stage((it + 1) % 2), place) };
            prim::cp_async_commit();
            prim::cp_async_wait_one();
        } else {
            prim::cp_async_wait_all();
        }
    }

    /// Writes row `row`'s (max, sum) over this range into `partials`; nothing for a row past the
    /// matrix.
    #[inline(always)]
    pub(crate) unsafe fn store(self, p: &LseGemmParams, row: u32, lse: Lse2) {
        if row < p.n_rows {
            let out = p.partials + ((self.split as u64 * p.n_rows as u64 + row as u64) * 2) * 4;
            unsafe {
                prim::st_global_u32(out, lse.m.to_bits());
                prim::st_global_u32(out + 4, lse.s.to_bits());
            }
        }
    }
}

/// The `mma.sync` kernel's layout of a tile: row `r` at `r·LDS` elements, `D` group `j` 16 bytes
/// further each.
#[inline(always)]
fn padded(r: u32, j: u32) -> u32 {
    r * LDS * 2 + j * 16
}

/// One CTA: rows `[128·rb, 128·rb + 128)` over classes `[split·vocab_per_split, ...)`.
/// Traffic: a CTA reads its rows' `128·D·2` bytes once per tile of 128 classes and the weight's
/// tile once per row block, `N·V·D/32` bytes in all, mostly from L2 (the CTAs running together
/// share their weight tiles); it writes 8 bytes per row and range, nothing per logit.
/// Launch: `row_blocks · splits` CTAs of 256 threads (block `b`: row block `b % row_blocks`,
/// range `b / row_blocks`, so CTAs running together read the same weight tiles), dynamic shared
/// memory `4 · TILE_BYTES` (73728 bytes).
#[inline(always)]
pub unsafe fn lse_gemm_bf16(p: &LseGemmParams) {
    let tid = thread_idx();
    let (warp, lane) = (tid / 32, tid % 32);
    let share = Share::of(p);
    let smem = prim::smem_base();
    let stage = |s: u32| (smem + s * 2 * TILE_BYTES, smem + s * 2 * TILE_BYTES + TILE_BYTES);
    // Warp tile: 64 rows (wm) x 32 classes (wn) of the CTA's 128 x 128.
    let (wm, wn) = (warp % 2, warp / 2);
    let (g, q) = (lane / 4, lane % 4);
    // The thread's rows: m16 tile `mi`, half `h`, as `run[2·mi + h]` (rows `64·wm + 16·mi + g +
    // 8·h`), in log2 units.
    let mut run = [Lse2::EMPTY; 8];
    let mut acc = [[[0.0f32; 4]; 4]; 4];
    unsafe { share.start(p, stage, padded) };
    let mut it = 0;
    while it < share.total {
        let (col0, k0) = share.step(it);
        unsafe { share.advance(p, it, stage, padded) };
        prim::sync_threads();
        if k0 == 0 {
            acc = [[[0.0f32; 4]; 4]; 4];
        }
        let (a_base, b_base) = stage(it % 2);
        let mut kk = 0;
        while kk < BK {
            // A: four m16 x k16 tiles (rows 64·wm + 16·mi), lane's row (lane % 16), k half lane / 16.
            let mut a = [[0u32; 4]; 4];
            for mi in 0..4u32 {
                let row = 64 * wm + 16 * mi + (lane % 8) + 8 * ((lane / 8) % 2);
                let k = kk + 8 * (lane / 16);
                a[mi as usize] = unsafe { prim::ldmatrix_x4(a_base + (row * LDS + k) * 2) };
            }
            // B: two x4 loads, each two n8 tiles (classes 32·wn + 16·nj + ...), k halves.
            let mut b = [[0u32; 2]; 4];
            for nj in 0..2u32 {
                let n = 32 * wn + 16 * nj + (lane % 8) + 8 * (lane / 16);
                let k = kk + 8 * ((lane / 8) % 2);
                let r = unsafe { prim::ldmatrix_x4(b_base + (n * LDS + k) * 2) };
                b[2 * nj as usize] = [r[0], r[1]];
                b[2 * nj as usize + 1] = [r[2], r[3]];
            }
            for mi in 0..4 {
                for ni in 0..4 {
                    prim::mma_bf16(&mut acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
                }
            }
            kk += 16;
        }
        // Every warp done with this stage before the next step's copies overwrite it.
        prim::sync_threads();
        if k0 + BK == share.k_steps * BK {
            // Fold the tile's logits into the rows' running (max, sum); classes past the range
            // are left out.
            let first = col0 + 32 * wn + 2 * q;
            each!(mi in [0, 1, 2, 3] => {
                each!(h in [0, 1] => {
                    let mut vals = [f32::NEG_INFINITY; 8];
                    each!(ni in [0, 1, 2, 3] => {
                        each!(e in [0, 1] => {
                            if first + ((8 * ni + e) as u32) < share.col_end {
                                vals[2 * ni + e] = acc[mi][ni][2 * h + e] * LOG2_E;
                            }
                        });
                    });
                    run[2 * mi + h].add_log2(&vals, 8);
                });
            });
        }
        it += 1;
    }
    each!(r in [0, 1, 2, 3, 4, 5, 6, 7] => {
        run[r] = quad_merge(run[r]);
    });
    // The four warps along the classes: through shared memory (the stages are free now), then
    // one thread per row writes the merged pair.
    let slots = smem; // [4 wn][128 rows][2] f32
    if q == 0 {
        each!(r in [0, 1, 2, 3, 4, 5, 6, 7] => {
            let row = 64 * wm + 16 * (r as u32 / 2) + g + 8 * (r as u32 % 2);
            let at = slots + ((wn * BM + row) * 2) * 4;
            unsafe {
                prim::st_shared_u32(at, run[r].m.to_bits());
                prim::st_shared_u32(at + 4, run[r].s.to_bits());
            }
        });
    }
    prim::sync_threads();
    if tid < BM {
        let mut total = Lse2::EMPTY;
        for w in 0..4u32 {
            let at = slots + ((w * BM + tid) * 2) * 4;
            let (m, s) = unsafe { (f32::from_bits(prim::ld_shared_u32(at)), f32::from_bits(prim::ld_shared_u32(at + 4))) };
            total = total.merge(Lse2 { m, s });
        }
        unsafe { share.store(p, share.row0 + tid, total) };
    }
}

/// `lse` merged over the quad of lanes that share a row (lanes `4·g .. 4·g + 3`).
#[inline(always)]
pub(crate) fn quad_merge(lse: Lse2) -> Lse2 {
    // Spelled out: a loop over the lane masks kept them in local memory.
    let with = |lse: Lse2, mask: u32| {
        lse.merge(Lse2 { m: prim::shfl_xor_f32(lse.m, mask), s: prim::shfl_xor_f32(lse.s, mask) })
    };
    with(with(lse, 1), 2)
}
