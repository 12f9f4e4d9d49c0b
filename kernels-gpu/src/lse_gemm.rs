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
use core::f32::consts::LOG2_E;

/// Repeats `$body` with `$i` bound to each value given, so that arrays indexed by `$i` stay in
/// registers (LLVM left the epilogue's loops rolled, which put the accumulators on the stack).
#[macro_export]
macro_rules! each {
    ($i:ident in [$($v:expr),*] => $body:block) => {{
        $( { let $i: usize = $v; $body } )*
    }};
}

/// Rows and classes of a CTA's tile, and its depth along `D`.
const BM: u32 = 128;
const BN: u32 = 128;
const BK: u32 = 64;
/// Elements between rows of a tile in shared memory (64 and 8 of padding: `ldmatrix`'s eight
/// row addresses fall in different banks).
const LDS: u32 = BK + 8;
/// Bytes of one operand's tile in one stage.
const TILE_BYTES: u32 = BM * LDS * 2;

/// Issues the copies of step `it` (vocabulary tile `it / k_steps`, depth `it % k_steps`) into
/// stage `stage`: each thread four 16-byte pieces of each operand.
#[inline(always)]
unsafe fn load_stage(p: &LseGemmParams, smem: u32, stage: u32, row0: u32, col0: u32, k0: u32, col_end: u32) {
    let tid = thread_idx();
    let a_base = smem + stage * 2 * TILE_BYTES;
    let b_base = a_base + TILE_BYTES;
    let mut i = tid;
    // 128 rows x 8 pieces of 16 bytes per operand.
    while i < BM * (BK / 8) {
        let (r, piece) = (i / (BK / 8), i % (BK / 8));
        let dst = r * LDS * 2 + piece * 16;
        let k = (k0 + piece * 8) as u64;
        let row = row0 + r;
        let a_src = p.hidden + ((row.min(p.n_rows - 1) as u64) * p.dim as u64 + k) * 2;
        unsafe { prim::cp_async_16(a_base + dst, a_src, row < p.n_rows) };
        let col = col0 + r;
        let b_src = p.weight + ((col.min(p.vocab - 1) as u64) * p.dim as u64 + k) * 2;
        unsafe { prim::cp_async_16(b_base + dst, b_src, col < col_end) };
        i += prim::block_dim();
    }
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
    let row_blocks = p.n_rows.div_ceil(BM).max(1);
    let block = prim::block_idx();
    let (rb, split) = (block % row_blocks, block / row_blocks);
    let row0 = rb * BM;
    let col_begin = split * p.vocab_per_split;
    let col_end = (col_begin + p.vocab_per_split).min(p.vocab);
    let smem = prim::smem_base();
    // Warp tile: 64 rows (wm) x 32 classes (wn) of the CTA's 128 x 128.
    let (wm, wn) = (warp % 2, warp / 2);
    let (g, q) = (lane / 4, lane % 4);
    // Running (max, sum) in log2 units for the thread's rows: m16 tile `mi`, half `h` (rows
    // `64·wm + 16·mi + g + 8·h`).
    let mut run_m = [f32::NEG_INFINITY; 8];
    let mut run_s = [0.0f32; 8];
    let k_steps = (p.dim / BK).max(1);
    let tiles = if col_end > col_begin { (col_end - col_begin).div_ceil(BN) } else { 0 };
    let total = tiles * k_steps;
    let mut acc = [[[0.0f32; 4]; 4]; 4];
    if total > 0 {
        unsafe { load_stage(p, smem, 0, row0, col_begin, 0, col_end) };
    }
    prim::cp_async_commit();
    let mut it = 0;
    while it < total {
        let (tile, ks) = (it / k_steps, it % k_steps);
        let col0 = col_begin + tile * BN;
        if it + 1 < total {
            let (next_tile, next_ks) = ((it + 1) / k_steps, (it + 1) % k_steps);
            unsafe { load_stage(p, smem, (it + 1) % 2, row0, col_begin + next_tile * BN, next_ks * BK, col_end) };
            prim::cp_async_commit();
            prim::cp_async_wait_one();
        } else {
            prim::cp_async_wait_all();
        }
        prim::sync_threads();
        if ks == 0 {
            acc = [[[0.0f32; 4]; 4]; 4];
        }
        let a_base = smem + (it % 2) * 2 * TILE_BYTES;
        let b_base = a_base + TILE_BYTES;
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
        if ks == k_steps - 1 {
            // Fold the tile's logits into the rows' running (max, sum); classes past the range
            // are left out.
            let first = col0 + 32 * wn + 2 * q;
            each!(mi in [0, 1, 2, 3] => {
                each!(h in [0, 1] => {
                    let mut vals = [f32::NEG_INFINITY; 8];
                    each!(ni in [0, 1, 2, 3] => {
                        each!(e in [0, 1] => {
                            if first + ((8 * ni + e) as u32) < col_end {
                                vals[2 * ni + e] = acc[mi][ni][2 * h + e] * LOG2_E;
                            }
                        });
                    });
                    let r = 2 * mi + h;
                    fold(&mut run_m[r], &mut run_s[r], &vals);
                });
            });
        }
        it += 1;
    }
    // The quad of lanes that share a row: merge their (max, sum).
    each!(r in [0, 1, 2, 3, 4, 5, 6, 7] => {
        each!(k in [1, 2] => {
            let om = prim::shfl_xor_f32(run_m[r], k as u32);
            let os = prim::shfl_xor_f32(run_s[r], k as u32);
            merge(&mut run_m[r], &mut run_s[r], om, os);
        });
    });
    // The four warps along the classes: through shared memory (the stages are free now), then
    // one thread per row writes the merged pair.
    let slots = smem; // [4 wn][128 rows][2] f32
    if q == 0 {
        each!(r in [0, 1, 2, 3, 4, 5, 6, 7] => {
            let row = 64 * wm + 16 * (r as u32 / 2) + g + 8 * (r as u32 % 2);
            let at = slots + ((wn * BM + row) * 2) * 4;
            unsafe {
                prim::st_shared_u32(at, run_m[r].to_bits());
                prim::st_shared_u32(at + 4, run_s[r].to_bits());
            }
        });
    }
    prim::sync_threads();
    if tid < BM && row0 + tid < p.n_rows {
        let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
        for w in 0..4u32 {
            let at = slots + ((w * BM + tid) * 2) * 4;
            let (om, os) = unsafe {
                (f32::from_bits(prim::ld_shared_u32(at)), f32::from_bits(prim::ld_shared_u32(at + 4)))
            };
            merge(&mut m, &mut s, om, os);
        }
        let out = p.partials + ((split as u64 * p.n_rows as u64 + (row0 + tid) as u64) * 2) * 4;
        unsafe {
            prim::st_global_u32(out, m.to_bits());
            prim::st_global_u32(out + 4, s.to_bits());
        }
    }
}

/// Folds the values `vals` (log2 units, -inf for none) into a running (max `m`, sum `s`).
#[inline(always)]
pub(crate) fn fold(m: &mut f32, s: &mut f32, vals: &[f32; 8]) {
    let a = vals[0].max(vals[1]).max(vals[2].max(vals[3]));
    let b = vals[4].max(vals[5]).max(vals[6].max(vals[7]));
    let nm = m.max(a.max(b));
    if nm != f32::NEG_INFINITY {
        let mut e = [0.0f32; 8];
        for i in 0..8 {
            e[i] = prim::ex2(vals[i] - nm);
        }
        let sum = ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
        *s = prim::fma(*s, prim::ex2(*m - nm), sum);
        *m = nm;
    }
}

/// Merges another (max `om`, sum `os`) into (max `m`, sum `s`).
#[inline(always)]
pub(crate) fn merge(m: &mut f32, s: &mut f32, om: f32, os: f32) {
    let nm = m.max(om);
    if nm != f32::NEG_INFINITY {
        *s = *s * prim::ex2(*m - nm) + os * prim::ex2(om - nm);
        *m = nm;
    }
}
