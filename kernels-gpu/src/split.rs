//! The split plan's kernels (sm_80: rows longer than one block's shared memory, each logit still
//! read once): a row cut into chunks over a group of co-resident CTAs (a cooperative launch) whose
//! (max, sum) summaries meet in global memory. [`split`] keeps each CTA's chunk in shared memory;
//! [`split_l2`] leaves it in L2 and reduces a row ahead. Their passes over a chunk are the
//! cross-entropy kernels' own (`crate::xent`).

use crate::abi::{MODE_FORWARD, OptParams, PARTIAL_WORDS, SMEM_STASH_OFFSET, XentParams};
use crate::element::{Element, Label};
use crate::opts::{self, Coef, Mode, Part, RowCtx};
use crate::prim::{self, thread_idx};
use crate::reduce;
use crate::xent::{
    POLY_LONG, POLY_NONE, POLY_SHORT, POLY_WIDE, POLY_WIDE_FIX, Segment, Source, Target, UNROLL, add_vector, first_pass_stashed,
    fold_batch, fold_scalar, grad_batch, grad_scalar, grad_segment, grad_vector, keeps_t, load_batch, reduce_segment, row_addr,
    row_ctx, row_target, write_scored_row, write_unscored_row, zero_segment,
};
use core::f32::consts::LOG2_E;

/// [`grad_segment`] from `stash` (not `Full`; in place), with the group's next row `next` (a
/// segment of the same length and address modulo 16) copied into the stash behind it and reduced
/// a batch behind: for each batch of `UNROLL` vectors a thread reads its slots, writes their
/// gradient, copies (`cp.async`) `next`'s vectors into them, each behind the store that used the
/// slot, and commits the batch's copies; then it reduces the batch before from the stash once
/// that batch's copies have landed (`cp.async.wait_group 1`; each thread reads back only the
/// vectors it copied). Returns this thread's share of `next`'s summary, as `reduce_segment` with
/// a stash would (`next_ctx` placing `next` in its row), so the next row's reads overlap this
/// row's writes and its reduction is done when they are. With `FOLD` (plain kernels, [`Coef::lse2_a`]
/// not NaN) the gradient's scale rides in the exponent ([`opts::grad_values_folded`]).
#[inline(always)]
unsafe fn grad_and_reduce_next<T: Element, M: Mode, const FOLD: bool>(
    seg: &Segment,
    stash: u32,
    o: &OptParams,
    c: &Coef,
    label: u32,
    next: &Segment,
    next_ctx: &RowCtx,
) -> Part {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mut acc = Part::EMPTY;
    // The first vector of the batch whose copies are in flight (`u32::MAX`: none yet).
    let mut in_flight = u32::MAX;
    let mut v = tid;
    let stashed = |start: u32| unsafe { prim::ld_shared_v4(stash + start * T::BYTES) };
    let copy_next = |start: u32| unsafe { prim::cp_async_16(stash + start * T::BYTES, next.elem_addr::<T>(start), true) };
    while v < seg.n_vec {
        let words = load_batch::<T>(seg, v, step, stashed);
        unsafe { grad_batch::<T, M, FOLD>(seg, &words, v, step, o, c, label, 0, copy_next) };
        prim::cp_async_commit();
        if in_flight != u32::MAX {
            prim::cp_async_wait_one();
            let words = load_batch::<T>(next, in_flight, step, stashed);
            unsafe { fold_batch::<T, M>(next, &words, in_flight, step, o, next_ctx, &mut acc, |_, _| {}) };
        }
        in_flight = v;
        v += UNROLL * step;
    }
    if in_flight != u32::MAX {
        prim::cp_async_wait_all();
        let words = load_batch::<T>(next, in_flight, step, stashed);
        unsafe { fold_batch::<T, M>(next, &words, in_flight, step, o, next_ctx, &mut acc, |_, _| {}) };
    }
    // The scalar head and tail: this row's gradient, then the next row's elements in their slots.
    unsafe { grad_scalar::<T, M>(seg, Some(stash), o, c, label, 0) };
    unsafe { fold_scalar::<T, M>(next, Some(stash), o, next_ctx, &mut acc) };
    acc
}

/// The soft cap's first pass over a split CTA's chunk `seg`, one vector at a time from the stash
/// (the cluster kernels' [`first_pass_stashed`]: fewer registers held, 53-96 uncapped where the
/// batched [`reduce_segment`] of `UNROLL` vectors held 122-126, and fewer instructions an element:
/// no running maximum, the exponent straight from `x`). With `copy` each thread first copies its vectors into the stash (`cp.async`, one
/// wait); without, the row before's gradient copied them there (`Ahead::Copied`). The scalar head
/// and tail are read from global memory and kept in the stash (with [`keeps_t`], as `t`). With
/// `FIXED` the sum is taken against the fixed reference `cap·log2(e)` ([`add_vector`]). Returns
/// this thread's share of the chunk summary and, with `FIXED`, the largest `x²` of its elements
/// (infinity without), which picks [`cap_grad`]'s polynomial.
#[inline(always)]
pub(crate) unsafe fn cap_first_pass<T: Element, M: Mode, const FIXED: bool>(
    seg: &Segment,
    stash: u32,
    copy: bool,
    o: &OptParams,
    ctx: &RowCtx,
) -> (Part, f32) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    if copy {
        let mut v = tid;
        while v < seg.n_vec {
            let start = seg.vec_start::<T>(v);
            unsafe { prim::cp_async_16(stash + start * T::BYTES, seg.elem_addr::<T>(start), true) };
            v += step;
        }
        prim::cp_async_commit();
    }
    let mut acc = Part::EMPTY;
    let mut widest = if FIXED { 0.0 } else { f32::INFINITY };
    if FIXED {
        acc.lse.m = o.softcap * LOG2_E;
    }
    let keep_t = keeps_t::<T, M>();
    // The scalar while the copies are in flight.
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe { T::ld_global_raw(seg.elem_addr::<T>(j)) };
        let mut x = [0.0; 8];
        x[0] = T::widen(raw);
        let t = unsafe { add_vector::<M, FIXED>(&mut acc, &mut widest, x, 1, j, o, ctx, keep_t) };
        unsafe { T::st_shared_raw(stash + j * T::BYTES, if keep_t { t[0].to_bits() } else { raw }) };
    }
    prim::cp_async_wait_all();
    let mut v = tid;
    while v < seg.n_vec {
        let at = stash + seg.vec_start::<T>(v) * T::BYTES;
        unsafe { first_pass_stashed::<T, M, FIXED>(&mut acc, &mut widest, seg, at, v, o, ctx, keep_t) };
        v += step;
    }
    (acc, widest)
}

/// The soft cap's gradient of `seg` from the stash [`cap_first_pass`] filled, one vector at a
/// time, `t` from the shortest polynomial that held for every element of the warp's vectors in
/// that pass (`widest`, this thread's largest `x²`; the cluster kernel's choice), with the group's
/// next row `next` (a segment of the same length and address modulo 16) copied into each slot
/// behind the store that used it (`cp.async`, committed at the end).
#[inline(always)]
pub(crate) unsafe fn cap_grad<T: Element, M: Mode>(
    seg: &Segment,
    stash: u32,
    next: Option<&Segment>,
    o: &OptParams,
    c: &Coef,
    label: u32,
    widest: f32,
) {
    // With `keeps_t` (f32) the stash holds `t`: no polynomial.
    let poly = !keeps_t::<T, M>();
    let widest = if poly { f32::from_bits(prim::warp_max_u32(widest.to_bits())) } else { widest };
    unsafe {
        if poly && widest < o.short_x2_max {
            cap_grad_with::<T, M, POLY_SHORT>(seg, stash, next, o, c, label)
        } else if poly && widest < o.poly_x2_max {
            cap_grad_with::<T, M, POLY_LONG>(seg, stash, next, o, c, label)
        } else if poly && widest < o.wide_x2_max {
            cap_grad_with::<T, M, POLY_WIDE>(seg, stash, next, o, c, label)
        } else if poly && o.wide_x2_max > 0.0 {
            cap_grad_with::<T, M, POLY_WIDE_FIX>(seg, stash, next, o, c, label)
        } else {
            cap_grad_with::<T, M, POLY_NONE>(seg, stash, next, o, c, label)
        }
    }
}

/// [`cap_grad`] with its polynomial chosen.
#[inline(always)]
unsafe fn cap_grad_with<T: Element, M: Mode, const POLY: u8>(
    seg: &Segment,
    stash: u32,
    next: Option<&Segment>,
    o: &OptParams,
    c: &Coef,
    label: u32,
) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let cap_log2e = o.softcap * LOG2_E;
    let mut v = tid;
    while v < seg.n_vec {
        let start = seg.vec_start::<T>(v);
        let at = stash + start * T::BYTES;
        let x = T::unpack(unsafe { prim::ld_shared_v4(at) });
        let g = unsafe { grad_vector::<T, M, POLY>(x, start, label, o, c, cap_log2e, &mut 0.0) };
        unsafe { prim::st_global_v4(seg.elem_addr::<T>(start), T::pack(&g)) };
        if let Some(next) = next {
            unsafe { prim::cp_async_16(at, next.elem_addr::<T>(start), true) };
        }
        v += step;
    }
    if next.is_some() {
        prim::cp_async_commit();
    }
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe { T::ld_shared_raw(stash + j * T::BYTES) };
        let g = if keeps_t::<T, M>() {
            opts::grad_from_t::<M, 1>([f32::from_bits(raw)], 1, j, label, c, cap_log2e, &mut 0.0)
        } else {
            unsafe { opts::grad_values::<M, 1>(o, [T::widen(raw)], 1, j, label, c) }
        };
        unsafe { T::store_global(seg.elem_addr::<T>(j), g[0]) };
    }
}

/// What a split CTA's gradient of one row did for its group's next row (see [`split`]).
#[derive(Clone, Copy)]
enum Ahead {
    Nothing,
    /// Copied its chunk into the stash (`cp.async`, committed).
    Copied,
    /// Copied and reduced it: this thread's share of its summary.
    Reduced(Part),
}

/// Whether the split kernels of `M` reduce the next row during this row's gradient
/// ([`grad_and_reduce_next`]) or only copy it ([`grad_segment`] with `next`, or for the soft cap
/// [`cap_grad`]): only the plain ones (78-80 registers, three CTAs an SM). The per-row constant
/// and token accuracy kernels (capped at 80) spill 24 and 116 bytes doing both; the soft cap's
/// batched kernels of session 19 fell from 37.8 to 30.3% of copy with it (8192 x 128256 bf16, A100
/// limits), and weighted smoothing's is of the same build.
const fn reduce_ahead<M: Mode>() -> bool {
    !M::OPTS
}

/// Polls of a group's counter before the split kernel gives up (each a round trip to L2 of about
/// half a microsecond: seconds, where a group waits microseconds).
const SPLIT_MAX_SPINS: u32 = 1 << 24;

/// Split plan (sm_80: rows longer than one block's shared memory, each logit still read once):
/// a row is cut into `n_chunks` chunks of `chunk_len`, one per CTA of a group of `n_chunks`
/// CTAs; the launch is cooperative, so every CTA is resident at once, and the `grid / n_chunks`
/// groups walk the rows (group `g` takes rows `g, g + groups, ...`). Each CTA keeps its chunk in
/// shared memory, stores its summary in `partials`, counts itself in on its group's counter
/// (release), waits until the whole group has (acquire), merges the group's summaries in a fixed
/// order (every CTA gets the same bits) and writes its chunk's gradient from shared memory. The
/// plain kernels wait on tagged summaries instead of the counter (below, `tagged`).
///
/// `partials`: `groups x 2 x n_chunks` summaries (`PARTIAL_WORDS` each; the two halves
/// alternate between a group's rows, so a CTA that runs ahead never overwrites a summary another
/// still reads), then `groups` counters that must be 0 at launch.
///
/// Launch: cooperative, grid = groups * n_chunks, block = a multiple of 32 threads, dynamic
/// shared memory = `SMEM_STASH_OFFSET + 16 + chunk_len * BYTES`.
#[inline(always)]
pub unsafe fn split<T: Element, L: Label, M: Mode>(p: &XentParams) {
    let tid = thread_idx();
    let n_chunks = p.n_chunks;
    let (group, chunk) = prim::div_rem(prim::block_idx() as u64, n_chunks as u64);
    let groups = (prim::grid_dim() / n_chunks) as u64;
    let summary_bytes = 4 * PARTIAL_WORDS as u64;
    let counter = p.partials + groups * 2 * n_chunks as u64 * summary_bytes + 4 * group;
    // Summary `q` of the group's half `half`.
    let slot = |half: u32, q: u32| {
        p.partials + ((group * 2 + half as u64) * n_chunks as u64 + q as u64) * summary_bytes
    };
    let local = chunk as u32 * p.chunk_len;
    let len = p.chunk_len.min(p.rows.vocab.saturating_sub(local));
    let seg_of = |row: u64| Segment::new::<T>(row_addr::<T>(&p.rows, row) + local as u64 * T::BYTES as u64, len);
    // The plain loss's summary (two words) rides in its slot as two (word, tag) pairs, the tag
    // the group's scored-row count plus one: a CTA waits on the slots themselves, not on the
    // counter, so its handshake needs no release (which would wait for its own gradient stores
    // to drain) and one round trip to L2 fewer. The slots are cleared once a launch (a summary of
    // an earlier call could carry a tag this one expects), behind the launch's one counter wait.
    // A slot's two halves alternate between rows without a release: a reader's loads of row r's
    // summaries have returned before its CTA stores row r + 1's (their values feed the gradient
    // before the row's closing barrier), and a writer stores row r + 2's only after it has seen
    // every CTA's row r + 1 summary.
    let tagged = !M::OPTS;
    if tagged {
        if tid == 0 {
            unsafe {
                for half in 0..2 {
                    prim::st_relaxed_gpu_u64(slot(half, chunk as u32), 0);
                    prim::st_relaxed_gpu_u64(slot(half, chunk as u32) + 8, 0);
                }
                prim::red_add_release_gpu_u32(counter, 1);
                wait_for_count(counter, n_chunks);
            }
            prim::fence_acq_rel_gpu();
        }
        prim::sync_threads();
    }
    // Rows this group has scored so far: the counter's target is `n_chunks` per scored row.
    let mut scored = 0u32;
    // What the last row's gradient did for this one.
    let mut ahead = Ahead::Nothing;
    let mut row = group;
    while row < p.rows.n_rows {
        let seg = seg_of(row);
        match unsafe { row_target::<L>(&p.rows, row) } {
            Target::Class(label) => {
                let local_label = label.wrapping_sub(local);
                let owns_label = local_label < seg.len;
                // Read before the block's first barrier; every gradient write comes after it.
                let x_label = if owns_label && tid == 0 {
                    T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) })
                } else {
                    0.0
                };
                let ctx = unsafe { row_ctx::<T, M>(p, row, label, local) };
                let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
                // The soft cap's passes take one vector at a time from the stash ([`cap_first_pass`]).
                let mut widest = f32::INFINITY;
                let part = if M::CAP {
                    let copy = !matches!(ahead, Ahead::Copied);
                    let (part, w) = if p.opts.softcap <= opts::FIXED_CAP_MAX {
                        unsafe { cap_first_pass::<T, M, true>(&seg, stash, copy, &p.opts, &ctx) }
                    } else {
                        unsafe { cap_first_pass::<T, M, false>(&seg, stash, copy, &p.opts, &ctx) }
                    };
                    widest = w;
                    part
                } else {
                    match ahead {
                        Ahead::Reduced(part) => part,
                        Ahead::Copied => {
                            prim::cp_async_wait_all();
                            unsafe { reduce_segment::<T, M>(&seg, Source::Stashed(stash), &p.opts, &ctx) }
                        }
                        Ahead::Nothing => unsafe { reduce_segment::<T, M>(&seg, Source::Keep(stash), &p.opts, &ctx) },
                    }
                };
                // The scratch is written next by the next row's merge, after the barrier below.
                let part = part.block_merge_unsynced::<M>();
                // The group's next row, copied behind this row's gradient (and reduced there, see
                // [`reduce_ahead`]) where it is scored and its chunk lies as this one modulo 16 (rows
                // of a multiple of 16 bytes); not for the per-element options (`Full`), bound by
                // their arithmetic, not their loads.
                let next_row = row + groups;
                let next_seg = seg_of(next_row);
                let next_target = match next_row < p.rows.n_rows {
                    true => unsafe { row_target::<L>(&p.rows, next_row) },
                    false => Target::Ignored,
                };
                ahead = Ahead::Nothing;
                let half = scored & 1;
                let tag = ((scored + 1) as u64) << 32;
                if tagged {
                    if tid == 0 {
                        unsafe {
                            prim::st_relaxed_gpu_u64(slot(half, chunk as u32), part.lse.m.to_bits() as u64 | tag);
                            prim::st_relaxed_gpu_u64(slot(half, chunk as u32) + 8, part.lse.s.to_bits() as u64 | tag);
                        }
                    }
                } else {
                    if tid == 0 {
                        unsafe {
                            part.st_global::<M>(slot(half, chunk as u32));
                            prim::red_add_release_gpu_u32(counter, 1);
                            wait_for_count(counter, n_chunks * (scored + 1));
                        }
                        prim::fence_acq_rel_gpu();
                    }
                    prim::sync_threads();
                }
                // Every warp merges the group's summaries itself (lane i reads summary i, i + 32,
                // ...): the same bits in every warp and every CTA of the group, no barrier.
                let mut acc = Part::EMPTY;
                let mut q = tid % 32;
                while q < n_chunks {
                    let summary = if tagged {
                        let (m, s) = unsafe { wait_for_tagged(slot(half, q), tag) };
                        Part { lse: reduce::Lse2 { m, s }, ..Part::EMPTY }
                    } else {
                        unsafe { Part::ld_global_cg::<M>(slot(half, q)) }
                    };
                    acc = acc.merge::<M>(summary);
                    q += 32;
                }
                let total = acc.warp_merge::<M>();
                let c = unsafe { opts::coef::<M>(p, &total, label, local) };
                if p.mode != MODE_FORWARD {
                    match next_target {
                        Target::Class(next_label) if !M::FULL && (next_seg.addr ^ seg.addr) & 15 == 0 => {
                            if M::CAP {
                                unsafe { cap_grad::<T, M>(&seg, stash, Some(&next_seg), &p.opts, &c, local_label, widest) };
                                ahead = Ahead::Copied;
                            } else if reduce_ahead::<M>() {
                                let next_ctx = unsafe { row_ctx::<T, M>(p, next_row, next_label, local) };
                                ahead = Ahead::Reduced(unsafe {
                                    if !M::OPTS && !c.lse2_a.is_nan() {
                                        grad_and_reduce_next::<T, M, true>(&seg, stash, &p.opts, &c, local_label, &next_seg, &next_ctx)
                                    } else {
                                        grad_and_reduce_next::<T, M, false>(&seg, stash, &p.opts, &c, local_label, &next_seg, &next_ctx)
                                    }
                                });
                            } else {
                                unsafe { grad_segment::<T, M, false>(&seg, Some(stash), Some(&next_seg), &p.opts, &c, local_label, 0) };
                                ahead = Ahead::Copied;
                            }
                        }
                        _ if M::CAP => unsafe { cap_grad::<T, M>(&seg, stash, None, &p.opts, &c, local_label, widest) },
                        _ => unsafe { grad_segment::<T, M, false>(&seg, Some(stash), None, &p.opts, &c, local_label, 0) },
                    }
                }
                if owns_label && tid == 0 {
                    unsafe { write_scored_row::<M>(p, row, &total, label, x_label, ctx.y_ref, &c) };
                }
                scored += 1;
            }
            target => {
                if p.mode != MODE_FORWARD {
                    unsafe { zero_segment::<T>(&seg, 0) };
                }
                if chunk == 0 && tid == 0 {
                    unsafe { write_unscored_row::<M>(p, row, target) };
                }
            }
        }
        // The stash and the reduction scratch serve the next row.
        prim::sync_threads();
        row += groups;
    }
}

/// [`SPLIT_L2_SLOTS`](crate::abi::SPLIT_L2_SLOTS) as the address arithmetic takes it.
const SPLIT_L2_SLOTS: u64 = crate::abi::SPLIT_L2_SLOTS as u64;

/// A row between a [`split_l2`] CTA's two passes.
#[derive(Clone, Copy)]
struct Reduced {
    row: u64,
    target: Target,
    /// The label's logit, read by thread 0 of the CTA whose chunk holds it, before any gradient
    /// of the row is written.
    x_label: f32,
    y_ref: f32,
    /// Scored rows of the group before this one: its summaries' slot and (plus one) tag.
    index: u32,
}

/// Split plan with the chunks left in L2 (sm_80, plain loss; `PlanChoice::SplitL2`): as in
/// [`split`], a row is cut into `n_chunks` chunks, one per CTA of a group of a cooperative launch,
/// and the groups walk the rows; but no CTA keeps its chunk on chip. A CTA reduces its chunk of a
/// row (read from HBM), stores its summary, and reduces its chunk of the group's next row before it
/// merges the first row's summaries and writes that row's gradient, reading the chunk again: from
/// L2, where it was read one row earlier. The wait for the group is a row behind the CTA's own
/// reads, and without a stash in shared memory, registers alone limit the resident CTAs. The
/// summaries travel tagged as in [`split`] (two `(value, tag)` words, the tag the group's scored
/// rows before the row plus one), in [`SPLIT_L2_SLOTS`] slots a CTA.
///
/// `partials`: `groups x SPLIT_L2_SLOTS x n_chunks` summaries of 16 bytes, then `groups`
/// counters that must be 0 at launch.
///
/// Launch: cooperative, grid = groups * n_chunks, block = a multiple of 32 threads, dynamic
/// shared memory at least `SMEM_STASH_OFFSET` (the reduction scratch; the host plans one batch a
/// thread more, `plan::split_l2_smem_bytes`, which a staged variant uses).
#[inline(always)]
pub unsafe fn split_l2<T: Element, L: Label, M: Mode>(p: &XentParams) {
    let tid = thread_idx();
    let n_chunks = p.n_chunks;
    let (group, chunk) = prim::div_rem(prim::block_idx() as u64, n_chunks as u64);
    let groups = (prim::grid_dim() / n_chunks) as u64;
    let counter = p.partials + groups * SPLIT_L2_SLOTS * n_chunks as u64 * 16 + 4 * group;
    // Chunk `q`'s summary of the group's scored row `index`.
    let slot = |index: u32, q: u32| {
        p.partials + ((group * SPLIT_L2_SLOTS + index as u64 % SPLIT_L2_SLOTS) * n_chunks as u64 + q as u64) * 16
    };
    let local = chunk as u32 * p.chunk_len;
    let len = p.chunk_len.min(p.rows.vocab.saturating_sub(local));
    let seg_of = |row: u64| Segment::new::<T>(row_addr::<T>(&p.rows, row) + local as u64 * T::BYTES as u64, len);
    // This CTA's slots, cleared behind the launch's one counter wait (see `split`).
    if tid == 0 {
        unsafe {
            for index in 0..SPLIT_L2_SLOTS as u32 {
                prim::st_relaxed_gpu_u64(slot(index, chunk as u32), 0);
                prim::st_relaxed_gpu_u64(slot(index, chunk as u32) + 8, 0);
            }
            prim::red_add_release_gpu_u32(counter, 1);
            wait_for_count(counter, n_chunks);
        }
        prim::fence_acq_rel_gpu();
    }
    prim::sync_threads();
    let mut scored = 0u32;
    // The row reduced one step ago, whose gradient this step writes.
    let mut behind: Option<Reduced> = None;
    let mut row = group;
    loop {
        // First pass over this step's row.
        let ahead = if row < p.rows.n_rows {
            let seg = seg_of(row);
            let target = unsafe { row_target::<L>(&p.rows, row) };
            let mut reduced = Reduced { row, target, x_label: 0.0, y_ref: 0.0, index: scored };
            if let Target::Class(label) = target {
                let local_label = label.wrapping_sub(local);
                if local_label < seg.len && tid == 0 {
                    reduced.x_label = T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) });
                }
                let ctx = unsafe { row_ctx::<T, M>(p, row, label, local) };
                reduced.y_ref = ctx.y_ref;
                let part = unsafe { reduce_segment::<T, M>(&seg, Source::Global, &p.opts, &ctx) };
                // Synced: the next row's merge writes the scratch without another barrier.
                let part = part.block_merge::<M>();
                if tid == 0 {
                    let tag = ((scored + 1) as u64) << 32;
                    unsafe {
                        prim::st_relaxed_gpu_u64(slot(scored, chunk as u32), part.lse.m.to_bits() as u64 | tag);
                        prim::st_relaxed_gpu_u64(slot(scored, chunk as u32) + 8, part.lse.s.to_bits() as u64 | tag);
                    }
                }
                scored += 1;
            }
            Some(reduced)
        } else {
            None
        };
        // Second pass over the row before: its gradient, its chunk read again.
        if let Some(r) = behind {
            unsafe { split_l2_finish_row::<T, M>(p, &r, &seg_of(r.row), local, chunk == 0, |q| slot(r.index, q)) };
        }
        match ahead {
            Some(reduced) => behind = Some(reduced),
            None => break,
        }
        row += groups;
    }
}

/// [`split_l2`]'s second pass over row `r` (segment `seg`, from column `local`): its group's
/// summaries merged by every warp (`slot(q)` holds chunk `q`'s), then its gradient and, in the CTA
/// whose chunk holds the label (`first` for rows that are not scored), its outputs.
#[inline(always)]
unsafe fn split_l2_finish_row<T: Element, M: Mode>(
    p: &XentParams,
    r: &Reduced,
    seg: &Segment,
    local: u32,
    first: bool,
    slot: impl Fn(u32) -> u64,
) {
    let tid = thread_idx();
    let Target::Class(label) = r.target else {
        if p.mode != MODE_FORWARD {
            unsafe { zero_segment::<T>(seg, 0) };
        }
        if first && tid == 0 {
            unsafe { write_unscored_row::<M>(p, r.row, r.target) };
        }
        return;
    };
    let tag = ((r.index + 1) as u64) << 32;
    let mut acc = Part::EMPTY;
    let mut q = tid % 32;
    while q < p.n_chunks {
        let (m, s) = unsafe { wait_for_tagged(slot(q), tag) };
        acc = acc.merge::<M>(Part { lse: reduce::Lse2 { m, s }, ..Part::EMPTY });
        q += 32;
    }
    let total = acc.warp_merge::<M>();
    let c = unsafe { opts::coef::<M>(p, &total, label, local) };
    let local_label = label.wrapping_sub(local);
    if p.mode != MODE_FORWARD {
        if !M::OPTS && !c.lse2_a.is_nan() {
            unsafe { grad_segment::<T, M, true>(seg, None, None, &p.opts, &c, local_label, 0) };
        } else {
            unsafe { grad_segment::<T, M, false>(seg, None, None, &p.opts, &c, local_label, 0) };
        }
    }
    if local_label < seg.len && tid == 0 {
        unsafe { write_scored_row::<M>(p, r.row, &total, label, r.x_label, r.y_ref, &c) };
    }
}

/// Waits until the counter at `counter` reaches `target` (acquire). Bounded: a group that never
/// completes (a bug, or a launch that was not resident at once) traps, an error the host
/// reports, not a hung GPU.
#[inline(always)]
unsafe fn wait_for_count(counter: u64, target: u32) {
    let mut spins = 0u32;
    while unsafe { prim::ld_acquire_gpu_u32(counter) } < target {
        spins += 1;
        if spins == SPLIT_MAX_SPINS {
            prim::trap();
        }
    }
}

/// Waits until both words of the tagged summary at `at` carry `tag` (in their high halves) and
/// returns its `(m, s)`; bounded as [`wait_for_count`].
#[inline(always)]
unsafe fn wait_for_tagged(at: u64, tag: u64) -> (f32, f32) {
    let mut spins = 0u32;
    loop {
        let (m, s) = unsafe { (prim::ld_relaxed_gpu_u64(at), prim::ld_relaxed_gpu_u64(at + 8)) };
        if (m & !0xffff_ffff) == tag && (s & !0xffff_ffff) == tag {
            return (f32::from_bits(m as u32), f32::from_bits(s as u32));
        }
        spins += 1;
        if spins == SPLIT_MAX_SPINS {
            prim::trap();
        }
    }
}
