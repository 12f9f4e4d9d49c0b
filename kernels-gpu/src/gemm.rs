//! The linear path's weight-gradient GEMM (issue 12; sm_90a, in the sm_90a module):
//! `C = alpha·Aᵀ·B + beta·C` with `A [K, M]`, `B [K, N]` and `C [M, N]` bf16 and row-major, f32
//! accumulated. In the linear path `A` is a chunk's logit gradient `G [rows, V]`, `B` its hidden
//! states `h [rows, D]`, `C` the weight's gradient `[V, D]`, added to once per chunk: with short
//! chunks (Liger's 256 rows) reading and writing `C` costs more than the products, and cuBLAS runs
//! the two one after the other. Here they overlap.
//!
//! A persistent CTA (one an SM, 384 threads) takes output tiles of 128 x 256 from a counter
//! (tile `t`: rows `128·(t / tiles_n)`, columns `256·(t % tiles_n)`, so that CTAs running
//! together share `A`'s tiles in L2; a CTA whose SM another stream's kernel holds takes
//! fewer). Its producer warp has the tensor memory accelerator copy each step's two tiles (64 of
//! K; MN-major, 128-byte swizzle) into three stages, and after a tile's steps its `C` tile
//! into a buffer of its own, so that `C` arrives while the products run. Two consumer warpgroups
//! run `wgmma` m64n256k16 (both operands MN-major) over the stages, then each thread adds its
//! accumulators to `C` in shared memory, and one thread stores the tile back with the tensor
//! memory accelerator (asynchronously, while the next tile's products run).

use crate::abi::GemmParams;
use crate::prim::{self, thread_idx};

/// Output tile, and K per step.
const BM: u32 = 128;
const BN: u32 = 256;
const BK: u32 = 64;
const STAGES: u32 = 3;
/// A stage: `A`'s 64 x 128 (two boxes of 64 x 64) then `B`'s 64 x 256 (four boxes).
const A_BYTES: u32 = BK * BM * 2;
const BOX_BYTES: u32 = BK * 64 * 2;
const STAGE_BYTES: u32 = A_BYTES + BK * BN * 2;
/// `C`'s tile: four boxes of 128 rows x 64 columns.
const C_BOX_BYTES: u32 = BM * 64 * 2;
const C_BYTES: u32 = 4 * C_BOX_BYTES;
/// Warps that release a stage: the two consumer warpgroups'.
const CONSUMER_WARPS: u32 = 8;
const CONSUMER_THREADS: u32 = 256;
/// The slot's value that ends a CTA's walk.
const NO_TILE: u32 = u32::MAX;

/// Launch: `min(tiles, SMs)` CTAs of 384 threads (three warpgroups: two consumers, then the
/// producer; launched at 168 registers a thread, the consumers take 232 and the producer 40),
/// `counter` 0, dynamic shared memory `STAGES · STAGE_BYTES + C_BYTES + 2048` (the tiles
/// 1024-byte aligned, then the barriers).
#[inline(always)]
pub unsafe fn gemm_tn_bf16(p: &GemmParams) {
    let tid = thread_idx();
    let base = (prim::smem_base() + 1023) & !1023;
    let c_tile = base + STAGES * STAGE_BYTES;
    let bars = c_tile + C_BYTES;
    let full = |s: u32| bars + 8 * s;
    let empty = |s: u32| bars + 8 * (STAGES + s);
    let c_full = bars + 16 * STAGES;
    let c_empty = c_full + 8;
    // The tensor maps, read by the tensor memory accelerator in parameter space.
    let params = crate::param_block_generic!("xent_gemm_tn_bf16");
    let maps = (params, params + 128, params + 256);
    let tiles_n = p.n.div_ceil(BN).max(1);
    let tiles = p.m.div_ceil(BM) * tiles_n;
    let k_steps = p.k.div_ceil(BK).max(1);
    // The tile of each of the CTA's rounds, from the producer (four slots: it runs at most
    // `STAGES` steps, so three tiles, ahead); `NO_TILE` ends the walk.
    let slots = c_empty + 8;
    let slot = |round: u32| slots + 4 * (round % 4);
    // The stages' barriers, then `c_full` and `c_empty`.
    unsafe { crate::wgmma::init_pipeline(bars, STAGES, CONSUMER_WARPS, 2) };
    let warp = prim::warp_uniform(tid / 32);
    if warp >= CONSUMER_WARPS {
        // The producer warpgroup gives back registers; its first warp's first lane works.
        prim::setmaxnreg_dec::<40>();
        if tid == 32 * CONSUMER_WARPS {
            unsafe { produce(p, maps, base, c_tile, (full, empty), (c_full, c_empty), slot, (tiles, tiles_n, k_steps)) };
        }
        return;
    }
    prim::setmaxnreg_inc::<232>();
    let warpgroup = warp / 4;
    let (lane, w) = (tid % 32, warp % 4);
    let (g, q) = (lane / 4, lane % 4);
    let (mut lo, mut hi) = ([0.0f32; 64], [0.0f32; 64]);
    // Steps so far (the stages' phases) and tiles so far (`C`'s).
    let mut step = 0u32;
    let mut round = 0u32;
    loop {
        // The tile's first stage also brings its number (uniform, as ptxas must know).
        unsafe { prim::mbarrier_wait(full(step % STAGES), (step / STAGES) & 1) };
        let tile = prim::warp_uniform(unsafe { prim::ld_shared_u32(slot(round)) });
        if tile == NO_TILE {
            break;
        }
        let (m0, n0) = (tile / tiles_n * BM, tile % tiles_n * BN);
        let mut pending: Option<u32> = None;
        let mut ks = 0;
        while ks < k_steps {
            let s = step % STAGES;
            if ks > 0 {
                unsafe { prim::mbarrier_wait(full(s), (step / STAGES) & 1) };
            }
            let stage = base + s * STAGE_BYTES;
            // This warpgroup's 64 of the tile's 128 rows: `A`'s box `warpgroup`.
            let a = stage + warpgroup * BOX_BYTES;
            let b = stage + A_BYTES;
            prim::wgmma_fence();
            let mut kk = 0;
            while kk < BK / 16 {
                let desc_a = prim::wgmma_desc_sw128_mn(a + 2048 * kk, BOX_BYTES);
                let desc_b = prim::wgmma_desc_sw128_mn(b + 2048 * kk, BOX_BYTES);
                prim::wgmma_m64n256k16_bf16::<1>(&mut lo, &mut hi, desc_a, desc_b, ks > 0 || kk > 0);
                kk += 1;
            }
            prim::wgmma_commit();
            if ks + 1 == k_steps {
                prim::wgmma_wait_all();
                if lane == 0 {
                    if let Some(before) = pending {
                        unsafe { prim::mbarrier_arrive(empty(before)) };
                    }
                    unsafe { prim::mbarrier_arrive(empty(s)) };
                }
                pending = None;
                unsafe { epilogue(p, maps.2, c_tile, (c_full, c_empty), round, (m0, n0), (warpgroup, w, g, q), tid, &lo, &hi) };
            } else {
                prim::wgmma_wait_one();
                if lane == 0 && let Some(before) = pending {
                    unsafe { prim::mbarrier_arrive(empty(before)) };
                }
                pending = Some(s);
            }
            step += 1;
            ks += 1;
        }
        round += 1;
    }
    // Nothing is in flight; said explicitly so ptxas does not wait at the loop's exit (C7517).
    prim::wgmma_wait_all();
    if tid == 0 {
        // The last tile's stores complete before the CTA exits.
        prim::bulk_wait_all();
    }
}

/// The producer warp's first lane: takes tiles from the launch's counter (so that a CTA that
/// starts late, its SM busy with another stream's kernel, takes fewer) until none is left; for
/// each, its number into the round's slot, each step's two tiles into the next free stage, then
/// (once the tile before has been stored from it) `C`'s tile into its buffer, or with `beta` 0
/// only the buffer's hand-over. The end is a stage with [`NO_TILE`] in the slot and no copies.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn produce(
    p: &GemmParams,
    (map_a, map_b, map_c): (u64, u64, u64),
    base: u32,
    c_tile: u32,
    (full, empty): (impl Fn(u32) -> u32, impl Fn(u32) -> u32),
    (c_full, c_empty): (u32, u32),
    slot: impl Fn(u32) -> u32,
    (tiles, tiles_n, k_steps): (u32, u32, u32),
) {
    let mut step = 0u32;
    let mut round = 0u32;
    loop {
        let tile = unsafe { prim::atom_inc_u32(p.counter, u32::MAX) };
        let s = step % STAGES;
        // A fresh barrier's phase "before 0" counts as complete: the first round passes.
        unsafe { prim::mbarrier_wait(empty(s), (step / STAGES + 1) & 1) };
        if tile >= tiles {
            unsafe {
                prim::st_shared_u32(slot(round), NO_TILE);
                prim::mbarrier_arrive(full(s));
            }
            return;
        }
        unsafe { prim::st_shared_u32(slot(round), tile) };
        let (m0, n0) = (tile / tiles_n * BM, tile % tiles_n * BN);
        let mut ks = 0;
        while ks < k_steps {
            let s = step % STAGES;
            if ks > 0 {
                unsafe { prim::mbarrier_wait(empty(s), (step / STAGES + 1) & 1) };
            }
            let stage = base + s * STAGE_BYTES;
            let k0 = ks * BK;
            unsafe {
                prim::mbarrier_arrive_expect_tx(full(s), STAGE_BYTES);
                prim::tma_load_2d(stage, map_a, m0, k0, full(s));
                prim::tma_load_2d(stage + BOX_BYTES, map_a, m0 + 64, k0, full(s));
                let mut j = 0;
                while j < 4 {
                    prim::tma_load_2d(stage + A_BYTES + j * BOX_BYTES, map_b, n0 + 64 * j, k0, full(s));
                    j += 1;
                }
            }
            step += 1;
            ks += 1;
        }
        unsafe { prim::mbarrier_wait(c_empty, (round + 1) & 1) };
        if p.beta != 0.0 {
            unsafe {
                prim::mbarrier_arrive_expect_tx(c_full, C_BYTES);
                let mut j = 0;
                while j < 4 {
                    prim::tma_load_2d(c_tile + j * C_BOX_BYTES, map_c, n0 + 64 * j, m0, c_full);
                    j += 1;
                }
            }
        } else {
            unsafe { prim::mbarrier_arrive(c_full) };
        }
        round += 1;
    }
}

/// A tile's end: each consumer thread adds `alpha·` its accumulators to `beta·C` in shared
/// memory (accumulator `4·j + 2·h + e` of warp `w` of warpgroup `wg`: row `64·wg + 16·w + g +
/// 8·h`, column `8·j + 2·q + e`; `C`'s box `j / 8`, 128-byte rows with 16-byte chunk `j % 8`
/// swizzled by the row's `% 8`, which is `g`), then thread 0 stores the four boxes and, once
/// they have read the buffer, hands it back to the producer.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn epilogue(
    p: &GemmParams,
    map_c: u64,
    c_tile: u32,
    (c_full, c_empty): (u32, u32),
    round: u32,
    (m0, n0): (u32, u32),
    (wg, w, g, q): (u32, u32, u32, u32),
    tid: u32,
    lo: &[f32; 64],
    hi: &[f32; 64],
) {
    unsafe { prim::mbarrier_wait(c_full, round & 1) };
    let read = p.beta != 0.0;
    crate::each!(h in [0, 1] => {
        let row = 64 * wg + 16 * w + g + 8 * h as u32;
        let row_at = c_tile + row * 128 + q * 4;
        crate::each!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
            let at = row_at + (j as u32 / 8) * C_BOX_BYTES + (((j as u32 % 8) ^ g) * 16);
            let (x0, x1) = (lo[4 * j + 2 * h], lo[4 * j + 2 * h + 1]);
            unsafe { add_pair(at, x0, x1, p.alpha, p.beta, read) };
        });
        crate::each!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
            let jj = j as u32 + 16;
            let at = row_at + (jj / 8) * C_BOX_BYTES + (((jj % 8) ^ g) * 16);
            let (x0, x1) = (hi[4 * j + 2 * h], hi[4 * j + 2 * h + 1]);
            unsafe { add_pair(at, x0, x1, p.alpha, p.beta, read) };
        });
    });
    // Every consumer's writes, visible to the tensor memory accelerator, before the store.
    prim::fence_proxy_async_shared();
    prim::named_barrier(1, CONSUMER_THREADS);
    if tid == 0 {
        unsafe {
            let mut j = 0;
            while j < 4 {
                prim::tma_store_2d(map_c, n0 + 64 * j, m0, c_tile + j * C_BOX_BYTES);
                j += 1;
            }
            prim::bulk_commit();
            prim::bulk_wait_read();
            prim::mbarrier_arrive(c_empty);
        }
    }
}

/// `C`'s pair of bf16 at shared `at` becomes `alpha·(x0, x1) + beta·C` (`C` not read unless
/// `read`), rounded once.
#[inline(always)]
unsafe fn add_pair(at: u32, x0: f32, x1: f32, alpha: f32, beta: f32, read: bool) {
    let (mut y0, mut y1) = (alpha * x0, alpha * x1);
    if read {
        let c = unsafe { prim::ld_shared_u32(at) };
        y0 = prim::fma(beta, f32::from_bits(c << 16), y0);
        y1 = prim::fma(beta, f32::from_bits(c & 0xffff_0000), y1);
    }
    unsafe { prim::st_shared_u32(at, prim::pack_bf16x2(y1, y0)) };
}
