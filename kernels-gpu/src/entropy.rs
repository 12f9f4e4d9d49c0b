//! Each scored row's entropy (`return_entropy`: the Shannon entropy of the softmax of its logits,
//! after the soft cap where one is set), read from the logits before the cross-entropy kernel
//! writes its gradient over them, as the predicted tokens are.

use crate::abi::{EntropyParams, SHARD_ENTROPY_WORDS, ShardEntropyMergeParams, ShardEntropyParams};
use crate::element::{Element, Label};
use crate::opts;
use crate::prim::{self, shfl_xor_f32, sync_threads, thread_idx};
use crate::reduce;
use crate::xent::{Target, row_target};
use core::f32::consts::{LN_2, LOG2_E};

/// Writes `out[row]` (f32) for every row: the entropy `H = -Σ p·ln p` of its softmax (of
/// `cap·tanh(x / cap)` with `softcap = cap > 0`), in nats, 0 for a row that is not scored; NaN
/// where the row holds a NaN, or no finite maximum (all `-inf`), as PyTorch's would be.
///
/// Launch: any 1-D grid (block `b` takes rows `b, b + grid, ...`), block = a multiple of 32
/// threads, at most 1024, [`SMEM_ENTROPY_BYTES`](crate::abi::SMEM_ENTROPY_BYTES) of dynamic
/// shared memory. Traffic: one read of each scored row.
#[inline(always)]
pub unsafe fn entropy<T: Element, L: Label>(p: &EntropyParams) {
    let rows = &p.rows;
    let mut row = prim::block_idx() as u64;
    while row < rows.n_rows {
        // The row's target is the same for the whole block: every thread reaches the reduction.
        let h = match unsafe { row_target::<L>(rows, row) } {
            Target::Class(_) => {
                let addr = rows.logits + row * rows.row_stride * T::BYTES as u64;
                unsafe { row_sums::<T>(addr, rows.vocab, p.softcap, p.inv_softcap) }.entropy()
            }
            Target::Ignored | Target::Bad => 0.0,
        };
        if thread_idx() == 0 {
            unsafe { prim::st_global_u32(p.out + 4 * row, h.to_bits()) };
        }
        row += prim::grid_dim() as u64;
    }
}

/// Vocabulary-parallel entropies, step 1 (a rank's `raw_shard_stats`): each scored row's
/// [`Ent2`] over this rank's shard (`width` logits a row, soft-capped with `softcap` > 0), as the
/// f32 bits `[m, s, t]` at `out + 12·row` (`[-inf, 0, 0]` for a row not scored, not read). The
/// ranks' summaries meet in [`shard_entropy_merge`].
///
/// Launch: as [`entropy`]. Traffic: one read of each scored row of the shard.
#[inline(always)]
pub unsafe fn shard_entropy<T: Element, L: Label>(p: &ShardEntropyParams) {
    let rows = &p.rows;
    let mut row = prim::block_idx() as u64;
    while row < rows.n_rows {
        // The row's target is the same for the whole block: every thread reaches the reduction.
        let sums = match unsafe { row_target::<L>(rows, row) } {
            Target::Class(_) => {
                let addr = rows.logits + row * rows.row_stride * T::BYTES as u64;
                unsafe { row_sums::<T>(addr, p.width, p.softcap, p.inv_softcap) }
            }
            Target::Ignored | Target::Bad => Ent2::EMPTY,
        };
        if thread_idx() == 0 {
            let at = p.out + 4 * SHARD_ENTROPY_WORDS as u64 * row;
            unsafe {
                prim::st_global_u32(at, sums.m.to_bits());
                prim::st_global_u32(at + 4, sums.s.to_bits());
                prim::st_global_u32(at + 8, sums.t.to_bits());
            }
        }
        row += prim::grid_dim() as u64;
    }
}

/// Vocabulary-parallel entropies, step 3 (`raw_shard_backward`, after the all-gather): each
/// scored row's entropy over the whole vocabulary, the ranks' summaries ([`shard_entropy`])
/// merged in rank order, into `out` (0 for a row not scored; NaN where a rank's shard of the row
/// holds a NaN or no rank's holds a finite logit, as [`entropy`]).
///
/// Launch: any 1-D grid (thread `i` of the grid takes rows `i, i + threads in the grid, ...`).
/// Traffic: 12 bytes a row a rank read, 4 written.
#[inline(always)]
pub unsafe fn shard_entropy_merge<L: Label>(p: &ShardEntropyMergeParams) {
    let rows = &p.rows;
    let threads = prim::grid_dim() as u64 * prim::block_dim() as u64;
    let mut row = prim::block_idx() as u64 * prim::block_dim() as u64 + thread_idx() as u64;
    while row < rows.n_rows {
        let h = match unsafe { row_target::<L>(rows, row) } {
            Target::Class(_) => {
                let mut acc = Ent2::EMPTY;
                for rank in 0..p.ranks as u64 {
                    let at = p.gathered + rank * p.rank_stride + p.offset + 4 * SHARD_ENTROPY_WORDS as u64 * row;
                    let word = |k: u64| f32::from_bits(unsafe { prim::ld_global_u32(at + 4 * k) });
                    acc = acc.merge(Ent2 { m: word(0), s: word(1), t: word(2) });
                }
                acc.entropy()
            }
            Target::Ignored | Target::Bad => 0.0,
        };
        unsafe { prim::st_global_u32(p.out + 4 * row, h.to_bits()) };
        row += threads;
    }
}

/// A set of values `z` (logits in log2 units) as `m = max z`, `s = Σ 2^(z - m)` and
/// `t = Σ 2^(z - m)·(z - m)`: the entropy is `ln 2·(log2 s - t / s)`, both terms at least 0 (no
/// cancellation). A term `2^d` with `d` below [`FLOOR`] is 0 (taken at `FLOOR`, so `-inf` values
/// add nothing and never make `0·(-inf)`); a NaN value makes `s` and `t` NaN.
#[derive(Clone, Copy)]
struct Ent2 {
    m: f32,
    s: f32,
    t: f32,
}

/// Below this, `2^d` is 0 in f32 (`ex2.approx.ftz` flushes below 2^-126).
const FLOOR: f32 = -160.0;

/// `d` raised to [`FLOOR`]; a NaN stays NaN.
#[inline(always)]
fn floored(d: f32) -> f32 {
    if d < FLOOR { FLOOR } else { d }
}

impl Ent2 {
    const EMPTY: Ent2 = Ent2 { m: f32::NEG_INFINITY, s: 0.0, t: 0.0 };

    /// The same set against the reference `m` (at least `self.m`). An empty set (`m` = -inf)
    /// stays empty, also against `m` = -inf (where `self.m - m` would be NaN).
    #[inline(always)]
    fn at(self, m: f32) -> Ent2 {
        let d = if self.m == m { 0.0 } else { floored(self.m - m) };
        let f = prim::ex2(d);
        Ent2 { m, s: self.s * f, t: f * prim::fma(self.s, d, self.t) }
    }

    /// Adds `z[..n]`. While every value so far is -inf (no mass; `v - m` would be NaN) only a
    /// NaN changes the set (its sum NaN).
    #[inline(always)]
    fn add(&mut self, z: &[f32; 8], n: usize) {
        let local = reduce::max_of(z, n);
        if local > self.m {
            *self = self.at(local);
        }
        if self.m == f32::NEG_INFINITY {
            for &v in &z[..n] {
                if v.is_nan() {
                    self.s = f32::NAN;
                }
            }
            return;
        }
        for &v in &z[..n] {
            let d = floored(v - self.m);
            let e = prim::ex2(d);
            self.s += e;
            self.t = prim::fma(e, d, self.t);
        }
    }

    /// The union of two sets.
    #[inline(always)]
    fn merge(self, other: Ent2) -> Ent2 {
        let m = self.m.max(other.m);
        let (a, b) = (self.at(m), other.at(m));
        Ent2 { m, s: a.s + b.s, t: a.t + b.t }
    }

    /// `ln 2·(log2 s - t / s)`, in nats.
    #[inline(always)]
    fn entropy(self) -> f32 {
        LN_2 * (prim::lg2(self.s) - self.t / self.s)
    }
}

/// The [`Ent2`] of the `len` logits at `addr` (soft-capped where `cap > 0`; `inv` = `1 / cap`), by
/// the whole block (every thread gets it): each thread takes 16-byte vectors `t, t + threads,
/// ...` and one element of the unaligned head or the tail, as the predicted tokens' kernel does.
#[inline(always)]
unsafe fn row_sums<T: Element>(addr: u64, len: u32, cap: f32, inv: f32) -> Ent2 {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let head = ((((16 - (addr & 15)) & 15) as u32) / T::BYTES).min(len);
    let n_vec = (len - head) / T::VEC as u32;
    let mut acc = Ent2::EMPTY;
    let add = |acc: &mut Ent2, x: [f32; 8], n: usize| {
        let y = if cap > 0.0 { opts::capped(cap, inv, &x, n) } else { x };
        let mut z = [0.0f32; 8];
        for i in 0..n {
            z[i] = y[i] * LOG2_E;
        }
        acc.add(&z, n);
    };
    let mut v = tid;
    // Two vectors' loads in flight before the first is added.
    while v + step < n_vec {
        let load = |vk: u32| unsafe { prim::ld_global_v4(addr + ((head + vk * T::VEC as u32) * T::BYTES) as u64) };
        let (w0, w1) = (load(v), load(v + step));
        add(&mut acc, T::unpack(w0), T::VEC);
        add(&mut acc, T::unpack(w1), T::VEC);
        v += 2 * step;
    }
    if v < n_vec {
        let w = unsafe { prim::ld_global_v4(addr + ((head + v * T::VEC as u32) * T::BYTES) as u64) };
        add(&mut acc, T::unpack(w), T::VEC);
    }
    let n_scalar = len - n_vec * T::VEC as u32;
    if tid < n_scalar {
        let j = if tid < head { tid } else { tid + n_vec * T::VEC as u32 };
        let mut x = [0.0f32; 8];
        x[0] = T::widen(unsafe { T::ld_global_raw(addr + (j * T::BYTES) as u64) });
        add(&mut acc, x, 1);
    }
    block_merge(acc)
}

/// [`Ent2::merge`] across the block, in a fixed order; every thread gets it.
#[inline(always)]
fn block_merge(mut v: Ent2) -> Ent2 {
    let warp_merge = |mut v: Ent2| {
        let mut lane_mask = 16;
        while lane_mask > 0 {
            let other = Ent2 {
                m: shfl_xor_f32(v.m, lane_mask),
                s: shfl_xor_f32(v.s, lane_mask),
                t: shfl_xor_f32(v.t, lane_mask),
            };
            v = v.merge(other);
            lane_mask >>= 1;
        }
        v
    };
    v = warp_merge(v);
    let warps = prim::block_dim() / 32;
    if warps == 1 {
        return v;
    }
    let scratch = prim::smem_base();
    let (lane, warp) = (thread_idx() % 32, thread_idx() / 32);
    if lane == 0 {
        unsafe {
            prim::st_shared_u32(scratch + 4 * warp, v.m.to_bits());
            prim::st_shared_u32(scratch + 128 + 4 * warp, v.s.to_bits());
            prim::st_shared_u32(scratch + 256 + 4 * warp, v.t.to_bits());
        }
    }
    sync_threads();
    let mut w = Ent2::EMPTY;
    if lane < warps {
        unsafe {
            w.m = f32::from_bits(prim::ld_shared_u32(scratch + 4 * lane));
            w.s = f32::from_bits(prim::ld_shared_u32(scratch + 128 + 4 * lane));
            w.t = f32::from_bits(prim::ld_shared_u32(scratch + 256 + 4 * lane));
        }
    }
    let w = warp_merge(w);
    // The scratch is reused by the next row: nobody may write it before all have read.
    sync_threads();
    w
}
