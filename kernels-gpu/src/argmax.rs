//! Predicted tokens (Liger's `return_predicted_tokens`): the class of each scored row's first
//! maximal logit, read from the logits before the cross-entropy kernel writes its gradient over
//! them.

use crate::abi::{ArgmaxParams, ShardArgmaxParams, ShardMergeParams};
use crate::element::{Element, Label};
use crate::opts;
use crate::prim::{self, thread_idx};
use crate::reduce::{self, Best};
use crate::xent::{Target, row_target};

/// Writes `out[row]` for every row: the index of its first maximal logit (`torch.argmax` of the
/// logits as given: a NaN counts as the maximum, and of equal maxima the first), or -1 for a row
/// that is not scored.
///
/// Launch: any 1-D grid (block `b` takes rows `b, b + grid, ...`), block = a multiple of 32
/// threads, 256 bytes of dynamic shared memory. Traffic: one read of each scored row.
#[inline(always)]
pub unsafe fn argmax<T: Element, L: Label>(p: &ArgmaxParams) {
    let rows = &p.rows;
    let mut row = prim::block_idx() as u64;
    while row < rows.n_rows {
        let class = match unsafe { row_target::<L>(rows, row) } {
            Target::Class(_) => {
                let addr = rows.logits + row * rows.row_stride * T::BYTES as u64;
                i64::from(unsafe { row_best::<T>(addr, rows.vocab) }.index)
            }
            Target::Ignored | Target::Bad => -1,
        };
        if thread_idx() == 0 {
            unsafe { prim::st_global_u64(p.out + 8 * row, class as u64) };
        }
        row += prim::grid_dim() as u64;
    }
}

/// Vocabulary-parallel token accuracy and predicted tokens, step 1 (a rank's
/// `raw_shard_stats`): each scored row's first maximal logit in this rank's shard, as the pair
/// `[value (f32 bits), class (start + column)]` at `out + 8·row` (`[-inf, u32::MAX]` for a row
/// not scored, not read). The ranks' pairs meet in [`shard_argmax_merge`].
///
/// Launch: as [`argmax`]. Traffic: one read of each scored row of the shard.
#[inline(always)]
pub unsafe fn shard_argmax<T: Element, L: Label>(p: &ShardArgmaxParams) {
    let rows = &p.rows;
    let mut row = prim::block_idx() as u64;
    while row < rows.n_rows {
        let best = match unsafe { row_target::<L>(rows, row) } {
            Target::Class(_) => {
                let addr = rows.logits + row * rows.row_stride * T::BYTES as u64;
                let best = unsafe { row_best::<T>(addr, p.width) };
                Best { value: best.value, index: p.start + best.index }
            }
            Target::Ignored | Target::Bad => Best::NONE,
        };
        if thread_idx() == 0 {
            unsafe {
                prim::st_global_u32(p.out + 8 * row, best.value.to_bits());
                prim::st_global_u32(p.out + 8 * row + 4, best.index);
            }
        }
        row += prim::grid_dim() as u64;
    }
}

/// Vocabulary-parallel token accuracy and predicted tokens, step 3 (`raw_shard_backward`, after
/// the all-gather): each row's class over the whole vocabulary, the first maximum of the ranks'
/// pairs ([`shard_argmax`]; a NaN counts as the maximum, and of equal values the smaller class
/// wins, as `torch.argmax`), into `predicted` (-1 for a row not scored) and whether it is the
/// row's label into `row_correct` (0 for a row not scored), each where asked.
///
/// Launch: any 1-D grid (thread `i` of the grid takes rows `i, i + threads in the grid, ...`).
/// Traffic: 8 bytes a row a rank read, 12 written.
#[inline(always)]
pub unsafe fn shard_argmax_merge<L: Label>(p: &ShardMergeParams) {
    let rows = &p.rows;
    let threads = prim::grid_dim() as u64 * prim::block_dim() as u64;
    let mut row = prim::block_idx() as u64 * prim::block_dim() as u64 + thread_idx() as u64;
    while row < rows.n_rows {
        let (class, correct) = match unsafe { row_target::<L>(rows, row) } {
            Target::Class(label) => {
                let mut best = Best::NONE;
                for rank in 0..p.ranks as u64 {
                    let at = p.gathered + rank * p.rank_stride + p.pairs_offset + 8 * row;
                    let (value, index) =
                        unsafe { (prim::ld_global_u32(at), prim::ld_global_u32(at + 4)) };
                    best = best.or(Best { value: f32::from_bits(value), index });
                }
                match best.is_none() {
                    true => (-1, false),
                    false => (i64::from(best.index), best.index == label),
                }
            }
            Target::Ignored | Target::Bad => (-1, false),
        };
        unsafe {
            if p.predicted != 0 {
                prim::st_global_u64(p.predicted + 8 * row, class as u64);
            }
            if p.row_correct != 0 {
                prim::st_global_u32(p.row_correct + 4 * row, correct as u32);
            }
        }
        row += threads;
    }
}

/// The first maximal logit of the `len` logits at `addr` (`len` at least 1), with its index, by
/// the whole block (every thread gets it): each thread takes 16-byte vectors `t, t + threads,
/// ...` and one element of the unaligned head or the tail; a vector is looked into only when its
/// (NaN-propagating) maximum could beat the thread's best, which holds an earlier index.
#[inline(always)]
unsafe fn row_best<T: Element>(addr: u64, len: u32) -> Best {
    let (tid, step) = (thread_idx(), prim::block_dim());
    let head = ((((16 - (addr & 15)) & 15) as u32) / T::BYTES).min(len);
    let n_vec = (len - head) / T::VEC as u32;
    let mut best = Best::NONE;
    // Vector `vk`'s first maximum joins `best` when it could beat it: ties with `best` keep it
    // (an earlier index), a NaN beats any number but not another NaN. Spelled out with constant
    // indices so the vectors stay in registers (a loop over them put 96 bytes on the stack).
    let visit = |best: &mut Best, w: [u32; 4], vk: u32| {
        let x = T::unpack(w);
        let m = opts::max_nan_of(&x, T::VEC);
        if best.is_none() || m > best.value || (m.is_nan() && !best.value.is_nan()) {
            *best = best.or(Best { value: m, index: head + vk * T::VEC as u32 + first_of(&x, m) });
        }
    };
    let mut v = tid;
    // Four vectors' loads in flight before the first is looked into.
    while v + 3 * step < n_vec {
        let load = |vk: u32| unsafe { prim::ld_global_v4(addr + ((head + vk * T::VEC as u32) * T::BYTES) as u64) };
        let (w0, w1, w2, w3) = (load(v), load(v + step), load(v + 2 * step), load(v + 3 * step));
        visit(&mut best, w0, v);
        visit(&mut best, w1, v + step);
        visit(&mut best, w2, v + 2 * step);
        visit(&mut best, w3, v + 3 * step);
        v += 4 * step;
    }
    while v < n_vec {
        let w = unsafe { prim::ld_global_v4(addr + ((head + v * T::VEC as u32) * T::BYTES) as u64) };
        visit(&mut best, w, v);
        v += step;
    }
    let n_scalar = len - n_vec * T::VEC as u32;
    if tid < n_scalar {
        let j = if tid < head { tid } else { tid + n_vec * T::VEC as u32 };
        let value = T::widen(unsafe { T::ld_global_raw(addr + (j * T::BYTES) as u64) });
        best = best.or(Best { value, index: j });
    }
    reduce::block_best(best)
}

/// The index of the first element of `x` equal to `m`, the (NaN-propagating) maximum of its first
/// `VEC`: the first NaN when `m` is NaN. One of the first `VEC` always matches, so what lies past
/// them (unspecified for f32) is never taken. Selects from the last element down, no branch.
#[inline(always)]
fn first_of(x: &[f32; 8], m: f32) -> u32 {
    let nan = m.is_nan();
    let mut index = 7;
    for i in (0..7).rev() {
        if x[i] == m || (nan && x[i].is_nan()) {
            index = i as u32;
        }
    }
    index
}
