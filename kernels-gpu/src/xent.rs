//! Cross-entropy: label resolution, the count kernel, the fused (row-resident) kernel, the
//! chunked plan's two kernels, and the kernel that reduces per-row losses to the loss.
//!
//! Every row is computed as: lse = log(sum_j exp(x_j)), loss = lse - x_label, and
//! grad_j = (softmax_j - [j == label]) * scale, where scale = grad_scale / n_valid for the mean
//! and grad_scale otherwise. All arithmetic is f32, in base 2 (`x * log2(e)` into `ex2`).

use crate::abi::{
    COUNT_BAD, COUNT_VALID, CountParams, FinishParams, REDUCTION_MEAN, RowsParams,
    SMEM_STASH_OFFSET, XentParams,
};
use crate::element::{Element, Label};
use crate::prim::{self, thread_idx};
use crate::reduce::{self, Lse2};
use core::f32::consts::{LN_2, LOG2_E};

/// Vectors each thread loads before it uses the first, to keep enough bytes in flight
/// (`plan::UNROLL` on the host sizes blocks so one batch covers a chunk). `unroll!` repeats its
/// body this many times.
const UNROLL: u32 = 8;

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

/// A run of `len` elements of one row from global byte address `addr`: a scalar head up to the
/// first 16-byte boundary, `n_vec` aligned vectors, and a scalar tail.
struct Segment {
    addr: u64,
    len: u32,
    head: u32,
    n_vec: u32,
}

impl Segment {
    #[inline(always)]
    fn new<T: Element>(addr: u64, len: u32) -> Segment {
        let head = ((((16 - (addr & 15)) & 15) as u32) / T::BYTES).min(len);
        let n_vec = (len - head) / T::VEC as u32;
        Segment { addr, len, head, n_vec }
    }

    /// Index (in the segment) of the first element of vector `v`.
    #[inline(always)]
    fn vec_start<T: Element>(&self, v: u32) -> u32 {
        self.head + v * T::VEC as u32
    }

    #[inline(always)]
    fn elem_addr<T: Element>(&self, j: u32) -> u64 {
        self.addr + j as u64 * T::BYTES as u64
    }

    /// Elements outside the vectors (fewer than `2 * VEC`).
    #[inline(always)]
    fn n_scalar<T: Element>(&self) -> u32 {
        self.len - self.n_vec * T::VEC as u32
    }

    /// Index (in the segment) of scalar `k < n_scalar`: the head, then the tail.
    #[inline(always)]
    fn scalar_index<T: Element>(&self, k: u32) -> u32 {
        if k < self.head { k } else { k + self.n_vec * T::VEC as u32 }
    }
}

/// This thread's share of the online log-sum-exp over `seg`. With `stash`, also copies the raw
/// data to shared memory, element `j` at `stash + j * BYTES` (`stash` congruent to `seg.addr`
/// modulo 16, so vectors stay aligned).
///
/// Each thread takes vectors `v, v + step, ...` in batches of `UNROLL`: all loads of a batch are
/// issued before the first is used (bounds-checked, so a partial batch costs one round trip,
/// not one per vector); the batch's maximum rescales the running sum once; the exponentials are
/// summed as a tree to keep dependency chains short.
#[inline(always)]
unsafe fn reduce_segment<T: Element>(seg: &Segment, stash: Option<u32>) -> Lse2 {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mut acc = Lse2::EMPTY;
    let mut v = tid;
    while v < seg.n_vec {
        let mut words = [[0u32; 4]; UNROLL as usize];
        unroll!(u => {
            let index = v + u * step;
            if index < seg.n_vec {
                let start = seg.vec_start::<T>(index);
                words[u as usize] = unsafe { prim::ld_global_v4(seg.elem_addr::<T>(start)) };
            }
        });
        let mut batch_max = f32::NEG_INFINITY;
        unroll!(u => {
            let index = v + u * step;
            if index < seg.n_vec {
                if let Some(stash) = stash {
                    let start = seg.vec_start::<T>(index);
                    unsafe { prim::st_shared_v4(stash + start * T::BYTES, words[u as usize]) };
                }
                batch_max = batch_max.max(reduce::max_of(&T::unpack(words[u as usize]), T::VEC));
            }
        });
        if acc.raise(batch_max) {
            let mut sums = [0.0f32; 2];
            unroll!(u => {
                if v + u * step < seg.n_vec {
                    let x = T::unpack(words[u as usize]);
                    sums[(u & 1) as usize] += reduce::sum_exp2(&x, T::VEC, acc.m);
                }
            });
            acc.s += sums[0] + sums[1];
        } else {
            unroll!(u => {
                if v + u * step < seg.n_vec {
                    acc.keep_nan(&T::unpack(words[u as usize]), T::VEC);
                }
            });
        }
        v += UNROLL * step;
    }
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe { T::ld_global_raw(seg.elem_addr::<T>(j)) };
        if let Some(stash) = stash {
            unsafe { T::st_shared_raw(stash + j * T::BYTES, raw) };
        }
        acc.add(&[T::widen(raw)], 1);
    }
    acc
}

/// Gradient of one vector's worth of logits: `(2^(x*log2e - lse2) - [col == label]) * scale`.
#[inline(always)]
fn grad_values<const N: usize>(
    x: [f32; N],
    n: usize,
    first_col: u32,
    label: u32,
    lse2: f32,
    scale: f32,
) -> [f32; N] {
    let mut g = [0.0; N];
    for i in 0..n {
        g[i] = prim::ex2(prim::fma(x[i], LOG2_E, -lse2)) * scale;
    }
    // One compare per vector; the per-element search runs only in the vector holding the label.
    if label.wrapping_sub(first_col) < n as u32 {
        for i in 0..n {
            if first_col + i as u32 == label {
                g[i] -= scale;
            }
        }
    }
    g
}

/// Writes the gradient over `seg`, reading the logits from `stash` (see `reduce_segment`) or,
/// without one, from the segment itself. `label` is the label's index in the segment (any value
/// `>= len` when it lies elsewhere).
#[inline(always)]
unsafe fn grad_segment<T: Element>(
    seg: &Segment,
    stash: Option<u32>,
    lse2: f32,
    scale: f32,
    label: u32,
) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let load = |start: u32| unsafe {
        match stash {
            Some(stash) => prim::ld_shared_v4(stash + start * T::BYTES),
            None => prim::ld_global_v4(seg.elem_addr::<T>(start)),
        }
    };
    let mut v = tid;
    while v < seg.n_vec {
        let mut words = [[0u32; 4]; UNROLL as usize];
        unroll!(u => {
            let index = v + u * step;
            if index < seg.n_vec {
                words[u as usize] = load(seg.vec_start::<T>(index));
            }
        });
        unroll!(u => {
            let index = v + u * step;
            if index < seg.n_vec {
                let start = seg.vec_start::<T>(index);
                let g = grad_values(T::unpack(words[u as usize]), T::VEC, start, label, lse2, scale);
                unsafe { prim::st_global_v4(seg.elem_addr::<T>(start), T::pack(&g)) };
            }
        });
        v += UNROLL * step;
    }
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe {
            match stash {
                Some(stash) => T::ld_shared_raw(stash + j * T::BYTES),
                None => T::ld_global_raw(seg.elem_addr::<T>(j)),
            }
        };
        let g = grad_values([T::widen(raw)], 1, j, label, lse2, scale);
        unsafe { T::store_global(seg.elem_addr::<T>(j), g[0]) };
    }
}

/// Writes zeros over `seg` (the gradient of an ignored row).
#[inline(always)]
unsafe fn zero_segment<T: Element>(seg: &Segment) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mut v = tid;
    while v < seg.n_vec {
        unsafe { prim::st_global_v4(seg.elem_addr::<T>(seg.vec_start::<T>(v)), [0; 4]) };
        v += step;
    }
    if tid < seg.n_scalar::<T>() {
        unsafe { T::store_global(seg.elem_addr::<T>(seg.scalar_index::<T>(tid)), 0.0) };
    }
}

/// The gradient's scale: `grad_scale / n_valid` for the mean, `grad_scale` otherwise.
#[inline(always)]
unsafe fn grad_scale(p: &XentParams) -> f32 {
    if p.reduction == REDUCTION_MEAN {
        let n_valid = unsafe { prim::ld_global_u32(p.counts + 4 * COUNT_VALID as u64) };
        p.grad_scale / n_valid as f32
    } else {
        p.grad_scale
    }
}

#[inline(always)]
unsafe fn write_row_outputs(p: &XentParams, row: u64, loss: f32, lse: f32) {
    unsafe {
        prim::st_global_u32(p.row_loss + 4 * row, loss.to_bits());
        prim::st_global_u32(p.row_lse + 4 * row, lse.to_bits());
    }
}

/// Row outputs of a row that is not scored: zero, or NaN loss for an out-of-range label (so the
/// reduced loss is NaN too; the host reports the error when the loss is read).
#[inline(always)]
unsafe fn write_unscored_row(p: &XentParams, row: u64, target: Target) {
    let loss = if target == Target::Bad { f32::NAN } else { 0.0 };
    unsafe { write_row_outputs(p, row, loss, 0.0) }
}

#[inline(always)]
fn row_addr<T: Element>(rows: &RowsParams, row: u64) -> u64 {
    rows.logits + row * rows.row_stride * T::BYTES as u64
}

/// Counts valid and out-of-range labels into `counts` (zeroed before the launch).
///
/// Launch: any 1-D grid of 1-D blocks (a multiple of 32 threads), 256 bytes of dynamic shared
/// memory. Traffic: one label per row.
#[inline(always)]
pub unsafe fn count<L: Label>(p: &CountParams) {
    let tid = thread_idx();
    let step = prim::grid_dim() as u64 * prim::block_dim() as u64;
    let mut row = prim::block_idx() as u64 * prim::block_dim() as u64 + tid as u64;
    let (mut valid, mut bad) = (0u32, 0u32);
    while row < p.rows.n_rows {
        match unsafe { row_target::<L>(&p.rows, row) } {
            Target::Class(_) => valid += 1,
            Target::Bad => bad += 1,
            Target::Ignored => {}
        }
        row += step;
    }
    let valid = reduce::block_sum_u32(valid);
    let bad = reduce::block_sum_u32(bad);
    if tid == 0 {
        unsafe {
            if valid > 0 {
                prim::red_add_u32(p.counts + 4 * COUNT_VALID as u64, valid);
            }
            if bad > 0 {
                prim::red_add_u32(p.counts + 4 * COUNT_BAD as u64, bad);
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
pub unsafe fn fused<T: Element, L: Label>(p: &XentParams) {
    let rows = &p.rows;
    let row = prim::block_idx() as u64;
    let tid = thread_idx();
    let seg = Segment::new::<T>(row_addr::<T>(rows, row), rows.vocab);
    let label = match unsafe { row_target::<L>(rows, row) } {
        Target::Class(label) => label,
        target => {
            unsafe { zero_segment::<T>(&seg) };
            if tid == 0 {
                unsafe { write_unscored_row(p, row, target) };
            }
            return;
        }
    };
    // Read before the block's first barrier; every gradient write comes after it.
    let x_label =
        if tid == 0 { T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(label)) }) } else { 0.0 };
    let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
    let partial = unsafe { reduce_segment::<T>(&seg, Some(stash)) };
    let lse2 = reduce::block_lse2(partial).value();
    let scale = unsafe { grad_scale(p) };
    unsafe { grad_segment::<T>(&seg, Some(stash), lse2, scale, label) };
    if tid == 0 {
        let lse = lse2 * LN_2;
        unsafe { write_row_outputs(p, row, lse - x_label, lse) };
    }
}

/// Block `b` of the chunked plan handles chunk `b % n_chunks` of row `b / n_chunks`.
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

/// Chunked plan, first kernel: (max, sum) in log2 units of one chunk of a row, into `partials`.
/// Reads each logit once (element bytes per element).
///
/// Launch: grid = n_rows * n_chunks, block = a multiple of 32 threads, 256 bytes of dynamic
/// shared memory.
#[inline(always)]
pub unsafe fn chunk_partial<T: Element, L: Label>(p: &XentParams) {
    let (row, _, block, seg) = chunk_of::<T>(p);
    if !matches!(unsafe { row_target::<L>(&p.rows, row) }, Target::Class(_)) {
        return;
    }
    let total = reduce::block_lse2(unsafe { reduce_segment::<T>(&seg, None) });
    if thread_idx() == 0 {
        unsafe {
            prim::st_global_u32(p.partials + 8 * block, total.m.to_bits());
            prim::st_global_u32(p.partials + 8 * block + 4, total.s.to_bits());
        }
    }
}

/// Chunked plan, second kernel: combines the row's partials into its log-sum-exp, then reads the
/// chunk again and writes its gradient (2 x element bytes per element). The block holding the
/// label writes the row's loss and log-sum-exp.
///
/// Launch: as `chunk_partial`.
#[inline(always)]
pub unsafe fn chunk_grad<T: Element, L: Label>(p: &XentParams) {
    let (row, start, _, seg) = chunk_of::<T>(p);
    let tid = thread_idx();
    let label = match unsafe { row_target::<L>(&p.rows, row) } {
        Target::Class(label) => label,
        target => {
            unsafe { zero_segment::<T>(&seg) };
            if start == 0 && tid == 0 {
                unsafe { write_unscored_row(p, row, target) };
            }
            return;
        }
    };
    let local_label = label.wrapping_sub(start);
    let owns_label = local_label < seg.len;
    // Read before the block's first barrier; every gradient write comes after it.
    let x_label = if owns_label && tid == 0 {
        T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) })
    } else {
        0.0
    };
    let first = row * p.n_chunks as u64;
    let mut acc = Lse2::EMPTY;
    let mut i = tid;
    while i < p.n_chunks {
        let at = p.partials + 8 * (first + i as u64);
        let part = unsafe {
            Lse2 {
                m: f32::from_bits(prim::ld_global_u32(at)),
                s: f32::from_bits(prim::ld_global_u32(at + 4)),
            }
        };
        acc = acc.merge(part);
        i += prim::block_dim();
    }
    let lse2 = reduce::block_lse2(acc).value();
    let scale = unsafe { grad_scale(p) };
    unsafe { grad_segment::<T>(&seg, None, lse2, scale, local_label) };
    if owns_label && tid == 0 {
        let lse = lse2 * LN_2;
        unsafe { write_row_outputs(p, row, lse - x_label, lse) };
    }
}

/// Cluster plan (sm_90): a row split over the CTAs of a thread-block cluster, one chunk each, kept
/// in shared memory. Each CTA publishes its chunk's (max, sum) in its shared memory; after a
/// cluster barrier every warp reads all of them through distributed shared memory, so the row is
/// read from HBM once and its gradient written once (2 x element bytes per element), for rows
/// too long for one block and to spread few rows over many SMs.
///
/// Launch: grid = n_rows * n_chunks with cluster dimension n_chunks (block `b` is chunk
/// `b % n_chunks` of row `b / n_chunks`), block = a multiple of 32 threads, dynamic shared memory
/// = `SMEM_STASH_OFFSET + 16 + chunk_len * BYTES`.
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn cluster<T: Element, L: Label>(p: &XentParams) {
    let (row, start, _, seg) = chunk_of::<T>(p);
    let tid = thread_idx();
    // Every CTA of a cluster has the same row, so all of them leave here together or none does.
    let label = match unsafe { row_target::<L>(&p.rows, row) } {
        Target::Class(label) => label,
        target => {
            unsafe { zero_segment::<T>(&seg) };
            if start == 0 && tid == 0 {
                unsafe { write_unscored_row(p, row, target) };
            }
            return;
        }
    };
    let local_label = label.wrapping_sub(start);
    let owns_label = local_label < seg.len;
    // Read before the block's first barrier; every gradient write comes after it.
    let x_label = if owns_label && tid == 0 {
        T::widen(unsafe { T::ld_global_raw(seg.elem_addr::<T>(local_label)) })
    } else {
        0.0
    };
    let stash = prim::smem_base() + SMEM_STASH_OFFSET + (seg.addr & 15) as u32;
    let partial = if BULK_LOAD {
        unsafe { bulk_load_and_reduce::<T>(&seg, stash) }
    } else {
        unsafe { reduce_segment::<T>(&seg, Some(stash)) }
    };
    let chunk = reduce::block_lse2(partial);
    let slot = prim::smem_base() + crate::abi::SMEM_CLUSTER_SLOT;
    if tid == 0 {
        unsafe {
            prim::st_shared_u32(slot, chunk.m.to_bits());
            prim::st_shared_u32(slot + 4, chunk.s.to_bits());
        }
    }
    prim::cluster_arrive();
    prim::cluster_wait();
    // Lane i reads the slot of CTA i (i, i + 32, ...), then the warp combines them.
    let mut acc = Lse2::EMPTY;
    let mut rank = tid % 32;
    while rank < p.n_chunks {
        let remote = prim::map_shared_rank(slot, rank);
        let part = unsafe {
            Lse2 {
                m: f32::from_bits(prim::ld_shared_cluster_u32(remote)),
                s: f32::from_bits(prim::ld_shared_cluster_u32(remote + 4)),
            }
        };
        acc = acc.merge(part);
        rank += 32;
    }
    let lse2 = reduce::warp_lse2(acc).value();
    // Done reading the other CTAs' slots; the matching wait keeps this CTA's slot alive until
    // every CTA of the cluster has read it.
    prim::cluster_arrive();
    let scale = unsafe { grad_scale(p) };
    if BULK_LOAD {
        unsafe { grad_from_stash::<T>(&seg, stash, lse2, scale, local_label) };
    } else {
        unsafe { grad_segment::<T>(&seg, Some(stash), lse2, scale, local_label) };
    }
    if owns_label && tid == 0 {
        let lse = lse2 * LN_2;
        unsafe { write_row_outputs(p, row, lse - x_label, lse) };
    }
    prim::cluster_wait();
}

/// Whether the cluster kernel loads its chunk with the sm_90 bulk-copy engine (one instruction,
/// no registers held) instead of 16-byte loads by every thread.
#[cfg(xent_cluster)]
const BULK_LOAD: bool = true;

/// Copies the vectors of `seg` into the stash with one bulk copy (thread 0 issues it; it
/// completes on an mbarrier), loads and stashes the scalar head and tail meanwhile, then returns
/// this thread's share of the online log-sum-exp, read from shared memory.
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn bulk_load_and_reduce<T: Element>(seg: &Segment, stash: u32) -> Lse2 {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mbar = prim::smem_base() + crate::abi::SMEM_MBARRIER;
    let vec_bytes = seg.n_vec * 16;
    if tid == 0 {
        unsafe { prim::mbarrier_init(mbar, 1) };
        prim::fence_mbarrier_init();
    }
    prim::sync_threads();
    if tid == 0 && vec_bytes > 0 {
        let first = seg.vec_start::<T>(0);
        unsafe {
            prim::mbarrier_arrive_expect_tx(mbar, vec_bytes);
            prim::bulk_copy_to_shared(
                stash + first * T::BYTES,
                seg.elem_addr::<T>(first),
                vec_bytes,
                mbar,
            );
        }
    }
    let mut acc = Lse2::EMPTY;
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let raw = unsafe { T::ld_global_raw(seg.elem_addr::<T>(j)) };
        unsafe { T::st_shared_raw(stash + j * T::BYTES, raw) };
        acc.add(&[T::widen(raw)], 1);
    }
    if vec_bytes > 0 {
        while !unsafe { prim::mbarrier_try_wait(mbar, 0) } {}
    }
    let mut v = tid;
    while v < seg.n_vec {
        let start = seg.vec_start::<T>(v);
        acc.add(&T::unpack(unsafe { prim::ld_shared_v4(stash + start * T::BYTES) }), T::VEC);
        v += step;
    }
    acc
}

/// The gradient of `seg` from its stash, one vector at a time (few registers held).
#[cfg(xent_cluster)]
#[inline(always)]
unsafe fn grad_from_stash<T: Element>(seg: &Segment, stash: u32, lse2: f32, scale: f32, label: u32) {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let mut v = tid;
    while v < seg.n_vec {
        let start = seg.vec_start::<T>(v);
        let x = T::unpack(unsafe { prim::ld_shared_v4(stash + start * T::BYTES) });
        let g = grad_values(x, T::VEC, start, label, lse2, scale);
        unsafe { prim::st_global_v4(seg.elem_addr::<T>(start), T::pack(&g)) };
        v += step;
    }
    if tid < seg.n_scalar::<T>() {
        let j = seg.scalar_index::<T>(tid);
        let x = T::widen(unsafe { T::ld_shared_raw(stash + j * T::BYTES) });
        let g = grad_values([x], 1, j, label, lse2, scale);
        unsafe { T::store_global(seg.elem_addr::<T>(j), g[0]) };
    }
}

/// Reduces the per-row losses to the loss: their sum, divided by the valid count for the mean
/// (0/0 = NaN when every row is ignored, as in PyTorch). Sums in f64, in a fixed order.
///
/// Launch: one block of a multiple of 32 threads, 256 bytes of dynamic shared memory.
#[inline(always)]
pub unsafe fn finish(p: &FinishParams) {
    let tid = thread_idx();
    let mut sum = 0.0f64;
    let mut row = tid as u64;
    while row < p.n_rows {
        sum += f32::from_bits(unsafe { prim::ld_global_u32(p.row_loss + 4 * row) }) as f64;
        row += prim::block_dim() as u64;
    }
    let total = reduce::block_sum_f64(sum);
    if tid == 0 {
        let loss = if p.reduction == REDUCTION_MEAN {
            total / unsafe { prim::ld_global_u32(p.counts + 4 * COUNT_VALID as u64) } as f64
        } else {
            total
        };
        unsafe { prim::st_global_u32(p.loss, (loss as f32).to_bits()) };
    }
}
