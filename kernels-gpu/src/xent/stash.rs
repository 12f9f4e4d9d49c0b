//! The passes over a chunk kept in shared memory, one vector at a time: the cluster kernels'
//! and the sm_80 split kernels'.

use super::*;

/// Adds vector `x` (starting at element `start` of `seg`) to this thread's summary. With `FIXED`
/// (the soft cap, at most [`opts::FIXED_CAP_MAX`]) the capped values are summed against the fixed
/// reference `acc.lse.m = cap·log2(e)` ([`reduce::Lse2::add_fixed`]: no maximum, no rescaling),
/// and `widest` keeps the largest `x²` seen. Returns `t = tanh(x / cap)` with the soft cap (`x`
/// otherwise); with `FIXED`, no smoothing and no `need_t` (the caller keeps `x`, not `t`), a
/// vector that takes the polynomial skips `t` and returns `x`.
#[inline(always)]
pub(crate) unsafe fn add_vector<M: Mode, const FIXED: bool>(
    acc: &mut Part,
    widest: &mut f32,
    x: [f32; 8],
    n: usize,
    start: u32,
    o: &OptParams,
    ctx: &RowCtx,
    need_t: bool,
) -> [f32; 8] {
    if M::CAP && FIXED {
        if M::ACCURACY && o.row_correct != 0 {
            // The argmax of the logits as given (`tanh` keeps their order, not their ties).
            acc.wrong += opts::beats_label(ctx, &x, n, ctx.col0 + start);
        }
        // `t = x·P(x²)` with the shortest polynomial that holds for every element of the vector,
        // past the shorter one the same for every lane of the warp that got that far (a vote, so
        // they do not run two polynomials one after the other): the cubic, or the wide one with
        // `tanh` itself for the elements beyond it, or, without the wide one, `tanh` element by
        // element. NaNs are ignored by the maximum and stay NaN through the polynomial.
        let mut x2 = [0.0f32; 8];
        let mut w = 0.0f32;
        for i in 0..n {
            x2[i] = x[i] * x[i];
            w = w.max(x2[i]);
        }
        *widest = widest.max(w);
        // The shorter polynomial is chosen lane by lane, without the vote's cost: where it holds
        // for one lane it usually does for all (the benchmark's logits); the vote only runs past it.
        let tier = if w < o.short_x2_max {
            POLY_SHORT
        } else if prim::warp_all(w < o.poly_x2_max) {
            POLY_LONG
        } else if o.wide_x2_max > 0.0 {
            POLY_WIDE
        } else {
            POLY_NONE
        };
        // Elements of this lane's vector beyond the wide polynomial.
        let beyond = tier == POLY_WIDE && !(w < o.wide_x2_max);
        if tier != POLY_NONE && !need_t && (o.label_smoothing == 0.0 || (M::WSMOOTH && ctx.wsum_later)) {
            // The exponent `cap·log2(e)·(t - 1)` in one FMA from `x`, without `t`.
            let mut e = [0.0f32; 8];
            let m = acc.lse.m;
            if tier == POLY_SHORT {
                for i in 0..n {
                    e[i] = prim::ex2(prim::fma(x[i], opts::horner(&o.exp_short, x2[i]), -m));
                }
            } else if tier == POLY_LONG {
                for i in 0..n {
                    e[i] = prim::ex2(prim::fma(x[i], opts::horner(&o.exp_poly, x2[i]), -m));
                }
            } else {
                for i in 0..n {
                    e[i] = prim::ex2(prim::fma(x[i], opts::horner(&o.exp_wide, x2[i]), -m));
                }
                if beyond {
                    crate::each_past!(x, x2, n, o.wide_x2_max, ctx.inv_cap, |i, t| {
                        e[i] = prim::ex2(prim::fma(t, m, -m))
                    });
                }
            }
            acc.lse.s += reduce::sum_of(&e, n);
            return x;
        }
        let mut t = [0.0f32; 8];
        if tier == POLY_SHORT || tier == POLY_LONG {
            for i in 0..n {
                t[i] = x[i] * opts::horner(&o.tanh_poly, x2[i]);
            }
        } else if tier == POLY_WIDE {
            for i in 0..n {
                t[i] = x[i] * opts::horner(&o.tanh_wide, x2[i]);
            }
            if beyond {
                crate::each_past!(x, x2, n, o.wide_x2_max, ctx.inv_cap, |i, ti| t[i] = ti);
            }
        } else {
            for i in 0..n {
                t[i] = opts::tanh(x[i] * ctx.inv_cap);
            }
        }
        if o.label_smoothing != 0.0 && !(M::WSMOOTH && ctx.wsum_later) {
            acc.wsum += if M::WSMOOTH && o.weight != 0 {
                let mut y = [0.0f32; 8];
                for i in 0..n {
                    y[i] = o.softcap * t[i];
                }
                unsafe { opts::smoothing_sum::<M, 8>(o, &y, n, ctx.col0 + start, ctx.y_ref) }
            } else {
                // Σ y = cap·Σ t.
                prim::fma(-(n as f32), ctx.y_ref, o.softcap * reduce::sum_of(&t, n))
            };
        }
        acc.lse.add_fixed(&t, n, acc.lse.m);
        return t;
    }
    let y = if M::FULL {
        unsafe { opts::observe(o, ctx, x, n, ctx.col0 + start, acc) }
    } else {
        let y = if M::CAP { opts::capped(o.softcap, ctx.inv_cap, &x, n) } else { x };
        if M::OPTS && (o.label_smoothing != 0.0 || M::SMOOTHING_PATH) && !(M::WSMOOTH && ctx.wsum_later) {
            acc.wsum += unsafe { opts::smoothing_sum::<M, 8>(o, &y, n, ctx.col0 + start, ctx.y_ref) };
        }
        if M::ACCURACY && !M::CAP && o.row_correct != 0 && n == 8 {
            // One NaN-propagating maximum for both the compare and the sum.
            let mx = opts::max_nan_of(&x, n);
            acc.wrong += opts::beats_label_given_max(ctx, &x, n, ctx.col0 + start, mx);
            acc.lse.add_given_max(&x, n, mx);
            return x;
        }
        if M::ACCURACY && o.row_correct != 0 {
            acc.wrong += opts::beats_label(ctx, &x, n, ctx.col0 + start);
        }
        y
    };
    acc.lse.add(&y, n);
    if M::CAP {
        let mut t = [0.0; 8];
        for i in 0..n {
            t[i] = y[i] * ctx.inv_cap;
        }
        t
    } else {
        y
    }
}

/// Which polynomial the soft cap's `t = tanh(x / cap)` comes from: `add_vector`'s choice for a
/// vector (past `POLY_SHORT`, one for the warp) and `grad_from_stash`'s for a thread (the widest
/// its warp needed in the first pass). `POLY_SHORT`: `OptParams::tanh_short` (in `add_vector`
/// its exponent form only; `t` from `tanh_poly`); `POLY_LONG`: `tanh_poly`; `POLY_WIDE`:
/// `tanh_wide` (in `add_vector` with `tanh` itself for a lane's elements beyond it);
/// `POLY_NONE`: `tanh` element by element; `POLY_WIDE_FIX` (`grad_from_stash` only): `tanh_wide`
/// with a check a vector for elements beyond it.
pub(crate) const POLY_SHORT: u8 = 0;
pub(crate) const POLY_LONG: u8 = 1;
pub(crate) const POLY_WIDE: u8 = 2;
pub(crate) const POLY_NONE: u8 = 3;
pub(crate) const POLY_WIDE_FIX: u8 = 4;

/// Whether the cluster kernel keeps the soft cap's `t = tanh(x / cap)` instead of `x` (f32 only:
/// the same size, so it is written over `x` in registers and shared memory, and the gradient pass
/// does not compute `tanh` again).
#[inline(always)]
pub(crate) fn keeps_t<T: Element, M: Mode>() -> bool {
    M::CAP && T::BYTES == 4
}

/// [`bulk_load_and_reduce`]'s first pass over the stashed vector `v` at shared address `at`
/// (with `keep_t`, `t` written back in its place).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn first_pass_stashed<T: Element, M: Mode, const FIXED: bool>(
    acc: &mut Part,
    widest: &mut f32,
    seg: &Segment,
    at: u32,
    v: u32,
    o: &OptParams,
    ctx: &RowCtx,
    keep_t: bool,
) {
    let x = T::unpack(unsafe { prim::ld_shared_v4(at) });
    let t = unsafe { add_vector::<M, FIXED>(acc, widest, x, T::VEC, seg.vec_start::<T>(v), o, ctx, keep_t) };
    if keep_t {
        // This thread's own vector: no other thread reads it before the gradient pass.
        unsafe { prim::st_shared_v4(at, T::pack(&t)) };
    }
}

/// [`grad_from_stash`]'s gradient of one vector `x` (starting at element `start`).
#[inline(always)]
pub(crate) unsafe fn grad_vector<T: Element, M: Mode, const POLY: u8>(
    x: [f32; 8],
    start: u32,
    label: u32,
    o: &OptParams,
    c: &Coef,
    cap_log2e: f32,
    wsum: &mut f32,
) -> [f32; 8] {
    if keeps_t::<T, M>() {
        opts::grad_from_t::<M, 8>(x, T::VEC, start, label, c, cap_log2e, wsum)
    } else if M::CAP && POLY == POLY_SHORT {
        opts::grad_capped_poly::<M, 8, 4, false>(x, T::VEC, start, label, c, cap_log2e, &o.tanh_short, 0.0, wsum)
    } else if M::CAP && POLY == POLY_LONG {
        opts::grad_capped_poly::<M, 8, 5, false>(x, T::VEC, start, label, c, cap_log2e, &o.tanh_poly, 0.0, wsum)
    } else if M::CAP && POLY == POLY_WIDE {
        opts::grad_capped_poly::<M, 8, 8, false>(x, T::VEC, start, label, c, cap_log2e, &o.tanh_wide, 0.0, wsum)
    } else if M::CAP && POLY == POLY_WIDE_FIX {
        let (tanh, x2_max) = (&o.tanh_wide, o.wide_x2_max);
        opts::grad_capped_poly::<M, 8, 8, true>(x, T::VEC, start, label, c, cap_log2e, tanh, x2_max, wsum)
    } else {
        unsafe { opts::grad_values_summing::<M, 8>(o, x, T::VEC, start, label, c, wsum) }
    }
}
