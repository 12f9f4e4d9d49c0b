//! The seed's `element_mul`: scales a gradient in place by an upstream gradient that is known
//! only after the fused kernel ran.

use crate::abi::ScaleParams;
use crate::element::Element;
use crate::prim::{self, thread_idx};

/// `grad[r, j] *= upstream[0]` (or `upstream[r]` when `per_row`), rounding to the element type.
/// A factor of exactly 1 leaves its rows untouched without reading them: `x * 1 == x` for every
/// value, so skipping is exact, and a plain `loss.backward()` (upstream 1) costs one launch and no
/// pass over the gradient. The decision is made here, on the device, so the host never waits.
///
/// Launch: a bounded grid, block = a multiple of 32 threads; block `b` scales tiles `b, b + grid,
/// ...` of the `n_rows * n_tiles` (tile `t` is tile `t % n_tiles` of row `t / n_tiles`). Traffic:
/// 2 x element bytes per element whose factor is not 1, none otherwise.
#[inline(always)]
pub unsafe fn scale<T: Element>(p: &ScaleParams) {
    let factor_of = |row: u64| {
        let index = if p.per_row != 0 { row } else { 0 };
        f32::from_bits(unsafe { prim::ld_global_u32(p.upstream + 4 * index) })
    };
    if p.per_row == 0 && factor_of(0) == 1.0 {
        return;
    }
    let n_tiles_total = p.n_rows * p.n_tiles as u64;
    let mut tile_id = prim::block_idx() as u64;
    while tile_id < n_tiles_total {
        let (row, tile) = prim::div_rem(tile_id, p.n_tiles as u64);
        let factor = factor_of(row);
        if factor != 1.0 {
            unsafe { scale_tile::<T>(p, row, tile as u32, factor) };
        }
        tile_id += prim::grid_dim() as u64;
    }
}

/// Scales tile `tile` of row `row` by `factor`: 16-byte vectors, and the unaligned head and the
/// tail one element per thread.
#[inline(always)]
unsafe fn scale_tile<T: Element>(p: &ScaleParams, row: u64, tile: u32, factor: f32) {
    let start = tile * p.tile_len;
    let len = p.tile_len.min(p.vocab - start);
    let addr = p.grad + (row * p.row_stride + start as u64) * T::BYTES as u64;

    let tid = thread_idx();
    let head = ((((16 - (addr & 15)) & 15) as u32) / T::BYTES).min(len);
    let n_vec = (len - head) / T::VEC as u32;
    let mut v = tid;
    while v < n_vec {
        let at = addr + ((head + v * T::VEC as u32) * T::BYTES) as u64;
        let mut x = T::unpack(unsafe { prim::ld_global_v4(at) });
        for value in &mut x {
            *value *= factor;
        }
        unsafe { prim::st_global_v4(at, T::pack(&x)) };
        v += prim::block_dim();
    }
    let n_scalar = len - n_vec * T::VEC as u32;
    if tid < n_scalar {
        let j = if tid < head { tid } else { tid + n_vec * T::VEC as u32 };
        let at = addr + (j * T::BYTES) as u64;
        let x = T::widen(unsafe { T::ld_global_raw(at) });
        unsafe { T::store_global(at, x * factor) };
    }
}
