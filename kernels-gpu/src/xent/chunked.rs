//! The chunked plan's two kernels (a row's chunks reduced, then their gradient) and the
//! two-phase backward.

use super::*;

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
/// `grad_delta` bytes from the logits (0: in place). Reads and writes each element once. The
/// `Full` kernels add the gradient of the row's entropy times its upstream where
/// `entropy_upstream` is set.
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
    if M::FULL && p.entropy_upstream != 0 {
        // A differentiable entropy: its upstream and `lse - H` (the forward's `H`).
        c.ent = f32::from_bits(unsafe { prim::ld_global_u32(p.entropy_upstream + 4 * row) });
        c.ent_ref = lse - f32::from_bits(unsafe { prim::ld_global_u32(p.entropy + 4 * row) });
    }
    let local_label = label.wrapping_sub(start);
    unsafe { grad_segment::<T, M, false>(&seg, None, None, &p.opts, &c, local_label, p.grad_delta) };
}
