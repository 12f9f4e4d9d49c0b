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

use crate::abi::{GemmParams, GradGemmParams};
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
        unsafe {
            tn_tile((p.alpha, p.beta), maps.2, (base, c_tile), (&full, &empty), (c_full, c_empty), (&mut step, round), (m0, n0, k_steps), (warpgroup, w, g, q, lane), tid, (&mut lo, &mut hi))
        };
        round += 1;
    }
    // Nothing is in flight; said explicitly so ptxas does not wait at the loop's exit (C7517).
    prim::wgmma_wait_all();
    if tid == 0 {
        // The last tile's stores complete before the CTA exits.
        prim::bulk_wait_all();
    }
}

/// One output tile of `C = alpha·Aᵀ·B + beta·C` for the consumer warpgroups (both MN-major,
/// 128 x 256): [`mma_steps`], then [`epilogue`]. Shared by [`gemm_tn_bf16`] and
/// [`gemm_grads_bf16`]'s weight-gradient items.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tn_tile(
    (alpha, beta): (f32, f32),
    map_c: u64,
    (base, c_tile): (u32, u32),
    (full, empty): (&impl Fn(u32) -> u32, &impl Fn(u32) -> u32),
    (c_full, c_empty): (u32, u32),
    (step, round): (&mut u32, u32),
    (m0, n0, k_steps): (u32, u32, u32),
    (warpgroup, w, g, q, lane): (u32, u32, u32, u32, u32),
    tid: u32,
    (lo, hi): (&mut [f32; 64], &mut [f32; 64]),
) {
    unsafe { mma_steps::<1>(base, (full, empty), step, k_steps, (warpgroup, lane), (lo, hi)) };
    unsafe { epilogue((alpha, beta), map_c, c_tile, (c_full, c_empty), round, (m0, n0), (warpgroup, w, g, q), tid, lo, hi) };
}

/// The consumer warpgroups' products of one 128 x 256 tile: `k_steps` stages from `*step` on
/// (the first one already waited for by the caller), this warpgroup's 64 rows from `A`'s box
/// `warpgroup` (MN-major when `A_MN` is 1, else K-major), `B` MN-major; each stage is released
/// once the next one's `wgmma`s are issued, the last once all are done. Returns with every
/// `wgmma` complete and the sums in `lo`/`hi`.
#[inline(always)]
unsafe fn mma_steps<const A_MN: u32>(
    base: u32,
    (full, empty): (&impl Fn(u32) -> u32, &impl Fn(u32) -> u32),
    step: &mut u32,
    k_steps: u32,
    (warpgroup, lane): (u32, u32),
    (lo, hi): (&mut [f32; 64], &mut [f32; 64]),
) {
    let mut pending: Option<u32> = None;
    let mut ks = 0;
    while ks < k_steps {
        let s = *step % STAGES;
        if ks > 0 {
            unsafe { prim::mbarrier_wait(full(s), (*step / STAGES) & 1) };
        }
        let stage = base + s * STAGE_BYTES;
        let a = stage + warpgroup * BOX_BYTES;
        let b = stage + A_BYTES;
        prim::wgmma_fence();
        let mut kk = 0;
        while kk < BK / 16 {
            // MN-major: 16 rows of K are 2048 bytes on; K-major: 16 elements of a 128-byte row.
            let desc_a = if A_MN == 1 {
                prim::wgmma_desc_sw128_mn(a + 2048 * kk, BOX_BYTES)
            } else {
                prim::wgmma_desc_sw128(a + 32 * kk)
            };
            let desc_b = prim::wgmma_desc_sw128_mn(b + 2048 * kk, BOX_BYTES);
            prim::wgmma_m64n256k16_bf16::<A_MN, 1>(lo, hi, desc_a, desc_b, ks > 0 || kk > 0);
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
        } else {
            prim::wgmma_wait_one();
            if lane == 0 && let Some(before) = pending {
                unsafe { prim::mbarrier_arrive(empty(before)) };
            }
            pending = Some(s);
        }
        *step += 1;
        ks += 1;
    }
    // Nothing is in flight here; said explicitly so that ptxas sees it on every path (C7514).
    prim::wgmma_wait_all();
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
                load_b_boxes(stage, map_b, (n0, k0), full(s));
            }
            step += 1;
            ks += 1;
        }
        unsafe { prim::mbarrier_wait(c_empty, (round + 1) & 1) };
        if p.beta != 0.0 {
            unsafe {
                prim::mbarrier_arrive_expect_tx(c_full, C_BYTES);
                load_c_tile(c_tile, map_c, (n0, m0), c_full);
            }
        } else {
            unsafe { prim::mbarrier_arrive(c_full) };
        }
        round += 1;
    }
}

/// A step's `B` tile (MN-major, 64 rows of K by 256 columns from column `n0`, row `k0`): four
/// 64 x 64 boxes after `A`'s in the stage at `stage`, signalling `bar`.
#[inline(always)]
unsafe fn load_b_boxes(stage: u32, map_b: u64, (n0, k0): (u32, u32), bar: u32) {
    let mut j = 0;
    while j < 4 {
        unsafe { prim::tma_load_2d(stage + A_BYTES + j * BOX_BYTES, map_b, n0 + 64 * j, k0, bar) };
        j += 1;
    }
}

/// `C`'s 128 x 256 tile at (column `n0`, row `m0`) into the buffer at `c_tile`: four boxes of
/// 128 rows x 64 columns, signalling `bar`.
#[inline(always)]
unsafe fn load_c_tile(c_tile: u32, map_c: u64, (n0, m0): (u32, u32), bar: u32) {
    let mut j = 0;
    while j < 4 {
        unsafe { prim::tma_load_2d(c_tile + j * C_BOX_BYTES, map_c, n0 + 64 * j, m0, bar) };
        j += 1;
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
    (alpha, beta): (f32, f32),
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
    let read = beta != 0.0;
    crate::each!(h in [0, 1] => {
        let row = 64 * wg + 16 * w + g + 8 * h as u32;
        let row_at = c_tile + row * 128 + q * 4;
        crate::each!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
            let at = row_at + (j as u32 / 8) * C_BOX_BYTES + (((j as u32 % 8) ^ g) * 16);
            let (x0, x1) = (lo[4 * j + 2 * h], lo[4 * j + 2 * h + 1]);
            unsafe { add_pair(at, x0, x1, alpha, beta, read) };
        });
        crate::each!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
            let jj = j as u32 + 16;
            let at = row_at + (jj / 8) * C_BOX_BYTES + (((jj % 8) ^ g) * 16);
            let (x0, x1) = (hi[4 * j + 2 * h], hi[4 * j + 2 * h + 1]);
            unsafe { add_pair(at, x0, x1, alpha, beta, read) };
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

/// Both gradient GEMMs of a linear chunk in one persistent launch (`xent_gemm_grads_bf16`): the
/// hidden states' `dh = G·W` (`G [rows, V]`, `W [V, D]`, `dh [rows, D]` written) and the weight's
/// `dW += Gᵀ·h` (`h [rows, D]`, `dW [V, D]`, as [`gemm_tn_bf16`] with `alpha` 1). The first is
/// bound by the tensor cores, the second, at short chunks, by `dW`'s traffic; on two streams
/// cuBLAS's kernels and [`gemm_tn_bf16`]'s did not share the SMs well, so here they come from one
/// counter: first `dh`'s items (long), then `dW`'s tiles of 128 x 256 (short), which CTAs take
/// as they free up, so that the two run side by side.
///
/// `dh`'s tiles are 128 x 256 too (`G`'s two 64 x 64 boxes, K-major, and `W`'s four, MN-major,
/// a step; each consumer warpgroup its 64 rows). With `splits` 1 a tile is one item over the
/// whole vocabulary; with 2 it is two items, one a half of the vocabulary's steps, so that a
/// short chunk's few tiles do not make the launch wait for the longest: the half that finishes
/// first leaves its sums in `partials` (`f32`) and says so in the tile's `flags`, the other adds
/// them to its own (the same sum either way: addition is commutative), rounds once and stores.
/// The second never waits for a CTA that has not started: the first has finished its products.
///
/// Launch as [`gemm_tn_bf16`]: `min(items, SMs)` CTAs of 384 threads at 168 registers, `counter`
/// 0 (and with `splits` 2 the `flags`), the same shared memory.
#[inline(always)]
pub unsafe fn gemm_grads_bf16(p: &GradGemmParams) {
    let tid = thread_idx();
    let base = (prim::smem_base() + 1023) & !1023;
    let c_tile = base + STAGES * STAGE_BYTES;
    let bars = c_tile + C_BYTES;
    let full = |s: u32| bars + 8 * s;
    let empty = |s: u32| bars + 8 * (STAGES + s);
    let c_full = bars + 16 * STAGES;
    let c_empty = c_full + 8;
    let params = crate::param_block_generic!("xent_gemm_grads_bf16");
    let maps = GradMaps { g: params, h: params + 128, dw: params + 256, w: params + 384 };
    let shape = GradShape::of(p);
    let slots = c_empty + 8;
    let slot = |round: u32| slots + 4 * (round % 4);
    // Which half of a split `dh` tile this CTA's is (0: the first to finish), from thread 0.
    let order = slots + 16;
    unsafe { crate::wgmma::init_pipeline(bars, STAGES, CONSUMER_WARPS, 2) };
    let warp = prim::warp_uniform(tid / 32);
    if warp >= CONSUMER_WARPS {
        prim::setmaxnreg_dec::<40>();
        if tid == 32 * CONSUMER_WARPS {
            unsafe { produce_grads(p, &maps, &shape, base, (full, empty), (c_full, c_empty), slot) };
        }
        return;
    }
    prim::setmaxnreg_inc::<232>();
    let warpgroup = warp / 4;
    let (lane, w) = (tid % 32, warp % 4);
    let (g, q) = (lane / 4, lane % 4);
    let (mut lo, mut hi) = ([0.0f32; 64], [0.0f32; 64]);
    let mut step = 0u32;
    let mut round = 0u32;
    loop {
        unsafe { prim::mbarrier_wait(full(step % STAGES), (step / STAGES) & 1) };
        let item = prim::warp_uniform(unsafe { prim::ld_shared_u32(slot(round)) });
        if item == NO_TILE {
            break;
        }
        if item < shape.dh_items {
            let (tile, (m0, n0), (k_begin, k_end)) = shape.dh_item(item);
            unsafe { mma_steps::<0>(base, (&full, &empty), &mut step, k_end - k_begin, (warpgroup, lane), (&mut lo, &mut hi)) };
            unsafe { dh_epilogue(p, (c_full, c_empty, order), round, tile, (m0, n0), (warpgroup, w, g, q), tid, &mut lo, &mut hi) };
        } else {
            let (m0, n0) = shape.dw_item(item);
            unsafe {
                tn_tile((1.0, p.beta), maps.dw, (base, c_tile), (&full, &empty), (c_full, c_empty), (&mut step, round), (m0, n0, shape.row_steps), (warpgroup, w, g, q, lane), tid, (&mut lo, &mut hi))
            };
        }
        round += 1;
    }
    prim::wgmma_wait_all();
    if tid == 0 {
        prim::bulk_wait_all();
    }
}

/// The four tensor maps of [`gemm_grads_bf16`], as generic addresses in parameter space.
struct GradMaps {
    g: u64,
    h: u64,
    dw: u64,
    w: u64,
}

/// [`gemm_grads_bf16`]'s items and steps.
struct GradShape {
    /// `dh`'s tiles: row blocks of 128 (`dh_tiles_m`) by column blocks of 256 (`col_blocks`,
    /// also `dW`'s), each `splits` items.
    dh_tiles_m: u32,
    col_blocks: u32,
    splits: u32,
    dh_items: u32,
    items: u32,
    /// Steps of 64 along the vocabulary (a whole `dh` tile), a split's (the last may be
    /// shorter), and along the rows (a `dW` item).
    v_steps: u32,
    split_steps: u32,
    row_steps: u32,
}

impl GradShape {
    #[inline(always)]
    fn of(p: &GradGemmParams) -> GradShape {
        let col_blocks = p.dim.div_ceil(BN).max(1);
        let dh_tiles_m = p.rows.div_ceil(BM).max(1);
        let splits = if p.splits == 2 { 2 } else { 1 };
        let dh_items = dh_tiles_m * col_blocks * splits;
        let v_steps = p.vocab.div_ceil(BK).max(1);
        GradShape {
            dh_tiles_m,
            col_blocks,
            splits,
            dh_items,
            items: dh_items + p.vocab.div_ceil(BM) * col_blocks,
            v_steps,
            split_steps: v_steps.div_ceil(splits),
            row_steps: p.rows.div_ceil(BK).max(1),
        }
    }

    /// A `dh` item's tile (consecutive tiles share `W`'s columns, so that CTAs running together
    /// read them from L2), its rows and columns, and its steps along the vocabulary: the two
    /// halves of a tile are consecutive items.
    #[inline(always)]
    fn dh_item(&self, item: u32) -> (u32, (u32, u32), (u32, u32)) {
        let (tile, half) = (item / self.splits, item % self.splits);
        let m0 = tile % self.dh_tiles_m * BM;
        let n0 = tile / self.dh_tiles_m * BN;
        let k_begin = half * self.split_steps;
        let k_end = if half + 1 == self.splits { self.v_steps } else { k_begin + self.split_steps };
        (tile, (m0, n0), (k_begin, k_end))
    }

    /// A `dW` item's tile: its first class and column.
    #[inline(always)]
    fn dw_item(&self, item: u32) -> (u32, u32) {
        let t = item - self.dh_items;
        (t / self.col_blocks * BM, t % self.col_blocks * BN)
    }
}

/// [`produce`] for [`gemm_grads_bf16`]'s two kinds of item: a `dh` item's steps bring `G`'s two
/// boxes at (class `k0`, rows `m0` and `m0 + 64`) and `W`'s four at (column `n0 + 64·j`, class
/// `k0`), then only the `C` buffer's hand-over; a `dW` item's are [`produce`]'s (`A` = `G`,
/// `B` = `h`, `C` = `dW`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn produce_grads(
    p: &GradGemmParams,
    maps: &GradMaps,
    shape: &GradShape,
    base: u32,
    (full, empty): (impl Fn(u32) -> u32, impl Fn(u32) -> u32),
    (c_full, c_empty): (u32, u32),
    slot: impl Fn(u32) -> u32,
) {
    let c_tile = base + STAGES * STAGE_BYTES;
    let mut step = 0u32;
    let mut round = 0u32;
    loop {
        let item = unsafe { prim::atom_inc_u32(p.counter, u32::MAX) };
        let s = step % STAGES;
        unsafe { prim::mbarrier_wait(empty(s), (step / STAGES + 1) & 1) };
        if item >= shape.items {
            unsafe {
                prim::st_shared_u32(slot(round), NO_TILE);
                prim::mbarrier_arrive(full(s));
            }
            return;
        }
        unsafe { prim::st_shared_u32(slot(round), item) };
        let dh = item < shape.dh_items;
        let (m0, n0, k_begin, k_end) = if dh {
            let (_, (m0, n0), (k_begin, k_end)) = shape.dh_item(item);
            (m0, n0, k_begin, k_end)
        } else {
            let (m0, n0) = shape.dw_item(item);
            (m0, n0, 0, shape.row_steps)
        };
        let mut ks = k_begin;
        while ks < k_end {
            let s = step % STAGES;
            if ks > k_begin {
                unsafe { prim::mbarrier_wait(empty(s), (step / STAGES + 1) & 1) };
            }
            let stage = base + s * STAGE_BYTES;
            let k0 = ks * BK;
            unsafe {
                prim::mbarrier_arrive_expect_tx(full(s), STAGE_BYTES);
                if dh {
                    prim::tma_load_2d(stage, maps.g, k0, m0, full(s));
                    prim::tma_load_2d(stage + BOX_BYTES, maps.g, k0, m0 + 64, full(s));
                } else {
                    prim::tma_load_2d(stage, maps.g, m0, k0, full(s));
                    prim::tma_load_2d(stage + BOX_BYTES, maps.g, m0 + 64, k0, full(s));
                }
                let map_b = if dh { maps.w } else { maps.h };
                load_b_boxes(stage, map_b, (n0, k0), full(s));
            }
            step += 1;
            ks += 1;
        }
        unsafe { prim::mbarrier_wait(c_empty, (round + 1) & 1) };
        if !dh && p.beta != 0.0 {
            unsafe {
                prim::mbarrier_arrive_expect_tx(c_full, C_BYTES);
                load_c_tile(c_tile, maps.dw, (n0, m0), c_full);
            }
        } else {
            unsafe { prim::mbarrier_arrive(c_full) };
        }
        round += 1;
    }
}

/// A `dh` item's end, after the `C` buffer's hand-over (a `dh` item takes it only to keep the
/// rounds): with `splits` 1 each consumer thread rounds its sums once and stores them (rows
/// `m0 + 64·wg + 16·w + g + 8·h` below `rows`, columns `n0 + 8·j + 2·q`: `dim` is a multiple of
/// 256). With 2, thread 0 counts the tile's finished halves in its first flag: the first half
/// stores its sums in the tile's `partials` (thread `t`'s sums `4·u..4·u + 4`, of `lo` then
/// `hi`, 16 bytes at `16·(256·u + t)`: a warp's stores side by side) and, once every thread's are
/// out, releases the second flag; the second waits for that flag, adds the partial sums to its
/// own and stores as with 1.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn dh_epilogue(
    p: &GradGemmParams,
    (c_full, c_empty, order): (u32, u32, u32),
    round: u32,
    tile: u32,
    (m0, n0): (u32, u32),
    (wg, w, g, q): (u32, u32, u32, u32),
    tid: u32,
    lo: &mut [f32; 64],
    hi: &mut [f32; 64],
) {
    unsafe { prim::mbarrier_wait(c_full, round & 1) };
    let mut store = true;
    if p.splits == 2 {
        let flags = p.flags + 8 * tile as u64;
        let partial = p.partials + (tile as u64) * (BM * BN * 4) as u64 + 16 * tid as u64;
        if tid == 0 {
            unsafe { prim::st_shared_u32(order, prim::atom_inc_u32(flags, u32::MAX)) };
        }
        prim::named_barrier(1, CONSUMER_THREADS);
        let first = prim::warp_uniform(unsafe { prim::ld_shared_u32(order) }) == 0;
        if first {
            crate::each!(u in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
                let v = [lo[4 * u].to_bits(), lo[4 * u + 1].to_bits(), lo[4 * u + 2].to_bits(), lo[4 * u + 3].to_bits()];
                unsafe { prim::st_global_v4(partial + 4096 * u as u64, v) };
                let v = [hi[4 * u].to_bits(), hi[4 * u + 1].to_bits(), hi[4 * u + 2].to_bits(), hi[4 * u + 3].to_bits()];
                unsafe { prim::st_global_v4(partial + 4096 * (16 + u) as u64, v) };
            });
            // Every thread's sums out before the flag says so (the barrier, then thread 0's
            // release at GPU scope).
            prim::named_barrier(1, CONSUMER_THREADS);
            if tid == 0 {
                prim::fence_acq_rel_gpu();
                unsafe { prim::red_add_release_gpu_u32(flags + 4, 1) };
            }
            store = false;
        } else {
            if tid == 0 {
                while unsafe { prim::ld_acquire_gpu_u32(flags + 4) } == 0 {
                    prim::nanosleep(256);
                }
            }
            prim::named_barrier(1, CONSUMER_THREADS);
            crate::each!(u in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
                let v = unsafe { prim::ld_global_cg_v4(partial + 4096 * u as u64) };
                crate::each!(e in [0, 1, 2, 3] => { lo[4 * u + e] += f32::from_bits(v[e]); });
                let v = unsafe { prim::ld_global_cg_v4(partial + 4096 * (16 + u) as u64) };
                crate::each!(e in [0, 1, 2, 3] => { hi[4 * u + e] += f32::from_bits(v[e]); });
            });
        }
    }
    if store {
        crate::each!(h in [0, 1] => {
            let row = m0 + 64 * wg + 16 * w + g + 8 * h as u32;
            // Column `n0 + 2·q` of the row; pair `j` is 16·j bytes on.
            let at = p.grad_hidden + 2 * ((row as u64) * (p.dim as u64) + (n0 + 2 * q) as u64);
            crate::each!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] => {
                // Sums `4·j + 2·h` and the next, of `lo` (columns 0..128) and of `hi`.
                let i = 4 * j + 2 * h;
                if row < p.rows {
                    unsafe {
                        prim::st_global_u32(at + 16 * j as u64, prim::pack_bf16x2(lo[i + 1], lo[i]));
                        prim::st_global_u32(at + 16 * (16 + j) as u64, prim::pack_bf16x2(hi[i + 1], hi[i]));
                    }
                }
            });
        });
    }
    // The buffer back to the producer: a `dh` item does not touch it.
    if tid == 0 {
        unsafe { prim::mbarrier_arrive(c_empty) };
    }
}
