//! The loss options (label smoothing, z-loss, soft-capping, class weights, token accuracy) as the
//! kernels apply them, behind a compile-time [`Mode`]:
//!
//! - `Plain` (the plain entry points): every option branch is a constant `false`, so they compile
//!   to the same code as without options.
//! - `RowConst` (`*_coef_*`): options that leave the gradient's per-element work alone (z-loss,
//!   class weights, label smoothing without class weights): the plain kernels' batched loops and register budget, plus a running `Σ (x - x_0)` for the smoothing (`x_0` the
//!   label's logit: the sum keeps the logits' spread, not their magnitude).
//! - `RowAcc` (`*_acc_*`): `RowConst` and token accuracy (kernels of their own, see [`RowAcc`]).
//! - `RowCap` (`*_cap_*`): `RowConst` and the soft cap; `RowCapAcc` (`*_capacc_*`) both.
//! - `RowWSmooth` (`*_wsm_*`): `RowAcc` and label smoothing with class weights.
//! - `Full` (`*_opt_*`): every option (smoothing with class weights needs it), one vector at a
//!   time.
//!
//! Per row, with `y = cap·tanh(x / cap)` (or `y = x`), `lse = ln Σ e^y`, class `c`, weights `w`
//! (1 without), `W = Σ_j w_j`, smoothing `ε`, z-loss scale `s`:
//!
//! - loss = `(1 - ε)·w_c·(lse - y_c) + (ε/V)·(W·(lse - y_0) - Σ_j w_j·(y_j - y_0)) + s·lse²`,
//!   each `lse - y` as `(m - y·log2 e) + log2 s` from the online log-sum-exp's `(m, s)`
//! - d loss / d x_j = `(p_j·a - [j = c]·b - w_j·k) · dy_j/dx_j`, with `p = softmax(y)`,
//!   `b = (1 - ε)·w_c·ce_scale`, `k = (ε/V)·ce_scale`, `a = b + W·k + 2·s·lse·z_scale`, where
//!   `ce_scale` is the reduction's scale of the cross-entropy part (`grad_scale / Σ w_c` for a
//!   weighted mean) and `z_scale` that of the z-loss (`grad_scale / n_valid` for the mean).
//!
//! Without options `a = b = scale`, `k = 0`: the plain gradient `(p_j - [j = c])·scale`.

use crate::abi::{
    COUNT_CLASS_WEIGHT_SUM, COUNT_VALID, COUNT_WEIGHT, OptParams, REDUCTION_MEAN, SMEM_COUNTS, SMEM_REDUCTION_BYTES, XentParams,
};
use crate::prim;
use crate::reduce::{self, Lse2};
use core::f32::consts::{LN_2, LOG2_E};

/// Which options a kernel applies.
pub trait Mode {
    /// Reads `OptParams` (per-row constants, the summary's extra words).
    const OPTS: bool;
    /// Per-element option work: the soft cap, token accuracy, smoothing with class weights.
    const FULL: bool;
    /// The per-row kernels' loops also count the token accuracy (`RowAcc`; `Full` counts it in
    /// [`observe`]).
    const ACCURACY: bool = false;
    /// The soft cap in the per-row kernels' batched loops (`RowCap`; `Full` applies it in
    /// [`observe`]).
    const CAP: bool = false;
    /// Label smoothing with class weights in the batched loops (`RowCapAcc`): the smoothing
    /// sum and the gradient's smoothing term weighted per class, read from `OptParams::weight`.
    const WSMOOTH: bool = false;
    /// Label smoothing's path on every row, smoothing or not (`RowConst`): the label's logit read
    /// for the sum's reference ([`RowCtx::y_ref`]; in the cluster kernels before the bulk copy)
    /// and, in the cluster kernels, the sum added per vector, then unused (its factor `ε` is 0). Measured faster than the
    /// branch past them, for reasons the profiles did not show: with the z-loss 88.0 -> 89.8% of
    /// copy, class weights 87.4 -> 88.9 (H200, 8192 x 128256 bf16, two A/B rounds, session 15;
    /// 4096 x 262144 unchanged).
    const SMOOTHING_PATH: bool = false;
    /// The row's IEEE divisions ([`coef`]'s scales, `1 / cap`, the loss's `ε / V`) computed in
    /// f64 ([`prim::div_rn_f64`], the same bits): `RowCapAcc` in 16 bits, where ptxas then keeps
    /// both of the kept vectors in registers (bf16 i32 spills 8 + 4 bytes instead of 24 + 24,
    /// i64 24 + 24 instead of 36 + 116). The soft cap with token accuracy gained 2.3-4.4 points
    /// of copy bandwidth and all five 0.0-1.9 on the H100 (session 46); on the H200 (session 47)
    /// -0.7 to +1.4 and -0.3 to -0.6, and in f32 the f32 divisions were 0.9-1.3 and 0.3-0.5
    /// points faster (`RowCapAcc<false>`). Done in every kernel (session 33) it cost the others
    /// up to 0.9.
    const F64_DIVISION: bool = false;
    /// What the cluster kernel takes of the call's scales before its chunk's loads
    /// ([`CallScales`], or `()`: nothing, [`coef`] takes them after the merge).
    type Early: EarlyScales;
}

/// No options: the fast kernels.
pub struct Plain;
impl Mode for Plain {
    type Early = CallScales;
    const OPTS: bool = false;
    const FULL: bool = false;
}

/// The options that change per-row constants only.
pub struct RowConst;
impl Mode for RowConst {
    type Early = CallScales;
    const OPTS: bool = true;
    const FULL: bool = false;
    const SMOOTHING_PATH: bool = true;
}

/// `RowConst` and token accuracy (`*_acc_*`): a compare per element in the first pass, in kernels
/// of their own, because the live values it adds cost the `RowConst` kernels' loops 10 points of
/// copy bandwidth even when it is off (H200, 8192 x 128256 bf16, z-loss: 85% -> 77%).
pub struct RowAcc;
impl Mode for RowAcc {
    type Early = CallScales;
    const OPTS: bool = true;
    const FULL: bool = false;
    const ACCURACY: bool = true;
}

/// `RowConst` and the soft cap (`*_cap_*`): the per-row kernels' batched loops, with
/// `y = cap·tanh(x / cap)` from [`capped`] (a polynomial and no branch where `|x / cap| < 0.4`)
/// in both passes and the gradient times `1 - tanh²`. Per-element work `Full` did one vector at a
/// time with its other options' checks on every element (H200, 8192 x 128256 bf16: 40% of copy,
/// 58 instructions per logit, issue-bound).
pub struct RowCap;
impl Mode for RowCap {
    type Early = ();
    const OPTS: bool = true;
    const FULL: bool = false;
    const CAP: bool = true;
}

/// `RowCap` with token accuracy and label smoothing with class weights (`*_capacc_*`), each on
/// at run time: the soft cap's batched loops with the compare of each logit as given against the
/// label's, and the smoothing's sum and gradient term weighted per class. Kernels of their own, as `RowAcc`'s are: counting
/// it in the `cap_` kernels took them to 72 registers and the soft cap alone from 61.6 to 55.4% of
/// copy (H200, 8192 x 128256 bf16), where the soft cap with token accuracy in these loops ran at
/// 52-55% against 23% one vector at a time (`Full`).
/// `F64_DIV`: [`Mode::F64_DIVISION`] (true in 16 bits, false in f32).
pub struct RowCapAcc<const F64_DIV: bool = true>;
impl<const F64_DIV: bool> Mode for RowCapAcc<F64_DIV> {
    type Early = ();
    const OPTS: bool = true;
    const FULL: bool = false;
    const ACCURACY: bool = true;
    const CAP: bool = true;
    const WSMOOTH: bool = true;
    const F64_DIVISION: bool = F64_DIV;
}

/// `RowAcc` with label smoothing weighted per class (`*_wsm_*`), without the soft cap: the
/// smoothing's sum and gradient term read each class's weight in the batched loops, where `Full`
/// did one vector at a time with every option's check (H200, 8192 x 128256 bf16, smoothing with
/// class weights: 27.7% of copy). Token accuracy is on at run time, as in `RowCapAcc`. Fused,
/// cluster and split kernels only (one kernel a row), as `RowCapAcc`'s are.
pub struct RowWSmooth;
impl Mode for RowWSmooth {
    type Early = ();
    const OPTS: bool = true;
    const FULL: bool = false;
    const ACCURACY: bool = true;
    const WSMOOTH: bool = true;
}

/// Every option, read at run time from `OptParams`.
pub struct Full;
impl Mode for Full {
    type Early = ();
    const OPTS: bool = true;
    const FULL: bool = true;
}

/// Most warps whose summaries with options (4 words each) fit the reduction scratch at once.
const MERGE_ONCE_WARPS: u32 = SMEM_REDUCTION_BYTES / 16;
const _: () = assert!(MERGE_ONCE_WARPS >= 8);

/// A summary of some elements of a row: the online log-sum-exp of the (capped) logits, and with
/// options `Σ w_j·(y_j - y_0)` (label smoothing; `y_0` the label's capped logit) and the count
/// of elements that beat the label for the argmax (token accuracy).
#[derive(Clone, Copy)]
pub struct Part {
    pub lse: Lse2,
    pub wsum: f32,
    pub wrong: u32,
}

impl Part {
    pub const EMPTY: Part = Part { lse: Lse2::EMPTY, wsum: 0.0, wrong: 0 };

    #[inline(always)]
    pub fn merge<M: Mode>(self, other: Part) -> Part {
        if M::OPTS {
            Part {
                lse: self.lse.merge(other.lse),
                wsum: self.wsum + other.wsum,
                wrong: self.wrong + other.wrong,
            }
        } else {
            Part { lse: self.lse.merge(other.lse), ..Part::EMPTY }
        }
    }

    /// The merge across the block; every thread gets it (contains barriers).
    #[inline(always)]
    pub fn block_merge<M: Mode>(self) -> Part {
        let total = self.block_merge_unsynced::<M>();
        // The scratch is reused by the next reduction: nobody may write it before all have read.
        prim::sync_threads();
        total
    }

    /// [`block_merge`](Self::block_merge) without its closing barrier: one barrier (up to
    /// `MERGE_ONCE_WARPS` warps), after which every thread reads the scratch, so the caller must
    /// pass another barrier (of the block or its cluster) before any thread writes the scratch
    /// again (the next block reduction).
    ///
    /// Each warp merges its lanes, lane 0 stores the warp's summary (16 bytes a warp with options,
    /// 8 without), and every warp merges the stored summaries in a butterfly (lane `w` reads warp
    /// `w`'s): the same bits in every thread, with one barrier where the log-sum-exp, the
    /// smoothing sum and the accuracy count took two each.
    #[inline(always)]
    pub fn block_merge_unsynced<M: Mode>(self) -> Part {
        let warps = prim::block_dim() / 32;
        if warps == 1 {
            return self.warp_merge::<M>();
        }
        if M::OPTS && warps > MERGE_ONCE_WARPS {
            // Blocks of more than 512 threads: a round for each value.
            return Part {
                lse: reduce::block_lse2(self.lse),
                wsum: reduce::block_sum_f32(self.wsum),
                wrong: reduce::block_sum_u32(self.wrong),
            };
        }
        let scratch = prim::smem_base();
        let tid = prim::thread_idx();
        let (lane, warp) = (tid % 32, tid / 32);
        let stride = if M::OPTS { 16 } else { 8 };
        let at = |w: u32| scratch + stride * w;
        // One value at a time, each stored as soon as it is merged (the cluster kernels keep
        // their chunk in registers, with few to spare).
        let lse = reduce::warp_lse2(self.lse);
        if lane == 0 {
            unsafe {
                prim::st_shared_u32(at(warp), lse.m.to_bits());
                prim::st_shared_u32(at(warp) + 4, lse.s.to_bits());
            }
        }
        if M::OPTS {
            let wsum = reduce::warp_sum_f32(self.wsum);
            if lane == 0 {
                unsafe { prim::st_shared_u32(at(warp) + 8, wsum.to_bits()) };
            }
            let wrong = reduce::warp_sum_u32(self.wrong);
            if lane == 0 {
                unsafe { prim::st_shared_u32(at(warp) + 12, wrong) };
            }
        }
        prim::sync_threads();
        let mut warp_total = Part::EMPTY;
        if lane < warps {
            warp_total = unsafe { Part::ld_shared::<M>(at(lane)) };
        }
        warp_total.warp_merge::<M>()
    }

    /// The merge across a warp; every lane gets it.
    #[inline(always)]
    pub fn warp_merge<M: Mode>(self) -> Part {
        let lse = reduce::warp_lse2(self.lse);
        if M::OPTS {
            Part { lse, wsum: reduce::warp_sum_f32(self.wsum), wrong: reduce::warp_sum_u32(self.wrong) }
        } else {
            Part { lse, ..Part::EMPTY }
        }
    }

    /// Stores the summary as 4 words at a shared-window address (`Plain`: 2).
    #[inline(always)]
    pub unsafe fn st_shared<M: Mode>(&self, at: u32) {
        unsafe {
            prim::st_shared_u32(at, self.lse.m.to_bits());
            prim::st_shared_u32(at + 4, self.lse.s.to_bits());
            if M::OPTS {
                prim::st_shared_u32(at + 8, self.wsum.to_bits());
                prim::st_shared_u32(at + 12, self.wrong);
            }
        }
    }

    /// Loads a summary stored by [`st_shared`](Self::st_shared) (`Plain`: 2 words).
    #[inline(always)]
    pub unsafe fn ld_shared<M: Mode>(at: u32) -> Part {
        let lse = unsafe {
            Lse2 { m: f32::from_bits(prim::ld_shared_u32(at)), s: f32::from_bits(prim::ld_shared_u32(at + 4)) }
        };
        if M::OPTS {
            unsafe { Part { lse, wsum: f32::from_bits(prim::ld_shared_u32(at + 8)), wrong: prim::ld_shared_u32(at + 12) } }
        } else {
            Part { lse, ..Part::EMPTY }
        }
    }

    /// Stores the summary as 4 words at a global address (`Plain`: 2).
    #[inline(always)]
    pub unsafe fn st_global<M: Mode>(&self, at: u64) {
        unsafe {
            prim::st_global_u32(at, self.lse.m.to_bits());
            prim::st_global_u32(at + 4, self.lse.s.to_bits());
            if M::OPTS {
                prim::st_global_u32(at + 8, self.wsum.to_bits());
                prim::st_global_u32(at + 12, self.wrong);
            }
        }
    }

    /// Loads a summary stored by [`st_global`](Self::st_global) (`Plain`: 2 words).
    #[inline(always)]
    pub unsafe fn ld_global<M: Mode>(at: u64) -> Part {
        unsafe { Self::ld_global_with::<M>(at, |a| prim::ld_global_u32(a)) }
    }

    /// [`ld_global`](Self::ld_global) past L1, for a summary another CTA stored during this
    /// launch (the split plan).
    #[inline(always)]
    pub unsafe fn ld_global_cg<M: Mode>(at: u64) -> Part {
        unsafe { Self::ld_global_with::<M>(at, |a| prim::ld_global_cg_u32(a)) }
    }

    #[inline(always)]
    unsafe fn ld_global_with<M: Mode>(at: u64, load: impl Fn(u64) -> u32) -> Part {
        let lse = Lse2 { m: f32::from_bits(load(at)), s: f32::from_bits(load(at + 4)) };
        if M::OPTS {
            Part { lse, wsum: f32::from_bits(load(at + 8)), wrong: load(at + 12) }
        } else {
            Part { lse, ..Part::EMPTY }
        }
    }

    /// Loads a summary stored by `st_shared` in another CTA of the cluster (`at` from `mapa`).
    #[cfg(xent_cluster)]
    #[inline(always)]
    pub unsafe fn ld_shared_cluster<M: Mode>(at: u32) -> Part {
        let lse = unsafe {
            Lse2 {
                m: f32::from_bits(prim::ld_shared_cluster_u32(at)),
                s: f32::from_bits(prim::ld_shared_cluster_u32(at + 4)),
            }
        };
        if M::OPTS {
            unsafe {
                Part {
                    lse,
                    wsum: f32::from_bits(prim::ld_shared_cluster_u32(at + 8)),
                    wrong: prim::ld_shared_cluster_u32(at + 12),
                }
            }
        } else {
            Part { lse, ..Part::EMPTY }
        }
    }
}

/// What phase one needs to know about the row besides its elements (`Full` only).
#[derive(Clone, Copy)]
pub struct RowCtx {
    /// Column of the segment's element 0.
    pub col0: u32,
    /// The label's column.
    pub label: u32,
    /// The label's logit as given (read only with token accuracy).
    pub x_label: f32,
    /// Label smoothing's reference: the label's (soft-capped) logit, subtracted from every
    /// logit its sum `wsum` adds, so that the sum keeps the logits' spread and not their
    /// magnitude (0 without smoothing).
    pub y_ref: f32,
    /// `1 / cap` with the soft cap (0 without; `RowCap` only), computed once a row.
    pub inv_cap: f32,
    /// The class-weighted smoothing sum is left to the gradient pass ([`Coef::wsum_later`]): the
    /// first pass reads no class weight.
    pub wsum_later: bool,
}

/// `tanh(u)` in f32 to a few ulp: an odd Taylor polynomial below 0.4 (truncation error below
/// 1e-8 relative), `1 - 2 / (e^{2|u|} + 1)` above (no cancellation worse than 1.7x there).
#[inline(always)]
pub fn tanh(u: f32) -> f32 {
    let sign = u.to_bits() & 0x8000_0000;
    let a = f32::from_bits(u.to_bits() & 0x7fff_ffff);
    if a < 0.4 {
        let s = a * a;
        let q = tanh_q(s);
        f32::from_bits(prim::fma(a * s, q, a).to_bits() | sign)
    } else {
        tanh_beyond(u)
    }
}

/// [`tanh`] for `|u|` at least 0.4 (or infinite): `1 - 2 / (e^{2|u|} + 1)` with `u`'s sign, with
/// an approximate reciprocal, not IEEE division (no slow path): beyond 0.4 the subtraction
/// amplifies its error at most 1.7x. NaN stays NaN.
#[inline(always)]
pub fn tanh_beyond(u: f32) -> f32 {
    let sign = u.to_bits() & 0x8000_0000;
    let a = f32::from_bits(u.to_bits() & 0x7fff_ffff);
    let t = prim::fma(-2.0, prim::rcp(prim::ex2(a * (2.0 * LOG2_E)) + 1.0), 1.0);
    f32::from_bits(t.to_bits() | sign)
}

/// For each element of `$x[..$n]` past a polynomial that holds below `$x2_max` (`$x2[i] = x[i]²`
/// at least `$x2_max`, an infinity too; a NaN is not), `$body` with `$i` its index and `$t` its
/// `tanh(x / cap)` ([`tanh_beyond`]; `$inv` = `1 / cap`). A macro, not a function taking a
/// closure: the closure changed the branches' layout in the PTX.
#[macro_export]
macro_rules! each_past {
    ($x:expr, $x2:expr, $n:expr, $x2_max:expr, $inv:expr, |$i:ident, $t:ident| $body:expr) => {
        for $i in 0..$n {
            if $x2[$i] >= $x2_max {
                let $t = $crate::opts::tanh_beyond($x[$i] * $inv);
                $body;
            }
        }
    };
}

/// `q(s)` of `tanh(u) = u + u·s·q(s)`, `s = u²`, for `|u| < 0.4`: [`TANH_Q`](crate::abi::TANH_Q).
#[inline(always)]
fn tanh_q(s: f32) -> f32 {
    let [c0, c1, c2, c3] = crate::abi::TANH_Q;
    let mut q = c3;
    q = prim::fma(q, s, c2);
    q = prim::fma(q, s, c1);
    prim::fma(q, s, c0)
}

/// `c(x2)` for the coefficients `c` of `x2⁰` to `x2^(K-1)` (`OptParams::tanh_poly`, `exp_poly`,
/// `tanh_short`, `exp_short`): Horner's `K - 1` FMAs.
#[inline(always)]
pub fn horner<const K: usize>(c: &[f32; K], x2: f32) -> f32 {
    let mut v = c[K - 1];
    for k in (0..K - 1).rev() {
        v = prim::fma(v, x2, c[k]);
    }
    v
}

/// `cap·tanh(x / cap)` for `x[..n]` (`inv` = `1 / cap`): where every `|x / cap|` is below 0.4,
/// `x + x·u²·q(u²)` with `u = x / cap` and the odd Taylor polynomial of [`tanh`] (its leading term
/// `x` exact, 10 instructions an element, no branch per element); otherwise (a large logit, an
/// infinity) [`tanh`] element by element. A NaN stays NaN on either path.
#[inline(always)]
pub fn capped<const N: usize>(cap: f32, inv: f32, x: &[f32; N], n: usize) -> [f32; N] {
    let mut y = [0.0; N];
    let mut widest = 0.0f32;
    for i in 0..n {
        let u = x[i] * inv;
        let s = u * u;
        widest = widest.max(s);
        let q = tanh_q(s);
        y[i] = prim::fma(x[i] * s, q, x[i]);
    }
    if !(widest < POLY_WIDEST) {
        for i in 0..n {
            y[i] = cap * tanh(x[i] * inv);
        }
    }
    y
}

/// `(x / cap)²` below which [`capped`] takes the polynomial (`|x / cap| < 0.4`).
pub const POLY_WIDEST: f32 = 0.16;

/// The soft cap's gradient (as [`grad_capped`]) from `t = x·P(x²)` (`K + 1` instructions an
/// element), the polynomial `tanh_poly` (`OptParams::tanh_poly`, `tanh_short` or `tanh_wide`):
/// without `FIX`, of elements known to lie where it holds (`x²` below `x2_max`, from the first
/// pass over them: no check here); with `FIX`, of any elements, those with `x²` at least `x2_max`
/// taking [`tanh_beyond`] instead (a check a vector, and one an element where it fails).
#[inline(always)]
pub fn grad_capped_poly<M: Mode, const N: usize, const K: usize, const FIX: bool>(
    x: [f32; N],
    n: usize,
    first: u32,
    label: u32,
    c: &Coef,
    cap_log2e: f32,
    tanh_poly: &[f32; K],
    x2_max: f32,
    wsum: &mut f32,
) -> [f32; N] {
    let (mut t, mut x2) = ([0.0; N], [0.0; N]);
    let mut widest = 0.0f32;
    for i in 0..n {
        x2[i] = x[i] * x[i];
        t[i] = x[i] * horner(tanh_poly, x2[i]);
        if FIX {
            widest = widest.max(x2[i]);
        }
    }
    if FIX && !(widest < x2_max) {
        crate::each_past!(x, x2, n, x2_max, c.inv_cap, |i, ti| t[i] = ti);
    }
    if !c.lse2_a.is_nan() {
        // `p·a·(1 - t²)` with `a` in the exponent (`k = 0`: no smoothing term).
        let mut g = [0.0; N];
        for i in 0..n {
            g[i] = prim::ex2(prim::fma(t[i], cap_log2e, -c.lse2_a)) * prim::fma(-t[i], t[i], 1.0);
        }
        capped_label(&mut g, &t, n, first, label, c);
        return g;
    }
    grad_from_t::<M, N>(t, n, first, label, c, cap_log2e, wsum)
}

/// The soft cap's gradient (as [`grad_capped`]) from `t = tanh(x / cap)` itself:
/// `p = 2^(t·cap·log2(e) - lse2)`, one multiply fewer an element than from `y = cap·t`.
/// `cap_log2e` is `cap·log2(e)`.
#[inline(always)]
pub fn grad_from_t<M: Mode, const N: usize>(
    t: [f32; N],
    n: usize,
    first: u32,
    label: u32,
    c: &Coef,
    cap_log2e: f32,
    wsum: &mut f32,
) -> [f32; N] {
    let mut g = [0.0; N];
    let w = unsafe { smoothing_weights::<M, N>(c, first, n) };
    for i in 0..n {
        let p = prim::ex2(prim::fma(t[i], cap_log2e, -c.lse2));
        g[i] = capped_term(p, t[i], w[i], c);
    }
    later_wsum::<M, N>(wsum, c, &w, n, |i| prim::fma(c.cap, t[i], -c.y_ref));
    capped_label(&mut g, &t, n, first, label, c);
    g
}

/// Adds `Σ w_i·(y_i - y_ref)` over `i < n` to `wsum` where the gradient pass takes the smoothing
/// sum ([`Coef::wsum_later`]), from the weights `w` the gradient loaded; `diff(i)` is
/// `y_i - y_ref`.
#[inline(always)]
fn later_wsum<M: Mode, const N: usize>(wsum: &mut f32, c: &Coef, w: &[f32; N], n: usize, diff: impl Fn(usize) -> f32) {
    if M::WSMOOTH && c.wsum_later {
        for i in 0..n {
            *wsum = prim::fma(w[i], diff(i), *wsum);
        }
    }
}

/// The soft cap's gradient of one element from its softmax `p`, `t = tanh(x / cap)` and its
/// class's smoothing weight `w` ([`smoothing_weights`]): `(p·a - w·k)·(1 - t²)` ([`capped_label`]
/// adds the label's `-b·(1 - t²)`).
#[inline(always)]
fn capped_term(p: f32, t: f32, w: f32, c: &Coef) -> f32 {
    prim::fma(p, c.a, -(w * c.k)) * prim::fma(-t, t, 1.0)
}

/// The class weights of columns `col..col + n` from the f32 weights at `base` (`n` at most `N`),
/// in 16-byte loads where `n` is 4 or 8 and the first is 16-byte aligned (the columns of one
/// row's vectors share their alignment, so a warp takes one path), else one at a time. The rest
/// of the array is 0.
#[inline(always)]
unsafe fn class_weights<const N: usize>(base: u64, col: u32, n: usize) -> [f32; N] {
    let at = base + 4 * col as u64;
    let mut w = [0.0f32; N];
    if N >= 4 && (n == 4 || (N >= 8 && n == 8)) && at % 16 == 0 {
        let lo = unsafe { prim::ld_global_v4(at) };
        for i in 0..4 {
            w[i] = f32::from_bits(lo[i]);
        }
        if n == 8 {
            let hi = unsafe { prim::ld_global_v4(at + 16) };
            for i in 0..4 {
                w[4 + i] = f32::from_bits(hi[i]);
            }
        }
    } else {
        for i in 0..n {
            w[i] = f32::from_bits(unsafe { prim::ld_global_u32(at + 4 * i as u64) });
        }
    }
    w
}

/// The smoothing term's weights of elements `first..first + n` of the segment whose class 0 is
/// `c.col0`: their class weights where `M::WSMOOTH` and the row smooths with class weights
/// (`c.weight`), in vector loads ([`class_weights`]); else all 1 (constants the multiplies fold
/// away).
#[inline(always)]
unsafe fn smoothing_weights<M: Mode, const N: usize>(c: &Coef, first: u32, n: usize) -> [f32; N] {
    if M::WSMOOTH && c.weight != 0 {
        unsafe { class_weights::<N>(c.weight, c.col0 + first, n) }
    } else {
        [1.0; N]
    }
}

/// Label smoothing's share of a summary from the capped values `y[..n]` of columns `col, col +
/// 1, ...`: `Σ (y_i - y_ref)`, each term times its class weight where `M::WSMOOTH` and there are
/// class weights.
#[inline(always)]
pub unsafe fn smoothing_sum<M: Mode, const N: usize>(o: &OptParams, y: &[f32; N], n: usize, col: u32, y_ref: f32) -> f32 {
    if M::WSMOOTH && o.weight != 0 {
        let w = unsafe { class_weights::<N>(o.weight, col, n) };
        let mut s = 0.0;
        for i in 0..n {
            s = prim::fma(w[i], y[i] - y_ref, s);
        }
        s
    } else {
        prim::fma(-(n as f32), y_ref, reduce::sum_of(y, n))
    }
}

/// Subtracts `b·(1 - t²)` from the label's element of `g` (elements `first, first + 1, ...`),
/// if the label is among them: one compare per vector.
#[inline(always)]
fn capped_label<const N: usize>(g: &mut [f32; N], t: &[f32; N], n: usize, first: u32, label: u32, c: &Coef) {
    if label.wrapping_sub(first) < n as u32 {
        for i in 0..n {
            if first + i as u32 == label {
                g[i] -= c.b * prim::fma(-t[i], t[i], 1.0);
            }
        }
    }
}

/// The largest soft cap whose capped logits the per-row kernels sum against the fixed reference
/// `cap` ([`Lse2::add_fixed`](crate::reduce::Lse2::add_fixed)) instead of a running maximum:
/// every term `e^(y - cap)` is at least `e^(-2·cap)`, a normal f32 (not flushed) up to a cap of 43.6.
pub const FIXED_CAP_MAX: f32 = 40.0;

/// The class weight of column `col` (1 without weights).
#[inline(always)]
pub unsafe fn class_weight(o: &OptParams, col: u32) -> f32 {
    if o.weight != 0 { f32::from_bits(unsafe { prim::ld_global_u32(o.weight + 4 * col as u64) }) } else { 1.0 }
}

/// Whether `x[..n]` (columns `first, first + 1, ...`) beat the label's logit `ctx.x_label` for
/// the argmax (`torch.argmax`: the first maximal value, a NaN counting as the maximum): before
/// the label's column a tie or a NaN beats it, after it a larger value, or a NaN unless the label's
/// logit is NaN too. Returns a count that is 0 exactly when none does (the row is correct when
/// the counts of all its vectors sum to 0): a vector wholly on one side of the label compares
/// only its NaN-propagating maximum, one compare instead of one per element; only the vector
/// holding the label compares element by element.
#[inline(always)]
pub fn beats_label<const N: usize>(ctx: &RowCtx, x: &[f32; N], n: usize, first: u32) -> u32 {
    beats_label_given_max(ctx, x, n, first, max_nan_of(x, n))
}

/// The NaN-propagating maximum of `x[..n]` (a tree for 8).
#[inline(always)]
pub fn max_nan_of<const N: usize>(x: &[f32; N], n: usize) -> f32 {
    if N == 8 && n == 8 {
        let a = prim::max_nan(prim::max_nan(x[0], x[1]), prim::max_nan(x[2], x[3]));
        let b = prim::max_nan(prim::max_nan(x[4], x[5]), prim::max_nan(x[6], x[7]));
        prim::max_nan(a, b)
    } else {
        let mut m = x[0];
        for &v in &x[1..n] {
            m = prim::max_nan(m, v);
        }
        m
    }
}

/// [`beats_label`] with the vector's NaN-propagating maximum `m` ([`max_nan_of`]) given.
#[inline(always)]
pub fn beats_label_given_max<const N: usize>(ctx: &RowCtx, x: &[f32; N], n: usize, first: u32, m: f32) -> u32 {
    let xl = ctx.x_label;
    let end = first + n as u32;
    if end <= ctx.label || first > ctx.label {
        let beats = if end <= ctx.label {
            // `!(m < xl)`: some element is at least `xl`, or NaN (then `m` is NaN).
            if xl.is_nan() { m.is_nan() } else { !(m < xl) }
        } else {
            !xl.is_nan() && !(m <= xl)
        };
        return beats as u32;
    }
    // The vector holding the label (column `first + k`): branch-free over a constant trip count,
    // so that LLVM unrolls it and `x` stays in registers (a rolled loop put it on the stack).
    let k = ctx.label - first;
    let xl_is_nan = xl.is_nan();
    let mut count = 0u32;
    for i in 0..N {
        let v = x[i];
        let before = (i as u32) < k && (v >= xl || v.is_nan());
        let after = (i as u32) > k && (v > xl || (v.is_nan() && !xl_is_nan));
        count += ((before || after) && i < n) as u32;
    }
    count
}

/// Phase one of `Full` for elements `x[..n]` at columns `first, first + 1, ...`: counts those
/// that beat the label for the argmax (`torch.argmax`: the first maximal value, a NaN counting as
/// the maximum), adds `Σ w_j·y_j`, and returns the capped values `y` for the log-sum-exp.
#[inline(always)]
pub unsafe fn observe<const N: usize>(
    o: &OptParams,
    ctx: &RowCtx,
    x: [f32; N],
    n: usize,
    first: u32,
    part: &mut Part,
) -> [f32; N] {
    if o.row_correct != 0 {
        part.wrong += beats_label(ctx, &x, n, first);
    }
    let mut y = x;
    if o.softcap > 0.0 {
        let inv = 1.0 / o.softcap;
        for i in 0..n {
            y[i] = o.softcap * tanh(x[i] * inv);
        }
    }
    if o.label_smoothing != 0.0 {
        for i in 0..n {
            part.wsum += unsafe { class_weight(o, first + i as u32) } * (y[i] - ctx.y_ref);
        }
    }
    y
}

/// The per-row constants of the gradient (see the module doc).
#[derive(Clone, Copy)]
pub struct Coef {
    /// The row's log-sum-exp in log2 units.
    pub lse2: f32,
    pub a: f32,
    pub b: f32,
    pub k: f32,
    /// Column of the segment's element 0 (`Full`).
    pub col0: u32,
    /// `1 / cap` (`RowCap` only; 0 otherwise).
    pub inv_cap: f32,
    /// In the plain kernels, and with the soft cap and no smoothing term (`k = 0`), where `a` is
    /// positive and finite ([`fold_a`]): `lse2 - log2(a)`, so that `p·a` is one `ex2`
    /// ([`grad_values_folded`], [`grad_capped_poly`]); NaN otherwise.
    pub lse2_a: f32,
    /// The class weights' address where the smoothing term is weighted per class in the
    /// batched loops (`M::WSMOOTH`, smoothing and class weights on); 0 otherwise.
    pub weight: u64,
    /// The cluster kernel's gradient pass with class-weighted smoothing (`weight` set): it reads
    /// each class weight for the gradient anyway, so it also sums the loss's
    /// `Σ w_j·(y_j - y_ref)` ([`RowCtx::y_ref`] in `y_ref`, `y = cap·t` with the soft cap `cap`),
    /// and the first pass reads no weight at all ([`grad_values_summing`], [`grad_from_t`]).
    pub wsum_later: bool,
    pub y_ref: f32,
    pub cap: f32,
    /// The two-phase backward of a differentiable entropy (`Full` only; 0 otherwise): the row's
    /// upstream gradient of its entropy `H`, and `lse - H` (natural units), so that the
    /// element's gradient gains `p·ent·(ent_ref - y)` ([`grad_values_summing`]).
    pub ent: f32,
    pub ent_ref: f32,
}

/// A small call's valid and out-of-range row counts in one word of shared memory (each at most
/// 1024, the most threads a block has: see `plan::self_finish`).
#[inline(always)]
pub fn pack_counts(valid: u32, bad: u32) -> u32 {
    valid | (bad << 16)
}

/// The (valid, out-of-range) counts of [`pack_counts`]' word.
#[inline(always)]
pub fn unpack_counts(word: u32) -> (u32, u32) {
    (word & 0xffff, word >> 16)
}

/// The count of valid rows, and the mean's divisor of the cross-entropy part.
#[inline(always)]
unsafe fn divisors(p: &XentParams) -> (f32, f32) {
    // A small call's CTA counted the labels itself (`XentParams::self_finish`): its two words.
    let (valid, weight_bits) = unsafe {
        if p.self_finish != 0 {
            let at = prim::smem_base() + SMEM_COUNTS;
            (unpack_counts(prim::ld_shared_u32(at)).0, prim::ld_shared_u32(at + 4))
        } else {
            let word = |i: usize| prim::ld_global_u32(p.counts + 4 * i as u64);
            (word(COUNT_VALID), word(COUNT_WEIGHT))
        }
    };
    let n_valid = valid as f32;
    let total_weight = if p.opts.weight != 0 { f32::from_bits(weight_bits) } else { n_valid };
    (n_valid, total_weight)
}

/// `Σ_j weight[j]` over the vocabulary (the count kernel's sum with class weights), `vocab`
/// without them.
#[inline(always)]
unsafe fn class_weight_sum(p: &XentParams) -> f32 {
    if p.opts.weight != 0 {
        let at = p.counts + 4 * COUNT_CLASS_WEIGHT_SUM as u64;
        f32::from_bits(unsafe { prim::ld_global_u32(at) })
    } else {
        p.rows.vocab as f32
    }
}

/// `a / b`, through f64 in the kernels of [`Mode::F64_DIVISION`] (the same bits).
#[inline(always)]
pub(crate) fn div<M: Mode>(a: f32, b: f32) -> f32 {
    if M::F64_DIVISION { prim::div_rn_f64(a, b) } else { a / b }
}

/// `1 / a`, through f64 in the kernels of [`Mode::F64_DIVISION`] (the same bits).
#[inline(always)]
pub(crate) fn recip<M: Mode>(a: f32) -> f32 {
    if M::F64_DIVISION { prim::rcp_rn_f64(a) } else { 1.0 / a }
}

/// The gradient's constants for a row of class `label` whose summary is `row`.
#[inline(always)]
pub unsafe fn coef<M: Mode>(p: &XentParams, row: &Part, label: u32, col0: u32) -> Coef {
    let lse2 = row.lse.value();
    let mean = p.reduction == REDUCTION_MEAN;
    if !M::OPTS {
        let scale = if mean { p.grad_scale / unsafe { divisors(p) }.0 } else { p.grad_scale };
        let (wsum_later, y_ref, cap, lse2_a) = (false, 0.0, 0.0, fold_a(lse2, scale));
        return Coef { lse2, a: scale, b: scale, k: 0.0, col0, inv_cap: 0.0, lse2_a, weight: 0, wsum_later, y_ref, cap, ent: 0.0, ent_ref: 0.0 };
    }
    let o = &p.opts;
    let (ce_scale, z_scale) = if mean {
        let (n_valid, total_weight) = unsafe { divisors(p) };
        (div::<M>(p.grad_scale, total_weight), div::<M>(p.grad_scale, n_valid))
    } else {
        (p.grad_scale, p.grad_scale)
    };
    let eps = o.label_smoothing;
    let b = (1.0 - eps) * unsafe { class_weight(o, label) } * ce_scale;
    let k = div::<M>(eps, p.rows.vocab as f32) * ce_scale;
    let mut a = if eps != 0.0 { prim::fma(unsafe { class_weight_sum(p) }, k, b) } else { b };
    if o.lse_square_scale != 0.0 {
        a = prim::fma(2.0 * o.lse_square_scale * z_scale, lse2 * LN_2, a);
    }
    let inv_cap = if M::CAP { recip::<M>(o.softcap) } else { 0.0 };
    let weight = if M::WSMOOTH && eps != 0.0 { o.weight } else { 0 };
    let lse2_a = if M::CAP && k == 0.0 { fold_a(lse2, a) } else { f32::NAN };
    let cap = if M::WSMOOTH { o.softcap } else { 0.0 };
    Coef { lse2, a, b, k, col0, inv_cap, lse2_a, weight, wsum_later: false, y_ref: 0.0, cap, ent: 0.0, ent_ref: 0.0 }
}

/// The parts of [`coef`] that are the same for every row of a call, each an IEEE division whose
/// slow path is a subroutine call: the cross-entropy part's scale (`ce`: the mean's division by
/// the valid count or total weight), the z-loss's (`z`) and the smoothing's `k`. The plain, per-row
/// constant and token accuracy cluster kernels take them before their chunk's loads
/// ([`EarlyScales::take`], then [`coef_early`]) rather than after the row's merge: 0.4-2.4 points
/// of copy bandwidth at the 16-bit shapes (H200, session 33, `bench/NOTES.md`). The soft cap's
/// kernels lost 0.2-2.2 doing the same (their scales spilled), so they keep [`coef`].
#[derive(Clone, Copy)]
pub struct CallScales {
    ce: f32,
    z: f32,
    k: f32,
}

impl CallScales {
    /// The call's scales, as [`coef`] computes them (the counts must be ready: the count
    /// kernel's, or with `self_finish` this CTA's, after a barrier), computed here
    /// ([`prim::here`]: LLVM would sink them to their use).
    #[inline(always)]
    pub unsafe fn now<M: Mode>(p: &XentParams) -> CallScales {
        let mean = p.reduction == REDUCTION_MEAN;
        let (ce, z) = if mean {
            let (n_valid, total_weight) = unsafe { divisors(p) };
            if M::OPTS { (p.grad_scale / total_weight, p.grad_scale / n_valid) } else { (p.grad_scale / n_valid, 0.0) }
        } else {
            (p.grad_scale, p.grad_scale)
        };
        let k = if M::OPTS { p.opts.label_smoothing / p.rows.vocab as f32 * ce } else { 0.0 };
        CallScales { ce: prim::here(ce), z: prim::here(z), k: prim::here(k) }
    }
}

/// The cluster kernel's [`Mode::Early`]: the call's scales it takes at its start, and the row's
/// constants from them.
pub trait EarlyScales: Copy {
    /// The scales (a small call's CTA waits at a barrier for its own counts first).
    unsafe fn take<M: Mode>(p: &XentParams) -> Self;
    /// [`coef`] with these scales.
    unsafe fn coef<M: Mode>(self, p: &XentParams, row: &Part, label: u32, col0: u32) -> Coef;
}

impl EarlyScales for () {
    #[inline(always)]
    unsafe fn take<M: Mode>(_: &XentParams) {}

    #[inline(always)]
    unsafe fn coef<M: Mode>(self, p: &XentParams, row: &Part, label: u32, col0: u32) -> Coef {
        unsafe { coef::<M>(p, row, label, col0) }
    }
}

impl EarlyScales for CallScales {
    #[inline(always)]
    unsafe fn take<M: Mode>(p: &XentParams) -> CallScales {
        if p.self_finish != 0 {
            prim::sync_threads();
        }
        unsafe { CallScales::now::<M>(p) }
    }

    #[inline(always)]
    unsafe fn coef<M: Mode>(self, p: &XentParams, row: &Part, label: u32, col0: u32) -> Coef {
        unsafe { coef_early::<M>(p, row, label, col0, self) }
    }
}

/// [`coef`] with the call's scales taken already, for the modes without the soft cap, the
/// class-weighted smoothing or `Full` (whose extra constants it leaves off): the same values.
/// Not `coef` itself written over it: that changed the code of every kernel calling `coef`, and
/// took the `capacc_` kernels' spills from 48 to 152 bytes.
#[inline(always)]
pub unsafe fn coef_early<M: Mode>(p: &XentParams, row: &Part, label: u32, col0: u32, s: CallScales) -> Coef {
    let lse2 = row.lse.value();
    let (wsum_later, y_ref, inv_cap, weight, cap) = (false, 0.0, 0.0, 0, 0.0);
    if !M::OPTS {
        let (scale, lse2_a) = (s.ce, fold_a(lse2, s.ce));
        return Coef { lse2, a: scale, b: scale, k: 0.0, col0, inv_cap, lse2_a, weight, wsum_later, y_ref, cap, ent: 0.0, ent_ref: 0.0 };
    }
    let o = &p.opts;
    let eps = o.label_smoothing;
    let b = (1.0 - eps) * unsafe { class_weight(o, label) } * s.ce;
    let mut a = if eps != 0.0 { prim::fma(unsafe { class_weight_sum(p) }, s.k, b) } else { b };
    if o.lse_square_scale != 0.0 {
        a = prim::fma(2.0 * o.lse_square_scale * s.z, lse2 * LN_2, a);
    }
    Coef { lse2, a, b, k: s.k, col0, inv_cap, lse2_a: f32::NAN, weight, wsum_later, y_ref, cap, ent: 0.0, ent_ref: 0.0 }
}

impl Coef {
    /// The gradient times `factor` (the two-phase backward's upstream gradient), with
    /// [`lse2_a`](Self::lse2_a) folded again where [`coef`] folded it.
    #[inline(always)]
    pub fn scale<M: Mode>(&mut self, factor: f32) {
        self.a *= factor;
        self.b *= factor;
        self.k *= factor;
        if !self.lse2_a.is_nan() || !M::OPTS {
            self.lse2_a = fold_a(self.lse2, self.a);
        }
    }
}

/// [`Coef::lse2_a`] of a row whose log-sum-exp is `lse2` (log2 units) and whose gradient scale is
/// `a`: `lse2 - log2(a)` where `a` is a positive normal finite number, NaN otherwise (a negative
/// or zero scale, which the exponent cannot carry).
#[inline(always)]
pub fn fold_a(lse2: f32, a: f32) -> f32 {
    if a >= f32::MIN_POSITIVE && a < f32::INFINITY { lse2 - prim::lg2(a) } else { f32::NAN }
}

/// `lse - y` for a value `y` of the row summarised by `row` (`m`, the largest `y·log2(e)` rounded,
/// and `s`, the sum of `2^(y_j·log2(e) - m)`): `(m - y·log2(e)) + log2(s)`, the first term with one
/// rounding (an FMA), so that the error scales with the difference rather than with the logits'
/// magnitude (at logits near 12345, `lse - y` in f32 would lose 1e-3 of it).
#[inline(always)]
fn lse_minus(row: &Part, y: f32) -> f32 {
    (prim::fma(-y, LOG2_E, row.lse.m) + prim::lg2(row.lse.s)) * LN_2
}

/// [`lse_minus`] in f64 from `s`'s exponent and `lg2` of its mantissa, for the soft cap's fixed
/// reference ([`FIXED_CAP_MAX`]): there `m` is `cap·log2(e)`, not the row's maximum, and both
/// `m - y·log2(e)` and `log2(s)` reach `2·cap·log2(e)`, whose f32 rounding (2e-6) the loss would
/// keep. A NaN or zero `s` takes [`lse_minus`].
#[inline(always)]
fn lse_minus_wide(row: &Part, y: f32) -> f32 {
    let s = row.lse.s;
    if !(s > 0.0) || s == f32::INFINITY {
        return lse_minus(row, y);
    }
    // `s` is normal: every term is (flush-to-zero arithmetic keeps no subnormal).
    let bits = s.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let log2_s = exponent as f64 + prim::lg2(mantissa) as f64;
    let diff = row.lse.m as f64 - y as f64 * core::f64::consts::LOG2_E;
    ((diff + log2_s) * core::f64::consts::LN_2) as f32
}

/// The row's loss (natural log-sum-exp `lse`; `x_label` as given; `y_ref` the smoothing sum's
/// reference, see [`RowCtx::y_ref`]).
#[inline(always)]
pub unsafe fn row_loss<M: Mode>(p: &XentParams, row: &Part, label: u32, x_label: f32, y_ref: f32, lse: f32) -> f32 {
    if !M::OPTS {
        return lse_minus(row, x_label);
    }
    let o = &p.opts;
    let y_label = if o.softcap > 0.0 { o.softcap * tanh(x_label * recip::<M>(o.softcap)) } else { x_label };
    let minus = |y: f32| if M::CAP { lse_minus_wide(row, y) } else { lse_minus(row, y) };
    let eps = o.label_smoothing;
    let mut loss = (1.0 - eps) * unsafe { class_weight(o, label) } * minus(y_label);
    if eps != 0.0 {
        // Σ_j w_j·(lse - y_j) = W·(lse - y_ref) - Σ_j w_j·(y_j - y_ref): both terms small.
        loss += div::<M>(eps, p.rows.vocab as f32) * (unsafe { class_weight_sum(p) } * minus(y_ref) - row.wsum);
    }
    if o.lse_square_scale != 0.0 {
        loss += o.lse_square_scale * lse * lse;
    }
    loss
}

/// Gradient of `x[..n]`, the elements `first, first + 1, ...` of a segment whose label is at
/// index `label` (any value outside the segment when it lies elsewhere).
#[inline(always)]
pub unsafe fn grad_values<M: Mode, const N: usize>(
    o: &OptParams,
    x: [f32; N],
    n: usize,
    first: u32,
    label: u32,
    c: &Coef,
) -> [f32; N] {
    unsafe { grad_values_summing::<M, N>(o, x, n, first, label, c, &mut 0.0) }
}

/// [`grad_values`], adding the elements' share of the smoothing sum to `wsum` where the gradient
/// pass takes it ([`Coef::wsum_later`]).
#[inline(always)]
pub unsafe fn grad_values_summing<M: Mode, const N: usize>(
    o: &OptParams,
    x: [f32; N],
    n: usize,
    first: u32,
    label: u32,
    c: &Coef,
    wsum: &mut f32,
) -> [f32; N] {
    if M::FULL {
        // One element at a time, the whole chain fused, so nothing but the result is indexed.
        let one = |i: usize, xi: f32| -> f32 {
            let (y, dy) = if o.softcap > 0.0 {
                let t = tanh(xi * (1.0 / o.softcap));
                (o.softcap * t, prim::fma(-t, t, 1.0))
            } else {
                (xi, 1.0)
            };
            let p = prim::ex2(prim::fma(y, LOG2_E, -c.lse2));
            let mut g = p * c.a;
            // The entropy's gradient `p·(lse - H - y)` (0 where `p` is: `y = -inf` would make
            // the product NaN).
            if c.ent != 0.0 && p != 0.0 {
                g = prim::fma(p * c.ent, c.ent_ref - y, g);
            }
            if c.k != 0.0 {
                let w = unsafe { class_weight(o, c.col0 + first + i as u32) };
                g = prim::fma(-w, c.k, g);
            }
            if first + i as u32 == label {
                g -= c.b;
            }
            g * dy
        };
        let mut g = [0.0; N];
        if N == 8 && n == 8 {
            // Spelled out: LLVM leaves a loop this heavy rolled, which would put `g` on the stack.
            g[0] = one(0, x[0]);
            g[1] = one(1, x[1]);
            g[2] = one(2, x[2]);
            g[3] = one(3, x[3]);
            g[4] = one(4, x[4]);
            g[5] = one(5, x[5]);
            g[6] = one(6, x[6]);
            g[7] = one(7, x[7]);
        } else {
            for i in 0..n {
                g[i] = one(i, x[i]);
            }
        }
        return g;
    }
    if M::CAP {
        return grad_capped::<M, N>(capped(o.softcap, c.inv_cap, &x, n), n, first, label, c, wsum);
    }
    let mut g = [0.0; N];
    let w = unsafe { smoothing_weights::<M, N>(c, first, n) };
    for i in 0..n {
        let p = prim::ex2(prim::fma(x[i], LOG2_E, -c.lse2));
        // `RowConst`: the unweighted smoothing's `-k` (0 otherwise); `RowWSmooth`: `-w_i·k`.
        g[i] = if M::OPTS { prim::fma(p, c.a, -(w[i] * c.k)) } else { p * c.a };
    }
    later_wsum::<M, N>(wsum, c, &w, n, |i| x[i] - c.y_ref);
    label_term(&mut g, n, first, label, c);
    g
}

/// [`grad_values`] of a plain kernel (`!M::OPTS`) whose scale is folded into the exponent
/// ([`Coef::lse2_a`] not NaN): `p·a` is one `ex2`, a multiply fewer an element.
#[inline(always)]
pub fn grad_values_folded<const N: usize>(x: [f32; N], n: usize, first: u32, label: u32, c: &Coef) -> [f32; N] {
    let mut g = [0.0; N];
    for i in 0..n {
        g[i] = prim::ex2(prim::fma(x[i], LOG2_E, -c.lse2_a));
    }
    label_term(&mut g, n, first, label, c);
    g
}

/// The label's `-b` in `g[..n]` (elements `first..`).
#[inline(always)]
fn label_term<const N: usize>(g: &mut [f32; N], n: usize, first: u32, label: u32, c: &Coef) {
    // One compare per vector; the per-element search runs only in the vector holding the label.
    if label.wrapping_sub(first) < n as u32 {
        for i in 0..n {
            if first + i as u32 == label {
                g[i] -= c.b;
            }
        }
    }
}

/// The soft cap's gradient of the capped values `y[..n]` (as [`grad_values`]), with
/// `p = 2^(y·log2(e) - lse2)` and `t = y / cap` (see [`capped_term`]).
#[inline(always)]
pub fn grad_capped<M: Mode, const N: usize>(
    y: [f32; N],
    n: usize,
    first: u32,
    label: u32,
    c: &Coef,
    wsum: &mut f32,
) -> [f32; N] {
    let (mut g, mut t) = ([0.0; N], [0.0; N]);
    let w = unsafe { smoothing_weights::<M, N>(c, first, n) };
    for i in 0..n {
        let p = prim::ex2(prim::fma(y[i], LOG2_E, -c.lse2));
        t[i] = y[i] * c.inv_cap;
        g[i] = capped_term(p, t[i], w[i], c);
    }
    later_wsum::<M, N>(wsum, c, &w, n, |i| y[i] - c.y_ref);
    capped_label(&mut g, &t, n, first, label, c);
    g
}
