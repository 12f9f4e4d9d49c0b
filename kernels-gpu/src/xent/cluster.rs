//! The cluster plan (sm_90): a row split over the CTAs of a thread-block cluster, each keeping
//! its chunk on chip, merged through distributed shared memory.

use super::*;
use crate::abi::{CLUSTER_KEEP, SMEM_PIECE_MBARRIERS, SMEM_WSUM_SLOTS};

/// Block `b` of the cluster plan handles chunk `b % n_chunks` of row `b / n_chunks` (the chunked
/// plan's kernels take `chunked::slice_chunk_of`).
#[inline(always)]
pub(super) fn chunk_of<T: Element>(p: &XentParams) -> (u64, u32, u64, Segment) {
    let block = prim::block_idx() as u64;
    let (row, chunk) = prim::div_rem(block, p.n_chunks as u64);
    let chunk = chunk as u32;
    let start = chunk * p.chunk_len;
    let len = p.chunk_len.min(p.rows.vocab - start);
    let addr = row_addr::<T>(&p.rows, row) + start as u64 * T::BYTES as u64;
    (row, start, block, Segment::new::<T>(addr, len))
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
#[cfg(xent_trace)]
#[inline(always)]
pub(super) unsafe fn trace_out<T: Element>(trace: &[u64; 10], seg: &Segment) {
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

/// The row's total over its cluster, from this CTA's summary of its chunk (`chunk`, a block
/// merge's, so every thread holds it): thread 0 publishes it in the CTA's cluster slot; past a
/// cluster barrier (where `at_barrier` runs: a trace stamp) lane `i` of every warp reads the slot
/// of CTA `i` (`i`, `i + 32`, ...) and the warp combines them. Then it arrives at the cluster
/// barrier again, done reading the other CTAs' slots: the caller's matching wait keeps this
/// CTA's slot alive until every CTA of the cluster has read it.
#[inline(always)]
pub(super) unsafe fn cluster_total<M: Mode>(p: &XentParams, chunk: Part, at_barrier: impl FnOnce()) -> Part {
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
const CAP_PIECES: u32 = 2;
// The pieces after the first have room for their mbarriers at `SMEM_PIECE_MBARRIERS`.
const _: () = assert!(CAP_PIECES >= 1 && CAP_PIECES - 1 <= 4);

/// Resident threads an SM (sm_80 to sm_90).
const SM_THREADS: u32 = 2048;
/// Shared memory an SM on the H100 and H200 (228 KiB), of which each resident CTA takes its
/// dynamic shared memory and [`CTA_RESERVED_SMEM_BYTES`].
const SM_SMEM_BYTES: u32 = 228 * 1024;
/// Shared memory the hardware reserves for each resident CTA (1 KiB on sm_80 to sm_90).
const CTA_RESERVED_SMEM_BYTES: u32 = 1024;

/// Brings this CTA's chunk of the row [`PREFETCH_EIGHTHS`] eighths of the resident rows after
/// `row` into L2 (`cp.async.bulk.prefetch.L2`, nothing waits for it), so HBM keeps reading while
/// the soft cap's two compute-heavy passes run, and the CTA that takes that row later finds its
/// bulk load in L2. The resident rows are estimated from the launch: CTAs an SM by threads and by
/// shared memory ([`SM_THREADS`], [`SM_SMEM_BYTES`], [`CTA_RESERVED_SMEM_BYTES`]), times
/// `%nsmid`, over the cluster size.
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
pub(super) const BULK_LOAD: bool = true;

/// Most vectors a thread of the cluster kernel keeps in registers.
const KEEP_MAX: usize = CLUSTER_KEEP as usize;

/// What a thread of the cluster kernel holds between its chunk's load and its gradient: up to
/// `KEEP_MAX` vectors (raw words) and one scalar of the chunk's head or tail.
pub(super) struct Kept {
    words: [[u32; 4]; KEEP_MAX],
    scalar: u32,
}

impl Kept {
    pub(super) const EMPTY: Kept = Kept { words: [[0; 4]; KEEP_MAX], scalar: 0 };
}

/// Vectors per thread the cluster kernel keeps in registers in mode `M` (see
/// `CLUSTER_KEEP`); the host sizes shared memory from the same constant.
#[inline(always)]
fn keep<M: Mode>() -> u32 {
    if M::FULL { 0 } else { CLUSTER_KEEP }
}

/// The cluster kernel's layout of a chunk: vectors `[0, in_regs)` in registers (vector
/// `t + k x threads` in thread `t`), vectors `[in_regs, n_vec)` in shared memory from
/// `smem_base + SMEM_STASH_OFFSET` on, the scalar head and tail in registers.
#[inline(always)]
fn in_regs<M: Mode>(seg: &Segment) -> u32 {
    (keep::<M>() * prim::block_dim()).min(seg.n_vec)
}

/// Loads this thread's share of `seg` (layout: `in_regs`): thread 0 issues one bulk copy of the
/// shared-memory part (it completes on an mbarrier); meanwhile every thread loads its vectors
/// kept in registers and its scalar and adds them up; then the shared-memory part. Returns this
/// thread's share of the chunk summary and, with `FIXED` (see `add_vector`), the largest
/// `x²` of its elements (infinity without).
#[inline(always)]
pub(super) unsafe fn bulk_load_and_reduce<T: Element, M: Mode, const FIXED: bool>(
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

/// The gradient of `seg` from what `bulk_load_and_reduce` left: the vectors and scalar this
/// thread kept, and the shared-memory part, one vector at a time (few registers held).
#[inline(always)]
pub(super) unsafe fn grad_from_stash<T: Element, M: Mode, const POLY: u8>(
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
