//! The seed's `element_mul`: scales a gradient in place by an upstream gradient that is known
//! only after the fused kernel ran.

use crate::abi::ScaleParams;
use crate::element::Element;
use crate::prim::{self, thread_idx};

/// `grad[r, j] *= upstream[0]` (or `upstream[r]` when `per_row`), rounding to the element type.
///
/// Launch: grid = n_rows * n_tiles, block = a multiple of 32 threads; block `b` scales tile
/// `b % n_tiles` of row `b / n_tiles`. Traffic: 2 x element bytes per element.
#[inline(always)]
pub unsafe fn scale<T: Element>(p: &ScaleParams) {
    let block = prim::block_idx() as u64;
    let (row, tile) = prim::div_rem(block, p.n_tiles as u64);
    let start = tile as u32 * p.tile_len;
    let len = p.tile_len.min(p.vocab - start);
    let upstream_index = if p.per_row != 0 { row } else { 0 };
    let factor = f32::from_bits(unsafe { prim::ld_global_u32(p.upstream + 4 * upstream_index) });
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
