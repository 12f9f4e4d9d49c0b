//! Reductions: the online log-sum-exp state, and warp- and block-wide combines.
//!
//! Block reductions use the first `SMEM_REDUCTION_BYTES` of dynamic shared memory as scratch and
//! must be reached by every thread of the block (they contain barriers).

use crate::abi::SMEM_REDUCTION_BYTES;
use crate::prim::{self, shfl_xor_f32, shfl_xor_u32, sync_threads};
use core::f32::consts::LOG2_E;

const _: () = assert!(SMEM_REDUCTION_BYTES >= 32 * 8);

/// Online log-sum-exp in base 2: the set of values `x` summarised as `m + log2(s)`, with
/// `m = max x` and `s = sum 2^(x - m)`, over `x` = natural logits times log2(e).
#[derive(Clone, Copy)]
pub struct Lse2 {
    pub m: f32,
    pub s: f32,
}

impl Lse2 {
    pub const EMPTY: Lse2 = Lse2 { m: f32::NEG_INFINITY, s: 0.0 };

    /// Adds the natural logits `x[..n]` (`n >= 1`), as `x * log2(e)`: the maximum is taken on `x`
    /// (a positive scale keeps the order), then each term is one FMA and one `ex2`. NaN inputs
    /// make `s` NaN, as they make PyTorch's loss NaN.
    #[inline(always)]
    pub fn add<const N: usize>(&mut self, x: &[f32; N], n: usize) {
        let mut local = x[0];
        for &v in &x[1..n] {
            local = local.max(v);
        }
        let m = self.m.max(local * LOG2_E);
        if m == f32::NEG_INFINITY {
            // Everything so far is -inf (no mass) or NaN (max ignores NaN): keep the NaN.
            if local.is_nan() {
                self.s = f32::NAN;
            }
            return;
        }
        let mut s = self.s * prim::ex2(self.m - m);
        for &v in &x[..n] {
            s += prim::ex2(prim::fma(v, LOG2_E, -m));
        }
        self.m = m;
        self.s = s;
    }

    /// Adds `2^(t·scale - m)` for `t[..n]` against the fixed reference `m = self.m` (`t·scale`
    /// never above `m` and within 126 of it: no term overflows or flushes to zero), without a
    /// maximum: one FMA and one `ex2` per element, summed as a tree. NaN inputs make `s` NaN.
    #[inline(always)]
    pub fn add_fixed<const N: usize>(&mut self, t: &[f32; N], n: usize, scale: f32) {
        self.s += sum_exp2_scaled(t, n, scale, self.m);
    }

    /// Adds values already in log2 units, `v[..n]` (-inf for none): the running maximum raised
    /// to theirs and the terms summed as a tree ([`add`](Self::add) takes natural logits).
    #[inline(always)]
    pub fn add_log2<const N: usize>(&mut self, v: &[f32; N], n: usize) {
        let m = self.m.max(max_of(v, n));
        if m == f32::NEG_INFINITY {
            return;
        }
        self.s = prim::fma(self.s, prim::ex2(self.m - m), sum_exp2_scaled(v, n, 1.0, m));
        self.m = m;
    }

    /// [`add`](Self::add) with the NaN-propagating maximum of `x[..n]` given (token accuracy has
    /// it already) and the terms summed as a tree: a NaN maximum leaves `m` as it was, and the
    /// NaN term makes `s` NaN.
    #[inline(always)]
    pub fn add_given_max<const N: usize>(&mut self, x: &[f32; N], n: usize, local: f32) {
        let m = self.m.max(local * LOG2_E);
        if m == f32::NEG_INFINITY {
            if local.is_nan() {
                self.s = f32::NAN;
            }
            return;
        }
        self.s = prim::fma(self.s, prim::ex2(self.m - m), sum_exp2(x, n, m));
        self.m = m;
    }

    /// Raises the running maximum to cover natural logits whose maximum is `max_natural`,
    /// rescaling the sum. False while the maximum is still -inf (nothing to add but NaNs).
    #[inline(always)]
    pub fn raise(&mut self, max_natural: f32) -> bool {
        let m = self.m.max(max_natural * LOG2_E);
        if m == f32::NEG_INFINITY {
            return false;
        }
        self.s *= prim::ex2(self.m - m);
        self.m = m;
        true
    }

    /// Makes the sum NaN if `x[..n]` holds a NaN (for values `raise` could not take).
    #[inline(always)]
    pub fn keep_nan<const N: usize>(&mut self, x: &[f32; N], n: usize) {
        for &v in &x[..n] {
            if v.is_nan() {
                self.s = f32::NAN;
            }
        }
    }

    /// The union of two summaries.
    #[inline(always)]
    pub fn merge(self, other: Lse2) -> Lse2 {
        let m = self.m.max(other.m);
        if m == f32::NEG_INFINITY {
            return Lse2 { m, s: self.s + other.s };
        }
        Lse2 { m, s: self.s * prim::ex2(self.m - m) + other.s * prim::ex2(other.m - m) }
    }

    /// `log2(sum 2^x)`: `-inf` for an empty set.
    #[inline(always)]
    pub fn value(self) -> f32 {
        self.m + prim::lg2(self.s)
    }
}

/// Maximum of `x[..n]` (`n` 1, 4 or 8) as a tree; NaNs are ignored.
#[inline(always)]
pub fn max_of<const N: usize>(x: &[f32; N], n: usize) -> f32 {
    match n {
        8 => {
            let a = x[0].max(x[1]).max(x[2].max(x[3]));
            let b = x[4].max(x[5]).max(x[6].max(x[7]));
            a.max(b)
        }
        4 => x[0].max(x[1]).max(x[2].max(x[3])),
        _ => {
            let mut m = x[0];
            for &v in &x[1..n] {
                m = m.max(v);
            }
            m
        }
    }
}

/// Sum of `x[..n]` (`n` 1, 4 or 8) as a tree.
#[inline(always)]
pub fn sum_of<const N: usize>(x: &[f32; N], n: usize) -> f32 {
    match n {
        8 => ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])),
        4 => (x[0] + x[1]) + (x[2] + x[3]),
        _ => {
            let mut s = x[0];
            for &v in &x[1..n] {
                s += v;
            }
            s
        }
    }
}

/// `sum 2^(x * log2(e) - m)` over `x[..n]` (`n` 1, 4 or 8), one FMA and one `ex2` per element,
/// summed as a tree.
#[inline(always)]
pub fn sum_exp2<const N: usize>(x: &[f32; N], n: usize, m: f32) -> f32 {
    sum_exp2_scaled(x, n, LOG2_E, m)
}

/// `sum 2^(x * scale - m)` over `x[..n]` (`n` 1, 4 or 8), one FMA and one `ex2` per element,
/// summed as a tree.
#[inline(always)]
pub fn sum_exp2_scaled<const N: usize>(x: &[f32; N], n: usize, scale: f32, m: f32) -> f32 {
    let mut e = [0.0f32; N];
    for i in 0..n {
        e[i] = prim::ex2(prim::fma(x[i], scale, -m));
    }
    sum_of(&e, n)
}

/// Butterfly merge over the 32 lanes of a warp; every lane gets the result.
#[inline(always)]
pub fn warp_lse2(mut v: Lse2) -> Lse2 {
    let mut lane_mask = 16;
    while lane_mask > 0 {
        let other = Lse2 { m: shfl_xor_f32(v.m, lane_mask), s: shfl_xor_f32(v.s, lane_mask) };
        v = v.merge(other);
        lane_mask >>= 1;
    }
    v
}

/// Merge across the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
#[inline(always)]
pub fn block_lse2(v: Lse2) -> Lse2 {
    let scratch = prim::smem_base();
    let tid = prim::thread_idx();
    let warps = prim::block_dim() / 32;
    let v = warp_lse2(v);
    if warps == 1 {
        return v;
    }
    let (lane, warp) = (tid % 32, tid / 32);
    if lane == 0 {
        unsafe {
            prim::st_shared_u32(scratch + 8 * warp, v.m.to_bits());
            prim::st_shared_u32(scratch + 8 * warp + 4, v.s.to_bits());
        }
    }
    sync_threads();
    let mut w = Lse2::EMPTY;
    if lane < warps {
        unsafe {
            w.m = f32::from_bits(prim::ld_shared_u32(scratch + 8 * lane));
            w.s = f32::from_bits(prim::ld_shared_u32(scratch + 8 * lane + 4));
        }
    }
    let w = warp_lse2(w);
    // The scratch is reused by the next reduction: nobody may write it before all have read.
    sync_threads();
    w
}

/// Sum of a `u32` across the warp; every lane gets it.
#[inline(always)]
pub fn warp_sum_u32(mut v: u32) -> u32 {
    let mut lane_mask = 16;
    while lane_mask > 0 {
        v = v.wrapping_add(shfl_xor_u32(v, lane_mask));
        lane_mask >>= 1;
    }
    v
}

/// Sum of a `u32` across the block; every thread gets it.
#[inline(always)]
pub fn block_sum_u32(v: u32) -> u32 {
    block_combine_words(warp_sum_u32(v) as u64, |a, b| a.wrapping_add(b)) as u32
}

/// Sum of an `f32` across the warp (butterfly, so every lane gets the same bits).
#[inline(always)]
pub fn warp_sum_f32(mut v: f32) -> f32 {
    let mut lane_mask = 16;
    while lane_mask > 0 {
        v += shfl_xor_f32(v, lane_mask);
        lane_mask >>= 1;
    }
    v
}

/// Sum of an `f32` across the block, in a fixed order; every thread gets it.
#[inline(always)]
pub fn block_sum_f32(v: f32) -> f32 {
    let total = block_combine_words(warp_sum_f32(v).to_bits() as u64, |a, b| {
        (f32::from_bits(a as u32) + f32::from_bits(b as u32)).to_bits() as u64
    });
    f32::from_bits(total as u32)
}

/// Sum of an `f64` across the block; every thread gets it.
#[inline(always)]
pub fn block_sum_f64(v: f64) -> f64 {
    f64::from_bits(block_combine_words(warp_sum_f64(v).to_bits(), |a, b| {
        (f64::from_bits(a) + f64::from_bits(b)).to_bits()
    }))
}

/// Sum of an `f64` across the warp (butterfly, so every lane gets the same bits): the first
/// half of [`block_sum_f64`].
#[inline(always)]
pub fn warp_sum_f64(mut v: f64) -> f64 {
    let mut lane_mask = 16;
    while lane_mask > 0 {
        let bits = v.to_bits();
        let lo = shfl_xor_u32(bits as u32, lane_mask);
        let hi = shfl_xor_u32((bits >> 32) as u32, lane_mask);
        v += f64::from_bits(((hi as u64) << 32) | lo as u64);
        lane_mask >>= 1;
    }
    v
}

/// A candidate for `torch.argmax`: a value and its index (`u32::MAX`: no candidate yet).
#[derive(Clone, Copy)]
pub struct Best {
    pub value: f32,
    pub index: u32,
}

impl Best {
    pub const NONE: Best = Best { value: f32::NEG_INFINITY, index: u32::MAX };

    #[inline(always)]
    pub fn is_none(&self) -> bool {
        self.index == u32::MAX
    }

    /// The first maximum of the two: a NaN beats any number, a larger value a smaller, and of
    /// equal values (or two NaNs) the smaller index wins; no candidate loses to any.
    #[inline(always)]
    pub fn or(self, other: Best) -> Best {
        let (a_nan, b_nan) = (self.value.is_nan(), other.value.is_nan());
        let other_wins = if other.is_none() {
            false
        } else if self.is_none() {
            true
        } else if a_nan || b_nan {
            b_nan && (!a_nan || other.index < self.index)
        } else {
            other.value > self.value || (other.value == self.value && other.index < self.index)
        };
        if other_wins { other } else { self }
    }

    fn word(self) -> u64 {
        ((self.value.to_bits() as u64) << 32) | self.index as u64
    }

    fn of_word(w: u64) -> Best {
        Best { value: f32::from_bits((w >> 32) as u32), index: w as u32 }
    }
}

/// [`Best::or`] across the block; every thread gets it (the same whatever the timing).
#[inline(always)]
pub fn block_best(mut v: Best) -> Best {
    let mut lane_mask = 16;
    while lane_mask > 0 {
        let other = Best { value: shfl_xor_f32(v.value, lane_mask), index: shfl_xor_u32(v.index, lane_mask) };
        v = v.or(other);
        lane_mask >>= 1;
    }
    Best::of_word(block_combine_words(v.word(), |a, b| Best::of_word(a).or(Best::of_word(b)).word()))
}

/// Combines the per-warp values (already warp-reduced, identical on all lanes) through shared
/// memory, serially in warp order so the result does not depend on timing.
#[inline(always)]
fn block_combine_words(v: u64, combine: impl Fn(u64, u64) -> u64) -> u64 {
    let scratch = prim::smem_base();
    let tid = prim::thread_idx();
    let warps = prim::block_dim() / 32;
    if warps == 1 {
        return v;
    }
    if tid % 32 == 0 {
        unsafe {
            prim::st_shared_u32(scratch + 8 * (tid / 32), v as u32);
            prim::st_shared_u32(scratch + 8 * (tid / 32) + 4, (v >> 32) as u32);
        }
    }
    sync_threads();
    let read = |w: u32| unsafe {
        prim::ld_shared_u32(scratch + 8 * w) as u64
            | ((prim::ld_shared_u32(scratch + 8 * w + 4) as u64) << 32)
    };
    let mut acc = read(0);
    for w in 1..warps {
        acc = combine(acc, read(w));
    }
    sync_threads();
    acc
}
