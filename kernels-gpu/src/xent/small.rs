//! Small calls (sm_90): the cluster plan's kernels ordered for latency.

use super::*;
use super::cluster::{BULK_LOAD, Kept, bulk_load_and_reduce, chunk_of, cluster_total, grad_from_stash};
#[cfg(xent_trace)]
use super::cluster::trace_out;

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
const SMALL_LABELS: usize = 2;
const _: () = assert!(SMALL_LABELS * 32 == crate::abi::SMALL_KERNEL_ROWS);

/// [`cluster_small`]'s count of the call's labels, from each lane's labels as loaded (`None` past
/// the rows, or where the shift ignores the row; lane `i` has rows `i` and `i + 32`): valid and
/// out-of-range rows, which warp 0 sums and its thread 0 stores at `SMEM_COUNTS` as
/// [`self_count`] does (the block's next barrier publishes them; counts are integers, so any
/// order gives `count_labels`' sums; no class weights in the plain loss, so their word is 0).
/// Returns row `row`'s [`Target::code`], from its lane, in every thread.
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
