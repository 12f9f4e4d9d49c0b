//! Cross-entropy. This module: label resolution, the passes over a row's segment that every plan
//! shares (reduce, gradient, outputs), the count kernel, and the end of a call (the kernel that
//! reduces per-row losses to the loss, and the small calls' finish in their last CTA). The plans'
//! kernels: `fused` (one CTA a row), `chunked` (a row's chunks reduced, then their gradient;
//! the two-phase backward), `cluster` and `small` (sm_90: a row over a cluster's CTAs, and small
//! calls ordered for latency), with `stash` the passes over a chunk kept in shared memory that
//! the cluster kernels and sm_80's split kernels ([`split`](crate::split)) share.
//!
//! Every row is computed as: lse = log(sum_j exp(x_j)), loss = lse - x_label, and
//! grad_j = (softmax_j - [j == label]) * scale, where scale = grad_scale / n_valid for the mean
//! and grad_scale otherwise; the `Full` mode (`opts`) adds the loss options. All arithmetic is
//! f32, in base 2 (`x * log2(e)` into `ex2`).

use crate::abi::{
    COUNT_BAD, COUNT_CLASS_WEIGHT_SUM, COUNT_DONE, COUNT_VALID, COUNT_WEIGHT, CountParams, FinishParams, MODE_FORWARD,
    OptParams, PARTIAL_WORDS, REDUCTION_MEAN, RowsParams, SMEM_COUNTS, SMEM_STASH_OFFSET, XentParams,
};
use crate::element::{Element, Label};
use crate::opts::{self, Coef, Mode, Part, RowCtx};
use crate::prim::{self, thread_idx};
use crate::reduce;
use core::f32::consts::LN_2;

/// Vectors each thread loads before it uses the first, to keep enough bytes in flight
/// (`plan::UNROLL` on the host sizes blocks so one batch covers a chunk). `unroll!` repeats its
/// body this many times.
pub(crate) const UNROLL: u32 = 8;

/// Repeats `$body` with `$u` bound to 0..8 (`UNROLL`), so arrays indexed by `$u` stay in
/// registers: LLVM does not fully unroll loops with bodies this large, and a loop index would
/// move the array to local memory.
macro_rules! unroll {
    ($u:ident => $body:block) => {{
        const _: () = assert!(UNROLL == 8);
        { let $u: u32 = 0; $body }
        { let $u: u32 = 1; $body }
        { let $u: u32 = 2; $body }
        { let $u: u32 = 3; $body }
        { let $u: u32 = 4; $body }
        { let $u: u32 = 5; $body }
        { let $u: u32 = 6; $body }
        { let $u: u32 = 7; $body }
    }};
}

/// `for k in 0..KEEP_MAX` over the kept vectors of mode `$m`. With token accuracy or the soft cap
/// it is spelled out (`$k` a `usize`), so the vectors are indexed by constants and stay in
/// registers: LLVM left the loop rolled in the `acc_` kernels, which put `Kept` on the stack (36
/// bytes of local memory, ptxas). The other modes keep the loop LLVM unrolls itself, so their PTX
/// (measured at 93% of copy) does not change.
#[cfg(xent_cluster)]
macro_rules! for_kept {
    ($m:ty, $k:ident => $body:block) => {{
        if <$m>::ACCURACY || <$m>::CAP {
            const _: () = assert!(KEEP_MAX == 2);
            { let $k: usize = 0; $body }
            { let $k: usize = 1; $body }
        } else {
            let mut $k = 0;
            while $k < KEEP_MAX {
                $body
                $k += 1;
            }
        }
    }};
}

/// `--cfg xent_trace` builds: `%globaltimer` into slot `k` of the cluster kernel's timeline
/// (`examples/small_trace.rs`); nothing otherwise.
#[cfg(xent_cluster)]
macro_rules! stamp {
    ($trace:ident[$k:expr]) => {
        #[cfg(xent_trace)]
        {
            $trace[$k] = prim::global_timer();
        }
    };
}

mod chunked;
#[cfg(xent_cluster)]
mod cluster;
mod fused;
#[cfg(xent_cluster)]
mod small;
mod stash;

pub use chunked::{backward, chunk_grad, chunk_partial};
#[cfg(xent_cluster)]
pub use cluster::cluster;
pub use fused::fused;
#[cfg(xent_cluster)]
pub use small::cluster_small;
pub(crate) use stash::{
    POLY_LONG, POLY_NONE, POLY_SHORT, POLY_WIDE, POLY_WIDE_FIX, add_vector, first_pass_stashed, grad_vector, keeps_t,
};

/// What a row is scored against.
#[derive(Clone, Copy, PartialEq)]
pub enum Target {
    /// The label is `ignore_index`, or the row is the last position of a sequence under the shift.
    Ignored,
    /// The label is neither `ignore_index` nor in `[0, vocab)`.
    Bad,
    Class(u32),
}

/// Resolves row `row`'s label, applying the causal shift when `seq_len > 0`.
#[inline(always)]
pub unsafe fn row_target<L: Label>(rows: &RowsParams, row: u64) -> Target {
    let index = if rows.seq_len > 0 {
        let seq_len = rows.seq_len as u64;
        if prim::div_rem(row, seq_len).1 == seq_len - 1 {
            return Target::Ignored;
        }
        row + 1
    } else {
        row
    };
    let label = unsafe { L::load(rows.labels, index) };
    if label == rows.ignore_index {
        Target::Ignored
    } else if label < 0 || label >= rows.vocab as i64 {
        Target::Bad
    } else {
        Target::Class(label as u32)
    }
}

/// [`Target::Ignored`] as one word ([`Target::code`]).
#[cfg(xent_cluster)]
const TARGET_IGNORED: u32 = u32::MAX;
/// [`Target::Bad`] as one word ([`Target::code`]).
#[cfg(xent_cluster)]
const TARGET_BAD: u32 = u32::MAX - 1;

#[cfg(xent_cluster)]
impl Target {
    /// The target as one word, for a shuffle: the class (below `vocab`, which the host keeps at
    /// most `u32::MAX / 2`), or one of two codes above every class.
    #[inline(always)]
    fn code(self) -> u32 {
        match self {
            Target::Ignored => TARGET_IGNORED,
            Target::Bad => TARGET_BAD,
            Target::Class(label) => label,
        }
    }

    /// The target [`code`](Self::code) stands for.
    #[inline(always)]
    fn from_code(code: u32) -> Target {
        match code {
            TARGET_IGNORED => Target::Ignored,
            TARGET_BAD => Target::Bad,
            label => Target::Class(label),
        }
    }
}

/// [`row_target`] in two steps, so a kernel can issue the label's load early and use it late:
/// the label as loaded, or `None` for the last position of a sequence under the causal shift
/// (ignored); [`classify_label`] then gives the target. (`row_target` keeps its own text: its
/// callers' code, in every kernel, stays as measured.)
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn load_label<L: Label>(rows: &RowsParams, row: u64) -> Option<i64> {
    let index = if rows.seq_len > 0 {
        let seq_len = rows.seq_len as u64;
        if prim::div_rem(row, seq_len).1 == seq_len - 1 {
            return None;
        }
        row + 1
    } else {
        row
    };
    Some(unsafe { L::load(rows.labels, index) })
}

/// The target of a label [`load_label`] loaded.
#[cfg(xent_cluster)]
#[inline(always)]
fn classify_label(rows: &RowsParams, label: Option<i64>) -> Target {
    match label {
        None => Target::Ignored,
        Some(label) if label == rows.ignore_index => Target::Ignored,
        Some(label) if label < 0 || label >= rows.vocab as i64 => Target::Bad,
        Some(label) => Target::Class(label as u32),
    }
}

/// A run of `len` elements of one row from global byte address `addr`: a scalar head up to the
/// first 16-byte boundary, `n_vec` aligned vectors, and a scalar tail.
pub(crate) struct Segment {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) head: u32,
    pub(crate) n_vec: u32,
}

impl Segment {
    #[inline(always)]
    pub(crate) fn new<T: Element>(addr: u64, len: u32) -> Segment {
        let head = ((((16 - (addr & 15)) & 15) as u32) / T::BYTES).min(len);
        let n_vec = (len - head) / T::VEC as u32;
        Segment { addr, len, head, n_vec }
    }

    /// Index (in the segment) of the first element of vector `v`.
    #[inline(always)]
    pub(crate) fn vec_start<T: Element>(&self, v: u32) -> u32 {
        self.head + v * T::VEC as u32
    }

    #[inline(always)]
    pub(crate) fn elem_addr<T: Element>(&self, j: u32) -> u64 {
        self.addr + j as u64 * T::BYTES as u64
    }

    /// Elements outside the vectors (fewer than `2 * VEC`).
    #[inline(always)]
    pub(crate) fn n_scalar<T: Element>(&self) -> u32 {
        self.len - self.n_vec * T::VEC as u32
    }

    /// Index (in the segment) of scalar `k < n_scalar`: the head, then the tail.
    #[inline(always)]
    pub(crate) fn scalar_index<T: Element>(&self, k: u32) -> u32 {
        if k < self.head { k } else { k + self.n_vec * T::VEC as u32 }
    }
}

/// Where [`reduce_segment`] reads a segment's vectors, and whether it keeps them.
#[derive(Clone, Copy)]
pub(crate) enum Source {
    /// Global memory only.
    Global,
    /// Global memory, each element `j` also copied to shared memory at `stash + j * BYTES` (the
    /// stash, congruent to the segment's address modulo 16, so vectors stay aligned).
    Keep(u32),
    /// The stash, where [`grad_segment`] copied the vectors behind the row before (the scalar
    /// head and tail are still read from global memory and kept).
    Stashed(u32),
}

/// A thread's batch of `seg`'s vectors `v, v + step, ...` (`UNROLL` of them; those past the
/// segment stay zero), each loaded by `load(start)` before any is used.
#[inline(always)]
pub(crate) fn load_batch<T: Element>(seg: &Segment, v: u32, step: u32, load: impl Fn(u32) -> [u32; 4]) -> [[u32; 4]; UNROLL as usize] {
    let mut words = [[0u32; 4]; UNROLL as usize];
    unroll!(u => {
        let index = v + u * step;
        if index < seg.n_vec {
            words[u as usize] = load(seg.vec_start::<T>(index));
        }
    });
    words
}

/// This thread's share of the online log-sum-exp over `seg` (with `Full`, of the whole chunk
/// summary, `ctx` placing the segment in its row), read from `src`.
///
/// Each thread takes vectors `v, v + step, ...` in batches of `UNROLL`: all loads of a batch are
/// issued before the first is used (bounds-checked, so a partial batch costs one round trip,
/// not one per vector); the batch's maximum rescales the running sum once; the exponentials are
/// summed as a tree to keep dependency chains short.
#[inline(always)]
pub(crate) unsafe fn reduce_segment<T: Element, M: Mode>(
    seg: &Segment,
    src: Source,
    o: &OptParams,
    ctx: &RowCtx,
) -> Part {
    let load = |start: u32| unsafe {
        match src {
            Source::Stashed(stash) => prim::ld_shared_v4(stash + start * T::BYTES),
            _ => prim::ld_global_v4(seg.elem_addr::<T>(start)),
        }
    };
    let keep = |start: u32, words: [u32; 4]| {
        if let Source::Keep(stash) = src {
            unsafe { prim::st_shared_v4(stash + start * T::BYTES, words) };
        }
    };
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mut acc = Part::EMPTY;
    let mut v = tid;
    if M::FULL {
        // One vector at a time (a rolled loop keeps the options' per-element code small; their
        // arithmetic, not the loads' latency, bounds this path).
        while v < seg.n_vec {
            let start = seg.vec_start::<T>(v);
            let words = load(start);
            keep(start, words);
            let x = T::unpack(words);
            let y = unsafe { opts::observe(o, ctx, x, T::VEC, ctx.col0 + start, &mut acc) };
            acc.lse.add(&y, T::VEC);
            v += step;
        }
    }
    while !M::FULL && v < seg.n_vec {
        let words = load_batch::<T>(seg, v, step, load);
        unsafe { fold_batch::<T, M>(seg, &words, v, step, o, ctx, &mut acc, keep) };
        v += UNROLL * step;
    }
    let stash = match src {
        Source::Keep(stash) | Source::Stashed(stash) => Some(stash),
        Source::Global => None,
    };
    unsafe { fold_scalar::<T, M>(seg, stash, o, ctx, &mut acc) };
    acc
}

/// [`reduce_segment`]'s batch of `UNROLL` vectors from `v` (`step` apart), loaded in `words`,
/// folded into `acc`; `keep` sees each vector first (to stash it).
#[inline(always)]
pub(crate) unsafe fn fold_batch<T: Element, M: Mode>(
    seg: &Segment,
    words: &[[u32; 4]; UNROLL as usize],
    v: u32,
    step: u32,
    o: &OptParams,
    ctx: &RowCtx,
    acc: &mut Part,
    keep: impl Fn(u32, [u32; 4]),
) {
    let mut packed_max = T::MAX_EMPTY;
    unroll!(u => {
        let index = v + u * step;
        if index < seg.n_vec {
            keep(seg.vec_start::<T>(index), words[u as usize]);
            packed_max = T::max_fold(packed_max, words[u as usize]);
        }
    });
    let batch_max = T::max_value(packed_max);
    if M::OPTS && !M::CAP && !M::WSMOOTH && o.label_smoothing != 0.0 {
        unroll!(u => {
            if v + u * step < seg.n_vec {
                let sum = reduce::sum_of(&T::unpack(words[u as usize]), T::VEC);
                acc.wsum += prim::fma(-(T::VEC as f32), ctx.y_ref, sum);
            }
        });
    }
    // Smoothing with class weights (`RowWSmooth`): each term times its class's weight.
    if M::WSMOOTH && !M::CAP && o.label_smoothing != 0.0 {
        unroll!(u => {
            let index = v + u * step;
            if index < seg.n_vec {
                let col = ctx.col0 + seg.vec_start::<T>(index);
                let x = T::unpack(words[u as usize]);
                acc.wsum += unsafe { opts::smoothing_sum::<M, 8>(o, &x, T::VEC, col, ctx.y_ref) };
            }
        });
    }
    if M::ACCURACY && o.row_correct != 0 {
        unroll!(u => {
            let index = v + u * step;
            if index < seg.n_vec {
                let first = ctx.col0 + seg.vec_start::<T>(index);
                acc.wrong += opts::beats_label(ctx, &T::unpack(words[u as usize]), T::VEC, first);
            }
        });
    }
    // The cap is increasing: the capped batch's maximum is the capped maximum.
    let batch_max = if M::CAP { opts::capped(o.softcap, ctx.inv_cap, &[batch_max], 1)[0] } else { batch_max };
    if acc.lse.raise(batch_max) {
        let mut sums = [0.0f32; 2];
        unroll!(u => {
            if v + u * step < seg.n_vec {
                let x = T::unpack(words[u as usize]);
                let y = if M::CAP { opts::capped(o.softcap, ctx.inv_cap, &x, T::VEC) } else { x };
                if M::CAP && o.label_smoothing != 0.0 {
                    let col = ctx.col0 + seg.vec_start::<T>(v + u * step);
                    acc.wsum += unsafe { opts::smoothing_sum::<M, 8>(o, &y, T::VEC, col, ctx.y_ref) };
                }
                sums[(u & 1) as usize] += reduce::sum_exp2(&y, T::VEC, acc.lse.m);
            }
        });
        acc.lse.s += sums[0] + sums[1];
    } else {
        unroll!(u => {
            if v + u * step < seg.n_vec {
                acc.lse.keep_nan(&T::unpack(words[u as usize]), T::VEC);
            }
        });
    }
}

/// [`reduce_segment`]'s scalar head and tail (one element a thread), read from global memory and,
/// with `stash`, kept there.
#[inline(always)]
pub(crate) unsafe fn fold_scalar<T: Element, M: Mode>(seg: &Segment, stash: Option<u32>, o: &OptParams, ctx: &RowCtx, acc: &mut Part) {
    let tid = thread_idx();
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe { T::ld_global_raw(seg.elem_addr::<T>(j)) };
        if let Some(stash) = stash {
            unsafe { T::st_shared_raw(stash + j * T::BYTES, raw) };
        }
        unsafe { add_scalar::<M>(acc, T::widen(raw), j, o, ctx) };
    }
}

/// Adds one element (index `j` in its segment) to a summary.
#[inline(always)]
unsafe fn add_scalar<M: Mode>(acc: &mut Part, x: f32, j: u32, o: &OptParams, ctx: &RowCtx) {
    let y = if M::FULL {
        unsafe { opts::observe(o, ctx, [x], 1, ctx.col0 + j, acc) }
    } else {
        let y = if M::CAP { opts::capped(o.softcap, ctx.inv_cap, &[x], 1)[0] } else { x };
        if M::OPTS && o.label_smoothing != 0.0 && !(M::WSMOOTH && ctx.wsum_later) {
            acc.wsum += unsafe { opts::smoothing_sum::<M, 1>(o, &[y], 1, ctx.col0 + j, ctx.y_ref) };
        }
        if M::ACCURACY && o.row_correct != 0 {
            acc.wrong += opts::beats_label(ctx, &[x], 1, ctx.col0 + j);
        }
        [y]
    };
    acc.lse.add(&y, 1);
}

/// Writes the gradient over `seg`, reading the logits from `stash` (see `reduce_segment`) or,
/// without one, from the segment itself. `label` is the label's index in the segment (any value
/// `>= len` when it lies elsewhere).
///
/// With `next` (and a stash; a segment of the same length and address modulo 16), each thread
/// copies (`cp.async`, committed at the end) `next`'s vectors into the stash slots it has just
/// read, each behind the gradient store that used the slot: the next row's loads are in flight
/// while this row's gradient is written, for `reduce_segment` from `Source::Stashed` after a
/// `cp.async.wait_group 0` (each thread reads back only the vectors it copied). With `FOLD` (not
/// `Full`; [`Coef::lse2_a`] not NaN) the gradient's scale rides in the exponent
/// ([`opts::grad_values_folded`]).
#[inline(always)]
pub(crate) unsafe fn grad_segment<T: Element, M: Mode, const FOLD: bool>(
    seg: &Segment,
    stash: Option<u32>,
    next: Option<&Segment>,
    o: &OptParams,
    c: &Coef,
    label: u32,
    delta: u64,
) {
    let copy_next = |start: u32| {
        if let (Some(stash), Some(next)) = (stash, next) {
            unsafe { prim::cp_async_16(stash + start * T::BYTES, next.elem_addr::<T>(start), true) };
        }
    };
    let (tid, step) = (thread_idx(), prim::block_dim());
    let load = |start: u32| unsafe {
        match stash {
            Some(stash) => prim::ld_shared_v4(stash + start * T::BYTES),
            None => prim::ld_global_v4(seg.elem_addr::<T>(start)),
        }
    };
    let mut v = tid;
    if M::FULL {
        // One vector at a time, as in `reduce_segment`.
        while v < seg.n_vec {
            let start = seg.vec_start::<T>(v);
            let x = T::unpack(load(start));
            let g = unsafe { opts::grad_values::<M, 8>(o, x, T::VEC, start, label, c) };
            unsafe { prim::st_global_v4(seg.elem_addr::<T>(start).wrapping_add(delta), T::pack(&g)) };
            copy_next(start);
            v += step;
        }
    }
    while !M::FULL && v < seg.n_vec {
        let words = load_batch::<T>(seg, v, step, load);
        unsafe { grad_batch::<T, M, FOLD>(seg, &words, v, step, o, c, label, delta, copy_next) };
        v += UNROLL * step;
    }
    if next.is_some() {
        prim::cp_async_commit();
    }
    unsafe { grad_scalar::<T, M>(seg, stash, o, c, label, delta) };
}

/// The gradient of a thread's batch of `UNROLL` vectors from `v` (`step` apart), loaded in `words`,
/// written `delta` bytes from the segment; `after(start)` follows each vector's store (the next
/// row's copy into the slot it used). With `FOLD` the scale rides in the exponent
/// ([`opts::grad_values_folded`]).
#[inline(always)]
pub(crate) unsafe fn grad_batch<T: Element, M: Mode, const FOLD: bool>(
    seg: &Segment,
    words: &[[u32; 4]; UNROLL as usize],
    v: u32,
    step: u32,
    o: &OptParams,
    c: &Coef,
    label: u32,
    delta: u64,
    after: impl Fn(u32),
) {
    unroll!(u => {
        let index = v + u * step;
        if index < seg.n_vec {
            let start = seg.vec_start::<T>(index);
            let x = T::unpack(words[u as usize]);
            let g = if FOLD {
                opts::grad_values_folded::<8>(x, T::VEC, start, label, c)
            } else {
                unsafe { opts::grad_values::<M, 8>(o, x, T::VEC, start, label, c) }
            };
            let at = seg.elem_addr::<T>(start).wrapping_add(delta);
            unsafe { prim::st_global_v4(at, T::pack(&g)) };
            after(start);
        }
    });
}

/// [`grad_segment`]'s scalar head and tail (one element a thread), read from `stash` or the
/// segment.
#[inline(always)]
pub(crate) unsafe fn grad_scalar<T: Element, M: Mode>(seg: &Segment, stash: Option<u32>, o: &OptParams, c: &Coef, label: u32, delta: u64) {
    let tid = thread_idx();
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe {
            match stash {
                Some(stash) => T::ld_shared_raw(stash + j * T::BYTES),
                None => T::ld_global_raw(seg.elem_addr::<T>(j)),
            }
        };
        let g = unsafe { opts::grad_values::<M, 1>(o, [T::widen(raw)], 1, j, label, c) };
        unsafe { T::store_global(seg.elem_addr::<T>(j).wrapping_add(delta), g[0]) };
    }
}

/// Writes zeros over `seg` moved by `delta` bytes (the gradient of an ignored row).
#[inline(always)]
pub(crate) unsafe fn zero_segment<T: Element>(seg: &Segment, delta: u64) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mut v = tid;
    while v < seg.n_vec {
        let at = seg.elem_addr::<T>(seg.vec_start::<T>(v)).wrapping_add(delta);
        unsafe { prim::st_global_v4(at, [0; 4]) };
        v += step;
    }
    if tid < seg.n_scalar::<T>() {
        let at = seg.elem_addr::<T>(seg.scalar_index::<T>(tid)).wrapping_add(delta);
        unsafe { T::store_global(at, 0.0) };
    }
}

/// Writes row `row`'s loss, log-sum-exp and (with token accuracy) whether it was `correct`.
#[inline(always)]
unsafe fn write_row_outputs<M: Mode>(p: &XentParams, row: u64, loss: f32, lse: f32, correct: bool) {
    unsafe {
        prim::st_global_u32(p.row_loss + 4 * row, loss.to_bits());
        prim::st_global_u32(p.row_lse + 4 * row, lse.to_bits());
        if M::OPTS && p.opts.row_correct != 0 {
            prim::st_global_u32(p.opts.row_correct + 4 * row, correct as u32);
        }
    }
}

/// The outputs of a scored row with summary `total` (log-sum-exp `c.lse2` in log2 units).
#[inline(always)]
pub(crate) unsafe fn write_scored_row<M: Mode>(p: &XentParams, row: u64, total: &Part, label: u32, x_label: f32, y_ref: f32, c: &Coef) {
    let lse = c.lse2 * LN_2;
    let loss = unsafe { opts::row_loss::<M>(p, total, label, x_label, y_ref, lse) };
    unsafe { write_row_outputs::<M>(p, row, loss, lse, total.wrong == 0) }
}

/// Row outputs of a row that is not scored: zero, or NaN loss for an out-of-range label (so the
/// reduced loss is NaN too; the host reports the error when the loss is read).
#[inline(always)]
pub(crate) unsafe fn write_unscored_row<M: Mode>(p: &XentParams, row: u64, target: Target) {
    let loss = if target == Target::Bad { f32::NAN } else { 0.0 };
    unsafe { write_row_outputs::<M>(p, row, loss, 0.0, false) }
}

/// Phase one's context for a row of class `label`: with token accuracy every thread reads the
/// label's logit (one broadcast load per warp).
#[inline(always)]
pub(crate) unsafe fn row_ctx<T: Element, M: Mode>(p: &XentParams, row: u64, label: u32, col0: u32) -> RowCtx {
    let x_label = if (M::FULL || M::ACCURACY) && p.opts.row_correct != 0 {
        let addr = row_addr::<T>(&p.rows, row) + label as u64 * T::BYTES as u64;
        T::widen(unsafe { T::ld_global_raw(addr) })
    } else {
        0.0
    };
    let inv_cap = if M::CAP { opts::recip::<M>(p.opts.softcap) } else { 0.0 };
    RowCtx { col0, label, x_label, y_ref: unsafe { smoothing_ref::<T, M>(p, row, label) }, inv_cap, wsum_later: false }
}

/// Label smoothing's reference for `row` ([`RowCtx::y_ref`]): the label's logit, soft-capped as
/// the sum sees it (every chunk of the row reads the same element, and a label is never a masked
/// class, whose -inf or -1e30 would swamp the sum); 0 without smoothing, except in the modes that
/// take its path anyway ([`Mode::SMOOTHING_PATH`](opts::Mode::SMOOTHING_PATH)).
#[inline(always)]
unsafe fn smoothing_ref<T: Element, M: Mode>(p: &XentParams, row: u64, label: u32) -> f32 {
    // Vocabulary-parallel calls (`label_logits` set) share 0: their ranks hold different first
    // columns.
    if !M::OPTS || (p.opts.label_smoothing == 0.0 && !M::SMOOTHING_PATH) || p.label_logits != 0 {
        return 0.0;
    }
    let x = T::widen(unsafe { T::ld_global_raw(row_addr::<T>(&p.rows, row) + label as u64 * T::BYTES as u64) });
    // A -inf or NaN label logit would turn the infinite loss PyTorch gives into NaN (inf - inf):
    // no reference then, as before.
    if !x.is_finite() {
        return 0.0;
    }
    if (M::FULL || M::CAP) && p.opts.softcap > 0.0 { p.opts.softcap * opts::tanh(x * opts::recip::<M>(p.opts.softcap)) } else { x }
}

#[inline(always)]
pub(crate) fn row_addr<T: Element>(rows: &RowsParams, row: u64) -> u64 {
    rows.logits + row * rows.row_stride * T::BYTES as u64
}

/// Counts valid and out-of-range labels into `counts` (zeroed before a launch of several
/// blocks; a launch of one block stores every word); with class
/// weights also `Σ weight[label]` over the valid rows, which needs a launch of one block (so the
/// sum's order, and its bits, do not depend on timing).
///
/// Launch: any 1-D grid of 1-D blocks (a multiple of 32 threads; one block with weights), 256
/// bytes of dynamic shared memory. Traffic: one label per row.
#[inline(always)]
pub unsafe fn count<L: Label>(p: &CountParams) {
    let tid = thread_idx();
    let step = prim::grid_dim() as u64 * prim::block_dim() as u64;
    let mut row = prim::block_idx() as u64 * prim::block_dim() as u64 + tid as u64;
    let (mut valid, mut bad, mut weight) = (0u32, 0u32, 0.0f64);
    while row < p.rows.n_rows {
        match unsafe { row_target::<L>(&p.rows, row) } {
            Target::Class(label) => {
                valid += 1;
                if p.weight != 0 {
                    let w = unsafe { prim::ld_global_u32(p.weight + 4 * label as u64) };
                    weight += f32::from_bits(w) as f64;
                }
            }
            Target::Bad => bad += 1,
            Target::Ignored => {}
        }
        row += step;
    }
    let valid = reduce::block_sum_u32(valid);
    let bad = reduce::block_sum_u32(bad);
    let weight = if p.weight != 0 { reduce::block_sum_f64(weight) } else { 0.0 };
    // Label smoothing with class weights needs Σ_j weight[j]: summed here, in the launch's one
    // block (fixed order), so the weights never travel to the host.
    let class_weight_sum = if p.weight != 0 && p.sum_class_weights != 0 {
        let mut sum = 0.0f64;
        let mut class = tid;
        while class < p.rows.vocab {
            let w = unsafe { prim::ld_global_u32(p.weight + 4 * class as u64) };
            sum += f32::from_bits(w) as f64;
            class += prim::block_dim();
        }
        reduce::block_sum_f64(sum)
    } else {
        0.0
    };
    if tid == 0 && prim::grid_dim() == 1 {
        // The launch's only block: it stores every word, so `counts` need not be zeroed first
        // (one operation less per call with few rows).
        let weight_bits = if p.weight != 0 { (weight as f32).to_bits() } else { 0 };
        unsafe {
            prim::st_global_u32(p.counts + 4 * COUNT_VALID as u64, valid);
            prim::st_global_u32(p.counts + 4 * COUNT_BAD as u64, bad);
            prim::st_global_u32(p.counts + 4 * COUNT_WEIGHT as u64, weight_bits);
            prim::st_global_u32(p.counts + 4 * COUNT_CLASS_WEIGHT_SUM as u64, (class_weight_sum as f32).to_bits());
        }
    } else if tid == 0 {
        unsafe {
            if valid > 0 {
                prim::red_add_u32(p.counts + 4 * COUNT_VALID as u64, valid);
            }
            if bad > 0 {
                prim::red_add_u32(p.counts + 4 * COUNT_BAD as u64, bad);
            }
            if p.weight != 0 {
                let bits = (weight as f32).to_bits();
                prim::st_global_u32(p.counts + 4 * COUNT_WEIGHT as u64, bits);
                let bits = (class_weight_sum as f32).to_bits();
                prim::st_global_u32(p.counts + 4 * COUNT_CLASS_WEIGHT_SUM as u64, bits);
            }
        }
    }
}

/// Reduces the per-row losses to the loss: their sum, the mean dividing the cross-entropy part
/// by the valid count (or, with class weights, the valid rows' total weight) and the z-loss part
/// by the valid count (0/0 = NaN when every row is ignored, as in PyTorch). With the z-loss the
/// rows' `s·lse²` are taken out of their losses and reported on their own; with token accuracy
/// the fraction of valid rows marked correct. Sums in f64, in a fixed order.
///
/// Launch: one block of a multiple of 32 threads, 256 bytes of dynamic shared memory.
#[inline(always)]
pub unsafe fn finish(p: &FinishParams) {
    let word = |i: usize| unsafe { prim::ld_global_u32(p.counts + 4 * i as u64) };
    unsafe { finish_rows(*p, word(COUNT_VALID), word(COUNT_WEIGHT)) }
}

/// `--cfg xent_trace` builds (`small_trace`'s timeline): thread 0 stamps `%globaltimer` into
/// word pair `k` of the stash (free once the gradient is written), which the cluster kernel
/// copies out at its end.
#[cfg(xent_trace)]
#[inline(always)]
fn trace_mark(k: u32) {
    if thread_idx() == 0 {
        let t = prim::global_timer();
        let at = prim::smem_base() + SMEM_STASH_OFFSET + 8 * k;
        unsafe {
            prim::st_shared_u32(at, t as u32);
            prim::st_shared_u32(at + 4, (t >> 32) as u32);
        }
    }
}

/// The finish kernel's work for `p`'s rows, by the whole block (up to 32 rows by warp 0 alone:
/// the other warps return at once, so no caller may wait at a barrier after it), with the counts
/// given (`valid` rows, and the f32 bits of their total class weight); rows written by other CTAs
/// of this launch are read past L1. Not inlined: every fused and cluster kernel calls it
/// (inlined, their PTX grew by a third).
#[inline(never)]
unsafe fn finish_rows(p: FinishParams, valid: u32, weight_bits: u32) {
    let tid = thread_idx();
    // Up to 32 rows are warp 0's alone: its sums are the block's (the other warps' would add
    // +0.0 each, which only turns a -0.0 into +0.0: `+ 0.0` does that here), without the block
    // sums' two barriers and serial combine each (a small call's last CTA, where they were about
    // a microsecond of the call's end).
    let one_warp = p.n_rows <= 32;
    if one_warp && tid >= 32 {
        return;
    }
    let many_warps = prim::block_dim() > 32;
    let sum_f64 = |v: f64| {
        if !one_warp {
            reduce::block_sum_f64(v)
        } else if many_warps {
            reduce::warp_sum_f64(v) + 0.0
        } else {
            reduce::warp_sum_f64(v)
        }
    };
    let z = p.lse_square_scale as f64;
    let (mut ce, mut zsum, mut correct) = (0.0f64, 0.0f64, 0u32);
    let mut row = tid as u64;
    while row < p.n_rows {
        let loss = f32::from_bits(unsafe { prim::ld_global_cg_u32(p.row_loss + 4 * row) }) as f64;
        if z != 0.0 {
            let lse = f32::from_bits(unsafe { prim::ld_global_cg_u32(p.row_lse + 4 * row) }) as f64;
            let part = z * lse * lse;
            zsum += part;
            ce += loss - part;
        } else {
            ce += loss;
        }
        if p.row_correct != 0 {
            correct += unsafe { prim::ld_global_cg_u32(p.row_correct + 4 * row) };
        }
        row += prim::block_dim() as u64;
    }
    #[cfg(xent_trace)]
    trace_mark(2);
    let ce = sum_f64(ce);
    let zsum = if z != 0.0 { sum_f64(zsum) } else { 0.0 };
    let correct = match p.row_correct != 0 {
        true if one_warp => reduce::warp_sum_u32(correct),
        true => reduce::block_sum_u32(correct),
        false => 0,
    };
    #[cfg(xent_trace)]
    trace_mark(3);
    if tid == 0 {
        unsafe { store_call_loss(&p, valid, weight_bits, ce, zsum, correct) };
    }
    #[cfg(xent_trace)]
    trace_mark(4);
}

/// The call's loss and extras from the rows' sums (`ce`: the losses without the z-loss, `zsum`:
/// the z-loss terms, `correct`: the rows predicted right) and the counts (`valid` rows, the f32
/// bits of their class weight), as the finish stores them (one thread).
#[inline(always)]
unsafe fn store_call_loss(p: &FinishParams, valid: u32, weight_bits: u32, ce: f64, zsum: f64, correct: u32) {
    let z = p.lse_square_scale as f64;
    let n_valid = valid as f64;
    let (ce, zsum) = if p.reduction == REDUCTION_MEAN {
        let total_weight = if p.weighted != 0 { f32::from_bits(weight_bits) as f64 } else { n_valid };
        (ce / total_weight, if z != 0.0 { zsum / n_valid } else { 0.0 })
    } else {
        (ce, zsum)
    };
    unsafe {
        prim::st_global_u32(p.loss, ((ce + zsum) as f32).to_bits());
        if p.extras != 0 {
            prim::st_global_u32(p.extras, (zsum as f32).to_bits());
            let accuracy = correct as f64 / n_valid;
            prim::st_global_u32(p.extras + 4, (accuracy as f32).to_bits());
        }
    }
}

/// A small call's labels, counted by the whole block (`XentParams::self_finish`: at most as many
/// rows as the block has threads, so each thread takes at most one, as in the count and finish
/// kernels): valid rows, rows out of range, and the f32 bits of the valid rows' total class
/// weight (0 without), every thread getting them. Not inlined: every fused and cluster kernel
/// calls it (as `finish_rows`).
#[inline(never)]
unsafe fn count_labels<L: Label>(rows: RowsParams, weight_at: u64) -> (u32, u32, u32) {
    let tid = thread_idx();
    let (mut valid, mut bad, mut weight) = (0u32, 0u32, 0.0f64);
    if (tid as u64) < rows.n_rows {
        match unsafe { row_target::<L>(&rows, tid as u64) } {
            Target::Class(label) => {
                valid = 1;
                if weight_at != 0 {
                    weight = f32::from_bits(unsafe { prim::ld_global_u32(weight_at + 4 * label as u64) }) as f64;
                }
            }
            Target::Bad => bad = 1,
            Target::Ignored => {}
        }
    }
    // Both counts are at most the block's threads (at most 1024): one sum of the two packed.
    let packed = reduce::block_sum_u32(valid | bad << 16);
    let (valid, bad) = (packed & 0xffff, packed >> 16);
    let weight_bits = if weight_at != 0 { (reduce::block_sum_f64(weight) as f32).to_bits() } else { 0 };
    (valid, bad, weight_bits)
}

/// A small call's start: the CTA counts the labels itself into its shared `SMEM_COUNTS` (valid
/// and out-of-range rows, their total class weight), which `opts::coef` reads instead of `counts`
/// and the last CTA's `finish_if_last` stores; the block's next barrier publishes them.
#[inline(always)]
unsafe fn self_count<L: Label>(p: &XentParams) {
    let (valid, bad, weight_bits) = unsafe { count_labels::<L>(p.rows, p.opts.weight) };
    if thread_idx() == 0 {
        let at = prim::smem_base() + SMEM_COUNTS;
        unsafe {
            // Two words: `SMEM_COUNTS` ends where the stash begins. Both counts are at most the
            // block's threads (at most 1024), so they share the first word.
            prim::st_shared_u32(at, opts::pack_counts(valid, bad));
            prim::st_shared_u32(at + 4, weight_bits);
        }
    }
}

/// A small call's end (`XentParams::self_finish`), by every thread of each CTA once its row
/// outputs are written (by its thread 0; `wrote`: this CTA wrote them). With one row the CTA that
/// wrote its outputs finishes the call alone, as soon as it has written them: no other CTA has
/// anything it needs. With more, each CTA counts itself done; the last one stores the counts it
/// took at its start and does the finish kernel's work. The done counter wraps to 0 on the last
/// increment. The flag that tells the CTA it was last lives in the cluster slot, which no other
/// CTA reads any more.
#[inline(always)]
unsafe fn finish_if_last<L: Label>(p: &XentParams, wrote: bool) {
    unsafe { finish_if_last_counted::<L>(p, wrote, None) }
}

/// [`finish_if_last`], with this CTA's increment of the done counter taken already where
/// `counted` is given (its old value, in thread 0; [`cluster_small`] takes it before its
/// gradient pass, right after its row outputs, with the same `atom_inc_acq_rel_gpu_u32`).
#[inline(always)]
unsafe fn finish_if_last_counted<L: Label>(p: &XentParams, wrote: bool, counted: Option<u32>) {
    if p.self_finish == 0 {
        return;
    }
    // This CTA's share of the call is issued: the next small call's launch may start once every
    // CTA is here (it waits for this grid's end before it touches memory). Earlier, its waiting
    // CTAs took SM slots this launch still used (64 rows: 19.7 against 17.3 µs a call).
    #[cfg(xent_cluster)]
    prim::launch_dependents();
    let tid = thread_idx();
    if p.rows.n_rows == 1 {
        if !wrote {
            return;
        }
        // Thread 0 wrote the row and reads it back below; the barrier orders the block's last
        // use of the reduction scratch before `finish_rows` uses it again.
        prim::sync_threads();
    } else {
        let flag = prim::smem_base() + crate::abi::SMEM_CLUSTER_SLOT;
        if tid == 0 {
            // Its release orders thread 0's row outputs before the increment; its acquire, in
            // the last CTA, every other CTA's outputs before what the block does after the
            // barrier below (thread 0 then the barrier: acquire, then CTA order).
            let last = prim::grid_dim() - 1;
            let old = match counted {
                Some(old) => old,
                None => unsafe { prim::atom_inc_acq_rel_gpu_u32(p.counts + 4 * COUNT_DONE as u64, last) },
            };
            unsafe { prim::st_shared_u32(flag, (old == last) as u32) };
        }
        prim::sync_threads();
        #[cfg(xent_trace)]
        trace_mark(0);
        if unsafe { prim::ld_shared_u32(flag) } == 0 {
            return;
        }
    }
    #[cfg(xent_trace)]
    trace_mark(1);
    let (valid, weight_bits) = unsafe { store_own_counts(p, tid) };
    unsafe { finish_rows(finish_params(p), valid, weight_bits) }
}

/// A small call's counts as its CTA took them at its start (`SMEM_COUNTS`), stored into `counts`
/// by thread 0 (`tid`) as the count kernel stores them; returns the valid rows and the f32 bits
/// of their class weight.
#[inline(always)]
unsafe fn store_own_counts(p: &XentParams, tid: u32) -> (u32, u32) {
    let at = prim::smem_base() + SMEM_COUNTS;
    let (valid, bad) = opts::unpack_counts(unsafe { prim::ld_shared_u32(at) });
    let weight_bits = unsafe { prim::ld_shared_u32(at + 4) };
    if tid == 0 {
        unsafe {
            prim::st_global_u32(p.counts + 4 * COUNT_VALID as u64, valid);
            prim::st_global_u32(p.counts + 4 * COUNT_BAD as u64, bad);
            prim::st_global_u32(p.counts + 4 * COUNT_WEIGHT as u64, weight_bits);
            prim::st_global_u32(p.counts + 4 * COUNT_CLASS_WEIGHT_SUM as u64, 0);
        }
    }
    (valid, weight_bits)
}

/// The finish kernel's parameters for a small call that finishes itself.
#[inline(always)]
fn finish_params(p: &XentParams) -> FinishParams {
    FinishParams {
        row_loss: p.row_loss,
        counts: p.counts,
        loss: p.loss,
        n_rows: p.rows.n_rows,
        reduction: p.reduction,
        weighted: (p.opts.weight != 0) as u32,
        row_lse: p.row_lse,
        row_correct: p.opts.row_correct,
        extras: p.extras,
        lse_square_scale: p.opts.lse_square_scale,
        _pad: 0,
    }
}
