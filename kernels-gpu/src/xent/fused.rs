//! The fused plan: one CTA a row, the row kept in shared memory.

use super::*;

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
