//! Element types of the logits and labels, as seen by the kernels.
//!
//! Logits travel as 16-byte vectors (`[u32; 4]`): 8 bf16/f16 or 4 f32 elements, widened to f32
//! for every computation and rounded to nearest-even on the way back.

use crate::prim;

/// A logit element type. `VEC` elements fill one 16-byte vector. Scalars move as raw bits in a
/// `u32` (zero-extended for 16-bit types) and are widened with `widen`.
pub trait Element: Copy {
    const BYTES: u32;
    const VEC: usize;
    /// Raw bits of one element in global memory at byte address `addr`.
    unsafe fn ld_global_raw(addr: u64) -> u32;
    /// Raw bits of one element in shared memory (shared-window address).
    unsafe fn ld_shared_raw(addr: u32) -> u32;
    /// Stores raw bits of one element to shared memory.
    unsafe fn st_shared_raw(addr: u32, raw: u32);
    /// Rounds `v` to the element type and stores it to global memory.
    unsafe fn store_global(addr: u64, v: f32);
    /// Raw bits to f32 (exact).
    fn widen(raw: u32) -> f32;
    /// Widens the `VEC` elements of a vector (the rest of the array is unspecified).
    fn unpack(w: [u32; 4]) -> [f32; 8];
    /// Rounds `VEC` floats into a vector.
    fn pack(v: &[f32; 8]) -> [u32; 4];
    /// A running maximum of vectors that holds none yet: see [`max_fold`](Self::max_fold).
    const MAX_EMPTY: u32;
    /// The running maximum `acc` raised to vector `w`'s elements, NaNs ignored (as `f32::max`):
    /// 16-bit types keep it packed, two lanes a word (`max.bf16x2`/`max.f16x2`, exact), so a batch's
    /// maximum takes one instruction a word instead of a widening and a compare an element; f32
    /// keeps a float's bits.
    #[inline(always)]
    fn max_fold(acc: u32, w: [u32; 4]) -> u32 {
        f32::from_bits(acc).max(crate::reduce::max_of(&Self::unpack(w), Self::VEC)).to_bits()
    }
    /// The largest element of [`max_fold`](Self::max_fold)'s running maximum (-inf for none).
    #[inline(always)]
    fn max_value(acc: u32) -> f32 {
        f32::from_bits(acc)
    }
}

/// bfloat16: the upper half of an f32.
#[derive(Clone, Copy)]
pub struct Bf16;
/// IEEE binary16.
#[derive(Clone, Copy)]
pub struct F16;
/// IEEE binary32.
#[derive(Clone, Copy)]
pub struct F32;

macro_rules! half_scalar_access {
    () => {
        #[inline(always)]
        unsafe fn ld_global_raw(addr: u64) -> u32 {
            unsafe { prim::ld_global_u16(addr) as u32 }
        }
        #[inline(always)]
        unsafe fn ld_shared_raw(addr: u32) -> u32 {
            unsafe { prim::ld_shared_u16(addr) as u32 }
        }
        #[inline(always)]
        unsafe fn st_shared_raw(addr: u32, raw: u32) {
            unsafe { prim::st_shared_u16(addr, raw as u16) }
        }
    };
}

/// [`Element`]'s running maximum for a 16-bit type, kept packed two lanes a word: `max2` is the
/// type's lane-wise maximum, `empty` two -infs.
macro_rules! half_packed_max {
    ($max2:path, $empty:expr) => {
        const MAX_EMPTY: u32 = $empty;
        #[inline(always)]
        fn max_fold(acc: u32, w: [u32; 4]) -> u32 {
            $max2(acc, $max2($max2(w[0], w[1]), $max2(w[2], w[3])))
        }
        #[inline(always)]
        fn max_value(acc: u32) -> f32 {
            Self::widen(acc & 0xffff).max(Self::widen(acc >> 16))
        }
    };
}

impl Element for Bf16 {
    const BYTES: u32 = 2;
    const VEC: usize = 8;
    half_scalar_access!();
    #[inline(always)]
    unsafe fn store_global(addr: u64, v: f32) {
        unsafe { prim::st_global_u16(addr, prim::pack_bf16x2(0.0, v) as u16) }
    }
    #[inline(always)]
    fn widen(raw: u32) -> f32 {
        f32::from_bits(raw << 16)
    }
    #[inline(always)]
    fn unpack(w: [u32; 4]) -> [f32; 8] {
        let mut out = [0.0; 8];
        for i in 0..4 {
            out[2 * i] = f32::from_bits(w[i] << 16);
            out[2 * i + 1] = f32::from_bits(w[i] & 0xffff_0000);
        }
        out
    }
    #[inline(always)]
    fn pack(v: &[f32; 8]) -> [u32; 4] {
        let mut w = [0; 4];
        for i in 0..4 {
            w[i] = prim::pack_bf16x2(v[2 * i + 1], v[2 * i]);
        }
        w
    }
    // Two bfloat16 -infs.
    half_packed_max!(prim::max_bf16x2, 0xff80_ff80);
}

impl Element for F16 {
    const BYTES: u32 = 2;
    const VEC: usize = 8;
    half_scalar_access!();
    #[inline(always)]
    unsafe fn store_global(addr: u64, v: f32) {
        unsafe { prim::st_global_u16(addr, prim::pack_f16x2(0.0, v) as u16) }
    }
    #[inline(always)]
    fn widen(raw: u32) -> f32 {
        prim::f16_to_f32(raw as u16)
    }
    #[inline(always)]
    fn unpack(w: [u32; 4]) -> [f32; 8] {
        let mut out = [0.0; 8];
        for i in 0..4 {
            out[2 * i] = prim::f16_to_f32(w[i] as u16);
            out[2 * i + 1] = prim::f16_to_f32((w[i] >> 16) as u16);
        }
        out
    }
    #[inline(always)]
    fn pack(v: &[f32; 8]) -> [u32; 4] {
        let mut w = [0; 4];
        for i in 0..4 {
            w[i] = prim::pack_f16x2(v[2 * i + 1], v[2 * i]);
        }
        w
    }
    // Two half -infs.
    half_packed_max!(prim::max_f16x2, 0xfc00_fc00);
}

impl Element for F32 {
    const BYTES: u32 = 4;
    const VEC: usize = 4;
    #[inline(always)]
    unsafe fn ld_global_raw(addr: u64) -> u32 {
        unsafe { prim::ld_global_u32(addr) }
    }
    #[inline(always)]
    unsafe fn ld_shared_raw(addr: u32) -> u32 {
        unsafe { prim::ld_shared_u32(addr) }
    }
    #[inline(always)]
    unsafe fn st_shared_raw(addr: u32, raw: u32) {
        unsafe { prim::st_shared_u32(addr, raw) }
    }
    #[inline(always)]
    unsafe fn store_global(addr: u64, v: f32) {
        unsafe { prim::st_global_u32(addr, v.to_bits()) }
    }
    #[inline(always)]
    fn widen(raw: u32) -> f32 {
        f32::from_bits(raw)
    }
    #[inline(always)]
    fn unpack(w: [u32; 4]) -> [f32; 8] {
        let mut out = [0.0; 8];
        for i in 0..4 {
            out[i] = f32::from_bits(w[i]);
        }
        out
    }
    #[inline(always)]
    fn pack(v: &[f32; 8]) -> [u32; 4] {
        let mut w = [0; 4];
        for i in 0..4 {
            w[i] = v[i].to_bits();
        }
        w
    }
    const MAX_EMPTY: u32 = 0xff80_0000;
}

/// A label type: PyTorch's `i64`, or `i32`.
pub trait Label: Copy {
    /// `labels[index]` widened to i64.
    unsafe fn load(labels: u64, index: u64) -> i64;
}

impl Label for i64 {
    #[inline(always)]
    unsafe fn load(labels: u64, index: u64) -> i64 {
        unsafe { prim::ld_global_u64(labels + 8 * index) as i64 }
    }
}

impl Label for i32 {
    #[inline(always)]
    unsafe fn load(labels: u64, index: u64) -> i64 {
        unsafe { prim::ld_global_u32(labels + 4 * index) as i32 as i64 }
    }
}
