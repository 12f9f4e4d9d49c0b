//! Cross-entropy: label resolution, the count kernel, the fused (row-resident) kernel, the
//! chunked plan's two kernels, and the kernel that reduces per-row losses to the loss.
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
#[cfg(xent_cluster)]
use crate::abi::{CLUSTER_KEEP, SMEM_PIECE_MBARRIERS, SMEM_WSUM_SLOTS};
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
    let inv_cap = if M::CAP { 1.0 / p.opts.softcap } else { 0.0 };
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
    if (M::FULL || M::CAP) && p.opts.softcap > 0.0 { p.opts.softcap * opts::tanh(x * (1.0 / p.opts.softcap)) } else { x }
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

/// Fused plan: one block per row keeps the row in shared memory between the log-sum-exp and the
/// gradient, so each logit is read from HBM once and its gradient written once
/// (2 x element bytes of traffic per element; ignored rows are only written).
///
/// Launch: grid = n_rows, block = a multiple of 32 threads up to 1024, dynamic shared memory =
/// `SMEM_STASH_OFFSET + 16 + vocab * BYTES`.
#[inline(always)]
pub unsafe fn fused<T: Element, L: Label, M: Mode>(p: &XentParams) {
    let rows = &p.rows;
    let row = prim::block_idx() as u64;
    let tid = thread_idx();
    let seg = Segment::new::<T>(row_addr::<T>(rows, row), rows.vocab);
    if p.self_finish != 0 {
        unsafe { self_count::<L>(p) };
    }
    let label = match unsafe { row_target::<L>(rows, row) } {
        Target::Class(label) => label,
        target => {
            if p.mode != MODE_FORWARD {
                unsafe { zero_segment::<T>(&seg, 0) };
            }
            if tid == 0 {
                unsafe { write_unscored_row::<M>(p, row, target) };
            }
            unsafe { finish_if_last::<L>(p, true) };
            return;
        }
    };
    // Read before the block's first barrier; every gradient write comes after it.
    let x_label =
        if tid == 0 { T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(label)) }) } else { 0.0 };
    if M::CAP {
        unsafe { fused_cap_row::<T, L, M>(p, &seg, row, label, x_label) };
        return;
    }
    let ctx = unsafe { row_ctx::<T, M>(p, row, label, 0) };
    let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
    let partial = unsafe { reduce_segment::<T, M>(&seg, Source::Keep(stash), &p.opts, &ctx) };
    // The scratch's next writer (a small call's last CTA's totals) passes `finish_if_last`'s barrier.
    let total = partial.block_merge_unsynced::<M>();
    let c = unsafe { opts::coef::<M>(p, &total, label, 0) };
    if p.mode != MODE_FORWARD {
        unsafe { grad_segment::<T, M, false>(&seg, Some(stash), None, &p.opts, &c, label, 0) };
    }
    if tid == 0 {
        unsafe { write_scored_row::<M>(p, row, &total, label, x_label, ctx.y_ref, &c) };
    }
    unsafe { finish_if_last::<L>(p, true) };
}

/// [`fused`]'s scored row with the soft cap: its passes take one vector at a time from the stash,
/// as the split kernels' ([`split::cap_first_pass`](crate::split::cap_first_pass), whose `cp.async`
/// copies fill the stash first, and [`split::cap_grad`](crate::split::cap_grad)): few registers
/// held, where the batched passes took 113-128.
#[inline(always)]
unsafe fn fused_cap_row<T: Element, L: Label, M: Mode>(p: &XentParams, seg: &Segment, row: u64, label: u32, x_label: f32) {
    let ctx = unsafe { row_ctx::<T, M>(p, row, label, 0) };
    let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
    let (partial, widest) = if p.opts.softcap <= opts::FIXED_CAP_MAX {
        unsafe { crate::split::cap_first_pass::<T, M, true>(seg, stash, true, &p.opts, &ctx) }
    } else {
        unsafe { crate::split::cap_first_pass::<T, M, false>(seg, stash, true, &p.opts, &ctx) }
    };
    // The scratch's next writer (a small call's last CTA's totals) passes `finish_if_last`'s barrier.
    let total = partial.block_merge_unsynced::<M>();
    let c = unsafe { opts::coef::<M>(p, &total, label, 0) };
    if p.mode != MODE_FORWARD {
        unsafe { crate::split::cap_grad::<T, M>(seg, stash, None, &p.opts, &c, label, widest) };
    }
    if thread_idx() == 0 {
        unsafe { write_scored_row::<M>(p, row, &total, label, x_label, ctx.y_ref, &c) };
    }
    unsafe { finish_if_last::<L>(p, true) };
}

/// Block `b` of the cluster plan handles chunk `b % n_chunks` of row `b / n_chunks` (the chunked
/// plan's kernels take [`slice_chunk_of`]).
#[cfg(xent_cluster)]
#[inline(always)]
fn chunk_of<T: Element>(p: &XentParams) -> (u64, u32, u64, Segment) {
    let block = prim::block_idx() as u64;
    let (row, chunk) = prim::div_rem(block, p.n_chunks as u64);
    let chunk = chunk as u32;
    let start = chunk * p.chunk_len;
    let len = p.chunk_len.min(p.rows.vocab - start);
    let addr = row_addr::<T>(&p.rows, row) + start as u64 * T::BYTES as u64;
    (row, start, block, Segment::new::<T>(addr, len))
}

/// As `chunk_of`, or over a slice of the vocabulary (`slice_len` > 0): the chunks cover the
/// slice's columns, laid out from column 0 of each row in memory, and the start returned is the
/// chunk's first class in the whole vocabulary (`slice_start` is 0 without a slice).
#[inline(always)]
fn slice_chunk_of<T: Element>(p: &XentParams) -> (u64, u32, u64, Segment) {
    let block = prim::block_idx() as u64;
    let (row, chunk) = prim::div_rem(block, p.n_chunks as u64);
    let local = chunk as u32 * p.chunk_len;
    let columns = if p.slice_len != 0 { p.slice_len } else { p.rows.vocab };
    let len = p.chunk_len.min(columns.saturating_sub(local));
    let addr = row_addr::<T>(&p.rows, row) + local as u64 * T::BYTES as u64;
    (row, p.slice_start + local, block, Segment::new::<T>(addr, len))
}

/// Chunked plan, first kernel: the summary of one chunk of a row ((max, sum) in log2 units, and
/// the options' sums), into `partials`. Reads each logit once (element bytes per element).
///
/// Launch: grid = n_rows * n_chunks, block = a multiple of 32 threads, 256 bytes of dynamic
/// shared memory.
#[inline(always)]
pub unsafe fn chunk_partial<T: Element, L: Label, M: Mode>(p: &XentParams) {
    let (row, start, block, seg) = slice_chunk_of::<T>(p);
    let Target::Class(label) = (unsafe { row_target::<L>(&p.rows, row) }) else {
        return;
    };
    let ctx = unsafe { row_ctx::<T, M>(p, row, label, start) };
    let total = unsafe { reduce_segment::<T, M>(&seg, Source::Global, &p.opts, &ctx) }.block_merge_unsynced::<M>();
    if thread_idx() == 0 {
        unsafe { total.st_global::<M>(p.partials + 4 * PARTIAL_WORDS as u64 * block) };
        // Vocabulary-parallel: the label's logit, from the rank whose slice holds it.
        let local_label = label.wrapping_sub(start);
        if p.label_logits != 0 && local_label < seg.len {
            let x = T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) });
            unsafe { prim::st_global_u32(p.label_logits + 4 * row, x.to_bits()) };
        }
    }
}

/// Chunked plan, second kernel: combines the row's partials into its summary, then reads the
/// chunk again and writes its gradient (2 x element bytes per element). The block holding the
/// label writes the row's outputs.
///
/// Launch: as `chunk_partial`.
#[inline(always)]
pub unsafe fn chunk_grad<T: Element, L: Label, M: Mode>(p: &XentParams) {
    let (row, start, _, seg) = slice_chunk_of::<T>(p);
    let tid = thread_idx();
    // The block of the row's first chunk (of this rank's slice).
    let first_chunk = start == p.slice_start;
    let label = match unsafe { row_target::<L>(&p.rows, row) } {
        Target::Class(label) => label,
        target => {
            if p.mode != MODE_FORWARD {
                unsafe { zero_segment::<T>(&seg, 0) };
            }
            if first_chunk && tid == 0 {
                unsafe { write_unscored_row::<M>(p, row, target) };
            }
            return;
        }
    };
    let local_label = label.wrapping_sub(start);
    let ranks = if p.ranks > 1 { p.ranks } else { 1 };
    // Who writes the row's outputs: the block holding the label, or (vocabulary-parallel, where
    // the label may be another rank's) the first chunk's, with the label's logit gathered.
    let writes_row = if ranks > 1 { first_chunk } else { local_label < seg.len };
    // Read before the block's first barrier; every gradient write comes after it.
    let x_label = if writes_row && tid == 0 {
        if ranks > 1 {
            let mut sum = 0.0f32;
            for q in 0..ranks as u64 {
                let at = p.label_logits + q * p.rank_stride + 4 * row;
                sum += f32::from_bits(unsafe { prim::ld_global_u32(at) });
            }
            sum
        } else {
            T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) })
        }
    } else {
        0.0
    };
    // The smoothing sum's reference, for the same reason read now: in place, the gradient
    // overwrites the label's logit.
    let y_ref = if writes_row && tid == 0 { unsafe { smoothing_ref::<T, M>(p, row, label) } } else { 0.0 };
    let first = row * p.n_chunks as u64;
    let mut acc = Part::EMPTY;
    let mut i = tid;
    while i < p.n_chunks * ranks {
        let (q, chunk) = (i / p.n_chunks, i % p.n_chunks);
        let at = p.partials + q as u64 * p.rank_stride + 4 * PARTIAL_WORDS as u64 * (first + chunk as u64);
        acc = acc.merge::<M>(unsafe { Part::ld_global::<M>(at) });
        i += prim::block_dim();
    }
    let total = acc.block_merge::<M>();
    let c = unsafe { opts::coef::<M>(p, &total, label, start) };
    if p.mode != MODE_FORWARD {
        unsafe { grad_segment::<T, M, false>(&seg, None, None, &p.opts, &c, local_label, 0) };
    }
    if writes_row && tid == 0 {
        unsafe { write_scored_row::<M>(p, row, &total, label, x_label, y_ref, &c) };
    }
}

/// Two-phase mode, backward: the gradient of one chunk of a row from the row's log-sum-exp (kept
/// by a forward call), times the upstream gradient (one value, or one per row), written
/// `grad_delta` bytes from the logits (0: in place). Reads and writes each element once.
///
/// Launch: as `chunk_partial`, with `counts` and `row_lse` of the forward call; with a slice,
/// `n_chunks` tiles cover `slice_len` columns.
#[inline(always)]
pub unsafe fn backward<T: Element, L: Label, M: Mode>(p: &XentParams) {
    let (row, start, _, seg) = slice_chunk_of::<T>(p);
    let label = match unsafe { row_target::<L>(&p.rows, row) } {
        Target::Class(label) => label,
        _ => {
            unsafe { zero_segment::<T>(&seg, p.grad_delta) };
            return;
        }
    };
    let lse = f32::from_bits(unsafe { prim::ld_global_u32(p.row_lse + 4 * row) });
    // A summary whose value is the kept log-sum-exp, in log2 units.
    let total = Part { lse: reduce::Lse2 { m: lse * core::f32::consts::LOG2_E, s: 1.0 }, ..Part::EMPTY };
    let index = if p.upstream_per_row != 0 { row } else { 0 };
    let factor = f32::from_bits(unsafe { prim::ld_global_u32(p.upstream + 4 * index) });
    let mut c = unsafe { opts::coef::<M>(p, &total, label, start) };
    c.scale::<M>(factor);
    let local_label = label.wrapping_sub(start);
    unsafe { grad_segment::<T, M, false>(&seg, None, None, &p.opts, &c, local_label, p.grad_delta) };
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

/// Cluster plan (sm_90): a row split over the CTAs of a thread-block cluster, one chunk each, kept
/// in shared memory. Each CTA publishes its chunk's summary in its shared memory; after a
/// cluster barrier every warp reads all of them through distributed shared memory, so the row is
/// read from HBM once and its gradient written once (2 x element bytes per element), for rows
/// too long for one block and to spread few rows over many SMs.
///
/// Launch: grid = n_rows * n_chunks with cluster dimension n_chunks (block `b` is chunk
/// `b % n_chunks` of row `b / n_chunks`), block = a multiple of 32 threads, dynamic shared memory
/// = `SMEM_STASH_OFFSET + 16 + chunk_len * BYTES`.
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn cluster<T: Element, L: Label, M: Mode>(p: &XentParams) {
    // A small call is launched with a programmatic dependency on the kernel before it (the host's
    // `launch_cluster`): its CTAs may start before that kernel's end, and wait here.
    #[cfg(xent_trace)]
    let mut trace = [prim::global_timer(); 10];
    prim::grid_dependency_wait();
    stamp!(trace[1]);
    let (row, start, _, seg) = chunk_of::<T>(p);
    let tid = thread_idx();
    if p.self_finish != 0 {
        unsafe { self_count::<L>(p) };
    }
    // Every CTA of a cluster has the same row, so all of them leave here together or none does.
    let label = match unsafe { row_target::<L>(&p.rows, row) } {
        Target::Class(label) => label,
        target => {
            if p.mode != MODE_FORWARD {
                unsafe { zero_segment::<T>(&seg, 0) };
            }
            if start == 0 && tid == 0 {
                unsafe { write_unscored_row::<M>(p, row, target) };
            }
            unsafe { finish_if_last::<L>(p, start == 0) };
            return;
        }
    };
    stamp!(trace[2]);
    if M::CAP && tid == 32 {
        unsafe { prefetch_ahead::<T>(p, &seg, row) };
    }
    // The call's scales before the chunk's loads, in the kernels that gain by it
    // ([`opts::CallScales`]).
    let early = unsafe { <M::Early as opts::EarlyScales>::take::<M>(p) };
    stamp!(trace[3]);
    let local_label = label.wrapping_sub(start);
    let owns_label = local_label < seg.len;
    // Read before the block's first barrier; every gradient write comes after it.
    let x_label = if owns_label && tid == 0 {
        T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) })
    } else {
        0.0
    };
    let mut ctx = unsafe { row_ctx::<T, M>(p, row, label, start) };
    // With class-weighted smoothing and a gradient pass, that pass sums `Σ w_j·(y_j - y_ref)`
    // from the weights it reads anyway, and the first reads none (`Coef::wsum_later`).
    let wsum_later = BULK_LOAD && M::WSMOOTH && p.mode != MODE_FORWARD && p.opts.weight != 0 && p.opts.label_smoothing != 0.0;
    ctx.wsum_later = wsum_later;
    let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
    // With the bulk copy: vectors kept in registers, and the scalar head or tail this thread holds.
    let mut kept = Kept::EMPTY;
    // The soft cap up to `FIXED_CAP_MAX`: the first pass sums against a fixed reference, and a
    // thread whose elements all took the polynomial skips its check in the second.
    let fixed = M::CAP && p.opts.softcap <= opts::FIXED_CAP_MAX;
    let (partial, widest) = if BULK_LOAD && fixed {
        unsafe { bulk_load_and_reduce::<T, M, true>(&seg, &mut kept, &p.opts, &ctx) }
    } else if BULK_LOAD {
        unsafe { bulk_load_and_reduce::<T, M, false>(&seg, &mut kept, &p.opts, &ctx) }
    } else {
        (unsafe { reduce_segment::<T, M>(&seg, Source::Keep(stash), &p.opts, &ctx) }, f32::INFINITY)
    };
    // Nothing writes the scratch again (the cluster's barriers come first where a small call's
    // last CTA sums its totals).
    stamp!(trace[4]);
    let chunk = partial.block_merge_unsynced::<M>();
    // `cluster_total`'s work, spelled out: through the helper, ptxas gave 18 of these kernels
    // other code (session 35).
    let slot = prim::smem_base() + crate::abi::SMEM_CLUSTER_SLOT;
    if tid == 0 {
        unsafe { chunk.st_shared::<M>(slot) };
    }
    prim::cluster_arrive();
    prim::cluster_wait();
    stamp!(trace[5]);
    // Lane i reads the slot of CTA i (i, i + 32, ...), then the warp combines them.
    let mut acc = Part::EMPTY;
    let mut rank = tid % 32;
    while rank < p.n_chunks {
        let remote = prim::map_shared_rank(slot, rank);
        acc = acc.merge::<M>(unsafe { Part::ld_shared_cluster::<M>(remote) });
        rank += 32;
    }
    let total = acc.warp_merge::<M>();
    // Done reading the other CTAs' slots; the matching wait keeps this CTA's slot alive until
    // every CTA of the cluster has read it.
    prim::cluster_arrive();
    let mut c = unsafe { opts::EarlyScales::coef::<M>(early, p, &total, label, start) };
    (c.wsum_later, c.y_ref) = (wsum_later, ctx.y_ref);
    stamp!(trace[6]);
    // The soft cap's second pass takes one polynomial for the whole warp (the shortest that held
    // for all its lanes' elements in the first pass), so no warp runs two of its loops; with the
    // wide one, any element it does not hold for takes `tanh` itself (`POLY_WIDE_FIX`).
    let widest = if M::CAP && !keeps_t::<T, M>() {
        f32::from_bits(prim::warp_max_u32(widest.to_bits()))
    } else {
        widest
    };
    let poly = BULK_LOAD && M::CAP && !keeps_t::<T, M>();
    // This thread's share of the smoothing sum, where the gradient pass takes it.
    let mut wsum = 0.0;
    if p.mode == MODE_FORWARD {
    } else if poly && widest < p.opts.short_x2_max {
        unsafe { grad_from_stash::<T, M, POLY_SHORT>(&seg, &kept, &p.opts, &c, local_label, &mut wsum) };
    } else if poly && widest < p.opts.poly_x2_max {
        unsafe { grad_from_stash::<T, M, POLY_LONG>(&seg, &kept, &p.opts, &c, local_label, &mut wsum) };
    } else if poly && widest < p.opts.wide_x2_max {
        unsafe { grad_from_stash::<T, M, POLY_WIDE>(&seg, &kept, &p.opts, &c, local_label, &mut wsum) };
    } else if poly && p.opts.wide_x2_max > 0.0 {
        unsafe { grad_from_stash::<T, M, POLY_WIDE_FIX>(&seg, &kept, &p.opts, &c, local_label, &mut wsum) };
    } else if BULK_LOAD {
        unsafe { grad_from_stash::<T, M, POLY_NONE>(&seg, &kept, &p.opts, &c, local_label, &mut wsum) };
    } else {
        unsafe { grad_segment::<T, M, false>(&seg, Some(stash), None, &p.opts, &c, local_label, 0) };
    }
    stamp!(trace[7]);
    let mut total = total;
    if wsum_later {
        // Completes the cluster barrier arrived at above.
        total.wsum = unsafe { gather_wsum(p, wsum, label / p.chunk_len.max(1), owns_label) };
    }
    if owns_label && tid == 0 {
        unsafe { write_scored_row::<M>(p, row, &total, label, x_label, ctx.y_ref, &c) };
    }
    if !wsum_later {
        prim::cluster_wait();
    }
    #[cfg(xent_trace)]
    {
        trace[8] = prim::global_timer();
        if tid == 0 {
            for k in 0..10 {
                unsafe { prim::st_shared_u32(prim::smem_base() + SMEM_STASH_OFFSET + 4 * k, 0) };
            }
        }
    }
    unsafe { finish_if_last::<L>(p, owns_label) };
    #[cfg(xent_trace)]
    {
        trace[9] = prim::global_timer();
        unsafe { trace_out::<T>(&trace, &seg) };
    }
}

/// `--cfg xent_trace` builds: the timeline over the first 32 words of this CTA's chunk of the
/// gradient (after its own gradient stores, which the cluster barrier before ordered), by thread
/// 0: ten stamps from registers, five from `trace_mark`'s words (0: not reached), `%smid`, a mark.
#[cfg(all(xent_cluster, xent_trace))]
#[inline(always)]
unsafe fn trace_out<T: Element>(trace: &[u64; 10], seg: &Segment) {
    if thread_idx() == 0 {
        let at = seg.elem_addr::<T>(0);
        for (k, t) in trace.iter().enumerate() {
            unsafe {
                prim::st_global_u32(at + 8 * k as u64, *t as u32);
                prim::st_global_u32(at + 8 * k as u64 + 4, (*t >> 32) as u32);
            }
        }
        for k in 0..10 {
            let w = unsafe { prim::ld_shared_u32(prim::smem_base() + SMEM_STASH_OFFSET + 4 * k) };
            unsafe { prim::st_global_u32(at + 80 + 4 * k as u64, w) };
        }
        unsafe {
            prim::st_global_u32(at + 120, prim::sm_id());
            prim::st_global_u32(at + 124, 0x7ace_7ace);
        }
    }
}

/// [`cluster`]`::<T, L, Plain>` for a small call (`XentParams::self_finish`) of at most
/// [`SMALL_KERNEL_ROWS`](crate::abi::SMALL_KERNEL_ROWS) rows without loss options, ordered for
/// latency rather than traffic: each lane loads its rows' labels for the call's count (rows `i`
/// and `i + 32` in lane `i`, every warp) before the chunk's loads and classifies them after the
/// first pass, so the count's round trip overlaps the chunk's instead of coming before it; each
/// warp takes its CTA's row's target from its lane (no barrier, no second load of that label),
/// and the label's logit is loaded behind the first pass (this CTA alone writes its chunk, in its
/// gradient pass). The row's outputs and the done counter come before the gradient pass, and a
/// one-row call finishes from a register ([`finish_one_row`]). The same results, bit for bit: the
/// first pass needs no label without options (its context is label-free in `Plain`), the counts
/// are integers (any order sums them alike), and the rest is `cluster`'s. A row that is not
/// scored has its chunk loaded for nothing, at most 64 rows' worth.
///
/// Launch: as [`cluster`]'s, with `self_finish` set, at most `SMALL_KERNEL_ROWS` rows and no
/// class weights (the plain loss has none).
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn cluster_small<T: Element, L: Label>(p: &XentParams) {
    type M = opts::Plain;
    #[cfg(xent_trace)]
    let mut trace = [prim::global_timer(); 10];
    prim::grid_dependency_wait();
    stamp!(trace[1]);
    let (row, start, _, seg) = chunk_of::<T>(p);
    let tid = thread_idx();
    // This lane's rows of the count: `lane` and `lane + 32`.
    let lane = (tid % 32) as u64;
    let mut labels = [None; SMALL_LABELS];
    for (k, label) in labels.iter_mut().enumerate() {
        let count_row = lane + 32 * k as u64;
        if count_row < p.rows.n_rows {
            *label = unsafe { load_label::<L>(&p.rows, count_row) };
        }
    }
    let ctx = unsafe { row_ctx::<T, M>(p, row, 0, start) };
    let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
    let mut kept = Kept::EMPTY;
    let partial = if BULK_LOAD {
        unsafe { bulk_load_and_reduce::<T, M, false>(&seg, &mut kept, &p.opts, &ctx) }.0
    } else {
        unsafe { reduce_segment::<T, M>(&seg, Source::Keep(stash), &p.opts, &ctx) }
    };
    stamp!(trace[2]);
    let code = unsafe { count_small(p, labels, row) };
    let label = match Target::from_code(code) {
        Target::Class(label) => label,
        target => {
            if p.mode != MODE_FORWARD {
                unsafe { zero_segment::<T>(&seg, 0) };
            }
            if start == 0 && tid == 0 {
                unsafe { write_unscored_row::<M>(p, row, target) };
            }
            unsafe { finish_if_last::<L>(p, start == 0) };
            return;
        }
    };
    let local_label = label.wrapping_sub(start);
    let owns_label = local_label < seg.len;
    let x_label = if owns_label && tid == 0 {
        T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) })
    } else {
        0.0
    };
    stamp!(trace[3]);
    // Its barrier publishes thread 0's counts (`count_small`) to the call's scales below.
    let chunk = partial.block_merge_unsynced::<M>();
    let scales = unsafe { opts::CallScales::now::<M>(p) };
    stamp!(trace[4]);
    let total = unsafe { cluster_total::<M>(p, chunk, || {
        stamp!(trace[5]);
    }) };
    let c = unsafe { opts::coef_early::<M>(p, &total, label, start, scales) };
    // The row's outputs (`write_scored_row`, keeping the loss for a one-row call's finish) and,
    // with more rows, this CTA's count in the done counter, now rather than after the gradient:
    // the counter's round trip (its release waits for thread 0's row-output stores, not for its
    // gradient's) overlaps the gradient pass, and the last CTA to count finds every row written.
    let (mut loss, mut counted) = (0.0, 0);
    if tid == 0 {
        if owns_label {
            let lse = c.lse2 * LN_2;
            loss = unsafe { opts::row_loss::<M>(p, &total, label, x_label, ctx.y_ref, lse) };
            unsafe { write_row_outputs::<M>(p, row, loss, lse, total.wrong == 0) };
        }
        if p.rows.n_rows > 1 {
            let last = prim::grid_dim() - 1;
            counted = unsafe { prim::atom_inc_acq_rel_gpu_u32(p.counts + 4 * COUNT_DONE as u64, last) };
        }
    }
    stamp!(trace[6]);
    if p.mode != MODE_FORWARD {
        let mut wsum = 0.0;
        if BULK_LOAD {
            unsafe { grad_from_stash::<T, M, POLY_NONE>(&seg, &kept, &p.opts, &c, local_label, &mut wsum) };
        } else {
            unsafe { grad_segment::<T, M, false>(&seg, Some(stash), None, &p.opts, &c, local_label, 0) };
        }
    }
    stamp!(trace[7]);
    prim::cluster_wait();
    #[cfg(xent_trace)]
    {
        trace[8] = prim::global_timer();
        if tid == 0 {
            for k in 0..10 {
                unsafe { prim::st_shared_u32(prim::smem_base() + SMEM_STASH_OFFSET + 4 * k, 0) };
            }
        }
    }
    if p.rows.n_rows == 1 {
        unsafe { finish_one_row(p, owns_label, loss) };
    } else {
        unsafe { finish_if_last_counted::<L>(p, owns_label, Some(counted)) };
    }
    #[cfg(xent_trace)]
    {
        trace[9] = prim::global_timer();
        unsafe { trace_out::<T>(&trace, &seg) };
    }
}

/// [`finish_if_last`] for a one-row call of the plain loss ([`cluster_small`]), by the CTA that
/// wrote the row (`wrote`) from the row's `loss` in its thread 0's register, where `finish_rows`
/// reads it back from memory (a round trip through L2 at the call's end): the same operations in
/// the same order, so the same bits (the sum of one row is `loss + 0.0`; without z-loss and token
/// accuracy, which the plain loss has neither of, their sums are 0).
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn finish_one_row(p: &XentParams, wrote: bool, loss: f32) {
    prim::launch_dependents();
    if !wrote || thread_idx() != 0 {
        return;
    }
    let (valid, weight_bits) = unsafe { store_own_counts(p, 0) };
    // One row's sum (`finish_rows`: `0.0 + loss`, then the warp's `+ 0.0`s); no z-loss or token
    // accuracy in the plain loss.
    let ce = (0.0 + loss as f64) + 0.0;
    unsafe { store_call_loss(&finish_params(p), valid, weight_bits, ce, 0.0, 0) }
}

/// Labels a lane of [`cluster_small`] loads for the call's count (rows `lane` and `lane + 32`).
#[cfg(xent_cluster)]
const SMALL_LABELS: usize = 2;
#[cfg(xent_cluster)]
const _: () = assert!(SMALL_LABELS * 32 == crate::abi::SMALL_KERNEL_ROWS);

/// [`cluster_small`]'s count of the call's labels, from each lane's labels as loaded (`None` past
/// the rows, or where the shift ignores the row; lane `i` has rows `i` and `i + 32`): valid and
/// out-of-range rows, which warp 0 sums and its thread 0 stores at `SMEM_COUNTS` as
/// [`self_count`] does (the block's next barrier publishes them; counts are integers, so any
/// order gives `count_labels`' sums; no class weights in the plain loss, so their word is 0).
/// Returns row `row`'s [`Target::code`], from its lane, in every thread.
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn count_small(p: &XentParams, labels: [Option<i64>; SMALL_LABELS], row: u64) -> u32 {
    let tid = thread_idx();
    let lane = (tid % 32) as u64;
    let (mut valid, mut bad, mut codes) = (0u32, 0u32, [TARGET_IGNORED; SMALL_LABELS]);
    for (k, (&label, code)) in labels.iter().zip(codes.iter_mut()).enumerate() {
        if lane + 32 * (k as u64) < p.rows.n_rows {
            let target = classify_label(&p.rows, label);
            *code = target.code();
            match target {
                Target::Class(_) => valid += 1,
                Target::Bad => bad += 1,
                Target::Ignored => {}
            }
        }
    }
    // The same choice in every lane (`row` is the CTA's).
    let code = prim::shfl_idx_u32(if row < 32 { codes[0] } else { codes[1] }, (row % 32) as u32);
    if tid < 32 {
        let packed = valid | bad << 16;
        let packed = if p.rows.n_rows > 1 { reduce::warp_sum_u32(packed) } else { packed };
        if tid == 0 {
            let at = prim::smem_base() + SMEM_COUNTS;
            unsafe {
                prim::st_shared_u32(at, opts::pack_counts(packed & 0xffff, packed >> 16));
                prim::st_shared_u32(at + 4, 0);
            }
        }
    }
    code
}

/// The row's total over its cluster, from this CTA's summary of its chunk (`chunk`, a block
/// merge's, so every thread holds it): thread 0 publishes it in the CTA's cluster slot; past a
/// cluster barrier (where `at_barrier` runs: a trace stamp) lane `i` of every warp reads the slot
/// of CTA `i` (`i`, `i + 32`, ...) and the warp combines them. Then it arrives at the cluster
/// barrier again, done reading the other CTAs' slots: the caller's matching wait keeps this
/// CTA's slot alive until every CTA of the cluster has read it.
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn cluster_total<M: Mode>(p: &XentParams, chunk: Part, at_barrier: impl FnOnce()) -> Part {
    let slot = prim::smem_base() + crate::abi::SMEM_CLUSTER_SLOT;
    let tid = thread_idx();
    if tid == 0 {
        unsafe { chunk.st_shared::<M>(slot) };
    }
    prim::cluster_arrive();
    prim::cluster_wait();
    at_barrier();
    let mut acc = Part::EMPTY;
    let mut rank = tid % 32;
    while rank < p.n_chunks {
        let remote = prim::map_shared_rank(slot, rank);
        acc = acc.merge::<M>(unsafe { Part::ld_shared_cluster::<M>(remote) });
        rank += 32;
    }
    let total = acc.warp_merge::<M>();
    prim::cluster_arrive();
    total
}

/// The row's smoothing sum where the cluster kernel's gradient pass took it
/// ([`opts::Coef::wsum_later`]), from each thread's `share`: each CTA sums its threads' shares
/// (warp by warp, then the warps in order), and its thread 0 stores that into the slot of its rank
/// in the CTA of rank `owner` (the one holding the label, [`SMEM_WSUM_SLOTS`]), whose thread 0
/// sums the slots in rank order, so the sum does not depend on timing. The value is that sum in
/// the owner's thread 0 (`owns`), 0 elsewhere.
///
/// Waits at the cluster barrier the kernel arrived at after reading the chunk summaries (past it
/// every CTA has arrived there, so the owner's merge of its chunk summary, which used its whole
/// reduction scratch, is done and the slots are free), then takes one more arrive and wait, whose
/// release and acquire order the slot stores before the owner's reads. A CTA's own sum of its
/// warps' shares stays below the slots (one word a warp).
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn gather_wsum(p: &XentParams, share: f32, owner: u32, owns: bool) -> f32 {
    let (tid, warps) = (thread_idx(), prim::block_dim() / 32);
    let scratch = prim::smem_base();
    let warp_share = reduce::warp_sum_f32(share);
    if tid % 32 == 0 {
        unsafe { prim::st_shared_u32(scratch + 4 * (tid / 32), warp_share.to_bits()) };
    }
    prim::sync_threads();
    prim::cluster_wait();
    let slots = scratch + SMEM_WSUM_SLOTS;
    if tid == 0 {
        let mut sum = 0.0f32;
        for w in 0..warps {
            sum += f32::from_bits(unsafe { prim::ld_shared_u32(scratch + 4 * w) });
        }
        let rank = prim::block_idx() % p.n_chunks;
        unsafe { prim::st_shared_cluster_u32(prim::map_shared_rank(slots + 4 * rank, owner), sum.to_bits()) };
    }
    prim::cluster_arrive();
    prim::cluster_wait();
    let mut total = 0.0f32;
    if owns && tid == 0 {
        for rank in 0..p.n_chunks {
            total += f32::from_bits(unsafe { prim::ld_shared_u32(slots + 4 * rank) });
        }
    }
    total
}

/// How far ahead the soft-capped cluster kernels prefetch, in eighths of the rows the GPU holds
/// at once ([`prefetch_ahead`]). Session 30, 8192 x 128256, 4096 x 262144, 16384 x 151936 bf16
/// and 8192 x 128256 f16: one eighth took the soft cap from 79.8 / 74.3 / 76.5 / 80.6% of copy to
/// 81.5 / 76.7 / 80.3 / 82.4 (with token accuracy +0.6 to +1.3, all five options +0.2 to +1.2);
/// two eighths lost at 4096 x 262144 (70), a half and more lost everywhere (L2 thrashing), and
/// the plain kernels (at 92%) lost 1-4 points at two eighths, so only the soft cap's kernels
/// prefetch.
#[cfg(xent_cluster)]
const PREFETCH_EIGHTHS: u32 = 1;

/// Bulk copies the soft cap's cluster kernels load their chunk in ([`bulk_load_and_reduce`]).
/// Session 31, `cap_` kernels, % of copy at 8192 x 128256, 4096 x 262144 and 16384 x 151936 bf16
/// and 8192 x 128256 f16, one run, two rounds: 1 piece 81.7 / 76.9 / 80.6 / 82.6, 2 pieces 82.8 /
/// 79.7 / 81.1 / 83.1, 4 pieces 81.3 / 79.0 / 79.7 / 82.0; the final build against main in another
/// run: 81.8 / 77.0 / 80.5 / 82.7 -> 82.7 / 79.7 / 81.0 / 83.1 (f32 89.4 -> 89.6); session 32, 3
/// pieces: -0.6 to -0.9 against 2. With token accuracy (`capacc_`, which also runs all five
/// options) 2 pieces lost 0.7-1.8 points at 72 registers (session 31) and gained at 64, where four
/// 256-thread CTAs share an SM (session 32, soft cap + accuracy 67.5 / 65.5 / 71.2 / 69.0 -> 70.8
/// / 70.1 / 69.1 / 71.9, all five 51.0 / 48.3 / 54.5 / 51.7 -> 56.2 / 53.2 / 53.2 / 57.2; see
/// `xtask/src/ptx.rs`'s `TIGHT_CAPS`).
#[cfg(xent_cluster)]
const CAP_PIECES: u32 = 2;
// The pieces after the first have room for their mbarriers at `SMEM_PIECE_MBARRIERS`.
#[cfg(xent_cluster)]
const _: () = assert!(CAP_PIECES >= 1 && CAP_PIECES - 1 <= 4);

/// Resident threads an SM (sm_80 to sm_90).
#[cfg(xent_cluster)]
const SM_THREADS: u32 = 2048;
/// Shared memory an SM on the H100 and H200 (228 KiB), of which each resident CTA takes its
/// dynamic shared memory and [`CTA_RESERVED_SMEM_BYTES`].
#[cfg(xent_cluster)]
const SM_SMEM_BYTES: u32 = 228 * 1024;
/// Shared memory the hardware reserves for each resident CTA (1 KiB on sm_80 to sm_90).
#[cfg(xent_cluster)]
const CTA_RESERVED_SMEM_BYTES: u32 = 1024;

/// Brings this CTA's chunk of the row [`PREFETCH_EIGHTHS`] eighths of the resident rows after
/// `row` into L2 (`cp.async.bulk.prefetch.L2`, nothing waits for it), so HBM keeps reading while
/// the soft cap's two compute-heavy passes run, and the CTA that takes that row later finds its
/// bulk load in L2. The resident rows are estimated from the launch: CTAs an SM by threads and by
/// shared memory ([`SM_THREADS`], [`SM_SMEM_BYTES`], [`CTA_RESERVED_SMEM_BYTES`]), times
/// `%nsmid`, over the cluster size.
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn prefetch_ahead<T: Element>(p: &XentParams, seg: &Segment, row: u64) {
    let by_threads = SM_THREADS / prim::block_dim().max(1);
    let by_smem = SM_SMEM_BYTES / (prim::dynamic_smem_size() + CTA_RESERVED_SMEM_BYTES).max(1);
    let per_sm = by_threads.min(by_smem).max(1);
    let ahead = (PREFETCH_EIGHTHS * prim::sm_count() * per_sm / 8 / p.n_chunks.max(1)).max(1) as u64;
    if row + ahead < p.rows.n_rows {
        // The 16-byte aligned interior of that chunk (the prefetch needs 16-byte alignment and
        // must not reach past the logits).
        let delta = ahead * p.rows.row_stride * T::BYTES as u64;
        let lo = (seg.addr + delta + 15) & !15;
        let hi = (seg.elem_addr::<T>(seg.len) + delta) & !15;
        if hi > lo {
            unsafe { prim::bulk_prefetch_l2(lo, (hi - lo) as u32) };
        }
    }
}

/// Whether the cluster kernel loads its chunk with the sm_90 bulk-copy engine (one instruction,
/// no registers held) instead of 16-byte loads by every thread.
#[cfg(xent_cluster)]
const BULK_LOAD: bool = true;

/// Most vectors a thread of the cluster kernel keeps in registers.
#[cfg(xent_cluster)]
const KEEP_MAX: usize = CLUSTER_KEEP as usize;

/// What a thread of the cluster kernel holds between its chunk's load and its gradient: up to
/// `KEEP_MAX` vectors (raw words) and one scalar of the chunk's head or tail.
#[cfg(xent_cluster)]
struct Kept {
    words: [[u32; 4]; KEEP_MAX],
    scalar: u32,
}

#[cfg(xent_cluster)]
impl Kept {
    const EMPTY: Kept = Kept { words: [[0; 4]; KEEP_MAX], scalar: 0 };
}

/// Vectors per thread the cluster kernel keeps in registers in mode `M` (see
/// `CLUSTER_KEEP`); the host sizes shared memory from the same constant.
#[cfg(xent_cluster)]
#[inline(always)]
fn keep<M: Mode>() -> u32 {
    if M::FULL { 0 } else { CLUSTER_KEEP }
}

/// The cluster kernel's layout of a chunk: vectors `[0, in_regs)` in registers (vector
/// `t + k x threads` in thread `t`), vectors `[in_regs, n_vec)` in shared memory from
/// `smem_base + SMEM_STASH_OFFSET` on, the scalar head and tail in registers.
#[cfg(xent_cluster)]
#[inline(always)]
fn in_regs<M: Mode>(seg: &Segment) -> u32 {
    (keep::<M>() * prim::block_dim()).min(seg.n_vec)
}

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

/// Loads this thread's share of `seg` (layout: `in_regs`): thread 0 issues one bulk copy of the
/// shared-memory part (it completes on an mbarrier); meanwhile every thread loads its vectors
/// kept in registers and its scalar and adds them up; then the shared-memory part. Returns this
/// thread's share of the chunk summary and, with `FIXED` (see `add_vector`), the largest
/// `x²` of its elements (infinity without).
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn bulk_load_and_reduce<T: Element, M: Mode, const FIXED: bool>(
    seg: &Segment,
    kept: &mut Kept,
    o: &OptParams,
    ctx: &RowCtx,
) -> (Part, f32) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mbar = prim::smem_base() + crate::abi::SMEM_MBARRIER;
    let stash = prim::smem_base() + SMEM_STASH_OFFSET;
    let (keep, in_regs) = (keep::<M>(), in_regs::<M>(seg));
    let bulk_bytes = (seg.n_vec - in_regs) * 16;
    // The soft cap loads its chunk in `pieces` bulk copies ([`CAP_PIECES`]), each on its
    // own mbarrier (the first at `SMEM_MBARRIER`, the others at `SMEM_PIECE_MBARRIERS`), so the
    // first pass starts on a piece as soon as it lands. A piece is whole rounds of `step`
    // vectors, so each thread waits for a piece once.
    // The other kernels keep the one copy's code as it was (a loop over one piece changed their
    // code: the `wsm_` kernels spilled and the plain ones lost 0.5-1 point), so the first pass
    // has two loops over the stash below, one body (`first_pass_stashed`: a closure there was
    // not inlined, and its call brought core's panic into the PTX).
    let pieces = if M::CAP { CAP_PIECES } else { 1 };
    let (round_bytes, piece_rounds) = if pieces > 1 {
        let round_bytes = step * 16;
        (round_bytes, bulk_bytes.div_ceil(round_bytes.max(1)).div_ceil(pieces).max(1))
    } else {
        (0, 0)
    };
    let piece_mbar = |k: u32| if k == 0 { mbar } else { prim::smem_base() + SMEM_PIECE_MBARRIERS + 8 * (k - 1) };
    if pieces == 1 {
        if tid == 0 {
            unsafe { prim::mbarrier_init(mbar, 1) };
            prim::fence_mbarrier_init();
        }
        prim::sync_threads();
        if tid == 0 && bulk_bytes > 0 {
            unsafe {
                prim::mbarrier_arrive_expect_tx(mbar, bulk_bytes);
                prim::bulk_copy_to_shared(stash, seg.elem_addr::<T>(seg.vec_start::<T>(in_regs)), bulk_bytes, mbar);
            }
        }
    } else {
        if tid == 0 {
            for k in 0..pieces {
                unsafe { prim::mbarrier_init(piece_mbar(k), 1) };
            }
            prim::fence_mbarrier_init();
        }
        prim::sync_threads();
    }
    if pieces > 1 && tid == 0 && bulk_bytes > 0 {
        let src = seg.elem_addr::<T>(seg.vec_start::<T>(in_regs));
        for k in 0..pieces {
            let lo = (k * piece_rounds * round_bytes).min(bulk_bytes);
            let hi = ((k + 1) * piece_rounds * round_bytes).min(bulk_bytes);
            if hi > lo {
                unsafe {
                    prim::mbarrier_arrive_expect_tx(piece_mbar(k), hi - lo);
                    prim::bulk_copy_to_shared(stash + lo, src + lo as u64, hi - lo, piece_mbar(k));
                }
            }
        }
    }
    for_kept!(M, k => {
        let v = tid + k as u32 * step;
        if (k as u32) < keep && v < in_regs {
            kept.words[k] = unsafe { prim::ld_global_v4(seg.elem_addr::<T>(seg.vec_start::<T>(v))) };
        }
    });
    let mut acc = Part::EMPTY;
    let fixed = M::CAP && FIXED;
    let mut widest = if fixed { 0.0 } else { f32::INFINITY };
    if fixed {
        acc.lse.m = o.softcap * core::f32::consts::LOG2_E;
    }
    let keep_t = keeps_t::<T, M>();
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        kept.scalar = unsafe { T::ld_global_raw(seg.elem_addr::<T>(j)) };
        if M::CAP {
            let mut x = [0.0; 8];
            x[0] = T::widen(kept.scalar);
            let t = unsafe { add_vector::<M, FIXED>(&mut acc, &mut widest, x, 1, j, o, ctx, keep_t) };
            if keep_t {
                kept.scalar = t[0].to_bits();
            }
        } else {
            unsafe { add_scalar::<M>(&mut acc, T::widen(kept.scalar), j, o, ctx) };
        }
    }
    for_kept!(M, k => {
        let v = tid + k as u32 * step;
        if (k as u32) < keep && v < in_regs {
            let x = T::unpack(kept.words[k]);
            let t = unsafe { add_vector::<M, FIXED>(&mut acc, &mut widest, x, T::VEC, seg.vec_start::<T>(v), o, ctx, keep_t) };
            if keep_t {
                kept.words[k] = T::pack(&t);
            }
        }
    });
    if pieces == 1 {
        if bulk_bytes > 0 {
            while !unsafe { prim::mbarrier_try_wait(mbar, 0) } {}
        }
        let mut v = in_regs + tid;
        while v < seg.n_vec {
            unsafe { first_pass_stashed::<T, M, FIXED>(&mut acc, &mut widest, seg, stash + (v - in_regs) * 16, v, o, ctx, keep_t) };
            v += step;
        }
    } else {
        let mut v = in_regs + tid;
        for k in 0..pieces {
            let end = (in_regs + (k + 1) * piece_rounds * step).min(seg.n_vec);
            if v < end {
                while !unsafe { prim::mbarrier_try_wait(piece_mbar(k), 0) } {}
            }
            while v < end {
                unsafe { first_pass_stashed::<T, M, FIXED>(&mut acc, &mut widest, seg, stash + (v - in_regs) * 16, v, o, ctx, keep_t) };
                v += step;
            }
        }
        // Every piece has landed (thread 0 waited for each: it has a vector in every round) and
        // no thread polls their mbarriers any more; then they are invalidated, and in blocks
        // whose merge reaches them (more than 14 warps) nothing stores there before that.
        // Session 31: this barrier also paid (without it, 256-thread CTAs at 8192 x 128256 lost
        // the pieces' gain).
        prim::sync_threads();
        if tid == 0 {
            for k in 1..pieces {
                unsafe { prim::mbarrier_inval(piece_mbar(k)) };
            }
        }
        if step > 32 * (SMEM_PIECE_MBARRIERS / 16) {
            prim::sync_threads();
        }
    }
    (acc, widest)
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

/// The gradient of `seg` from what `bulk_load_and_reduce` left: the vectors and scalar this
/// thread kept, and the shared-memory part, one vector at a time (few registers held).
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn grad_from_stash<T: Element, M: Mode, const POLY: u8>(
    seg: &Segment,
    kept: &Kept,
    o: &OptParams,
    c: &Coef,
    label: u32,
    wsum: &mut f32,
) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let stash = prim::smem_base() + SMEM_STASH_OFFSET;
    let (keep, in_regs) = (keep::<M>(), in_regs::<M>(seg));
    // With the soft cap in f32 the first pass left `t = tanh(x / cap)` in place of `x`
    // (`keeps_t`); with `POLY_LONG`, `POLY_SHORT` or `POLY_WIDE` (every element of this warp's
    // vectors below `poly_x2_max`, `short_x2_max` or `wide_x2_max` in the first pass) `t` comes
    // from that polynomial without the check; `POLY_WIDE_FIX` checks a vector at a time.
    let keep_t = keeps_t::<T, M>();
    let cap_log2e = if M::CAP { o.softcap * core::f32::consts::LOG2_E } else { 0.0 };
    // `grad_vector` is a function, not a closure: LLVM declined to inline the closure once it had
    // four arms, and the call took `o`'s address, which copied the whole parameter block to local
    // memory.
    for_kept!(M, k => {
        let v = tid + k as u32 * step;
        if (k as u32) < keep && v < in_regs {
            let start = seg.vec_start::<T>(v);
            let x = T::unpack(kept.words[k]);
            let g = unsafe { grad_vector::<T, M, POLY>(x, start, label, o, c, cap_log2e, wsum) };
            unsafe { prim::st_global_v4(seg.elem_addr::<T>(start), T::pack(&g)) };
        }
    });
    // The stashed vectors' loop leaves the label out (no compare a vector): its vector is written
    // again below, with the label's term, by the thread that wrote it (so the second store wins).
    // Two copies of the loop, one for each form of the soft cap's gradient (`Coef::lse2_a` NaN or
    // not), so the choice is made once, not a vector at a time.
    // Class-weighted smoothing without the soft cap (`wsm_`, capped at 56 registers) keeps the
    // compare in the loop: the rewrite after it spilled 4 bytes there.
    let label_after = !(M::WSMOOTH && !M::CAP);
    if !label_after {
        let mut v = in_regs + tid;
        while v < seg.n_vec {
            let start = seg.vec_start::<T>(v);
            let x = T::unpack(unsafe { prim::ld_shared_v4(stash + (v - in_regs) * 16) });
            let g = unsafe { grad_vector::<T, M, POLY>(x, start, label, o, c, cap_log2e, wsum) };
            unsafe { prim::st_global_v4(seg.elem_addr::<T>(start), T::pack(&g)) };
            v += step;
        }
    } else if M::CAP && c.lse2_a.is_nan() {
        unsafe { grad_stashed::<T, M, POLY>(seg, o, c, cap_log2e, wsum) };
    } else {
        unsafe { grad_stashed::<T, M, POLY>(seg, o, c, cap_log2e, wsum) };
    }
    let label_vec = label.wrapping_sub(seg.head) / T::VEC as u32;
    if label_after && label >= seg.head && label_vec < seg.n_vec && label_vec >= in_regs && label_vec % step == tid {
        let start = seg.vec_start::<T>(label_vec);
        let x = T::unpack(unsafe { prim::ld_shared_v4(stash + (label_vec - in_regs) * 16) });
        // Its share of the smoothing sum is in `wsum` already.
        let g = unsafe { grad_vector::<T, M, POLY>(x, start, label, o, c, cap_log2e, &mut 0.0) };
        unsafe { prim::st_global_v4(seg.elem_addr::<T>(start), T::pack(&g)) };
    }
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let g = if keep_t {
            opts::grad_from_t::<M, 1>([f32::from_bits(kept.scalar)], 1, j, label, c, cap_log2e, wsum)
        } else {
            unsafe { opts::grad_values_summing::<M, 1>(o, [T::widen(kept.scalar)], 1, j, label, c, wsum) }
        };
        unsafe { T::store_global(seg.elem_addr::<T>(j), g[0]) };
    }
}

/// [`grad_from_stash`]'s loop over the vectors in shared memory, without the label's term.
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn grad_stashed<T: Element, M: Mode, const POLY: u8>(seg: &Segment, o: &OptParams, c: &Coef, cap_log2e: f32, wsum: &mut f32) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let in_regs = in_regs::<M>(seg);
    let mut v = in_regs + tid;
    // Running addresses: the stash slot and the vector in global memory.
    let mut at = prim::smem_base() + SMEM_STASH_OFFSET + tid * 16;
    let mut dst = seg.elem_addr::<T>(seg.vec_start::<T>(v));
    while v < seg.n_vec {
        let start = seg.vec_start::<T>(v);
        let x = T::unpack(unsafe { prim::ld_shared_v4(at) });
        // `start - 1` is before the vector: LLVM folds the label's compare away.
        let g = unsafe { grad_vector::<T, M, POLY>(x, start, start.wrapping_sub(1), o, c, cap_log2e, wsum) };
        unsafe { prim::st_global_v4(dst, T::pack(&g)) };
        v += step;
        at += step * 16;
        dst += step as u64 * 16;
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
