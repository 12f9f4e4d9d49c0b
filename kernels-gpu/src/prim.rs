//! Device primitives: every inline-PTX block and LLVM intrinsic of the crate lives here, each a
//! tiny function whose doc names the instruction it emits.
//!
//! Rules learned the hard way (DESIGN.md, "Measured pitfalls"): `asm!` is not convergent, so no
//! warp- or block-collective instruction is written in `asm!`. Barriers use
//! `core::arch::nvptx::_syncthreads` and shuffles use LLVM's `llvm.nvvm.shfl.sync.*` intrinsics,
//! which LLVM knows to be convergent.

use core::arch::asm;
use core::arch::nvptx;

// The CTA's dynamic shared memory, sized at launch.
core::arch::global_asm!(".extern .shared .align 16 .b8 xent_dyn_smem[];");

unsafe extern "C" {
    #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
    fn llvm_shfl_sync_bfly_f32(mask: i32, value: f32, lane_mask: i32, clamp: i32) -> f32;
    #[link_name = "llvm.fma.f32"]
    fn llvm_fma_f32(a: f32, b: f32, c: f32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.bfly.i32"]
    fn llvm_shfl_sync_bfly_i32(mask: i32, value: i32, lane_mask: i32, clamp: i32) -> i32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.i32"]
    fn llvm_shfl_sync_idx_i32(mask: i32, value: i32, lane: i32, clamp: i32) -> i32;
}

/// `%tid.x`.
#[inline(always)]
pub fn thread_idx() -> u32 {
    unsafe { nvptx::_thread_idx_x() as u32 }
}

/// `%ntid.x`.
#[inline(always)]
pub fn block_dim() -> u32 {
    unsafe { nvptx::_block_dim_x() as u32 }
}

/// `%ctaid.x`.
#[inline(always)]
pub fn block_idx() -> u32 {
    unsafe { nvptx::_block_idx_x() as u32 }
}

/// `%nctaid.x`.
#[inline(always)]
pub fn grid_dim() -> u32 {
    unsafe { nvptx::_grid_dim_x() as u32 }
}

/// `bar.sync 0` (through `llvm.nvvm.barrier0`, which LLVM treats as convergent).
#[inline(always)]
pub fn sync_threads() {
    unsafe { nvptx::_syncthreads() }
}

/// `trap;`: a kernel panic aborts the launch instead of spinning.
#[inline(always)]
pub fn trap() -> ! {
    unsafe { nvptx::trap() }
}

/// `a / b` and `a % b` without core's divide-by-zero panic path (a zero `b` traps).
#[inline(always)]
pub fn div_rem(a: u64, b: u64) -> (u64, u64) {
    match core::num::NonZeroU64::new(b) {
        Some(b) => (a / b, a % b),
        None => trap(),
    }
}

/// `shfl.sync.bfly.b32` over the full warp, for `f32`.
#[inline(always)]
pub fn shfl_xor_f32(value: f32, lane_mask: u32) -> f32 {
    unsafe { llvm_shfl_sync_bfly_f32(-1, value, lane_mask as i32, 0x1f) }
}

/// `shfl.sync.bfly.b32` over the full warp, for `u32`.
#[inline(always)]
pub fn shfl_xor_u32(value: u32, lane_mask: u32) -> u32 {
    unsafe { llvm_shfl_sync_bfly_i32(-1, value as i32, lane_mask as i32, 0x1f) as u32 }
}

/// `shfl.sync.idx.b32` over the full warp: lane `lane`'s `value` (`lane` < 32), in every lane.
#[inline(always)]
pub fn shfl_idx_u32(value: u32, lane: u32) -> u32 {
    unsafe { llvm_shfl_sync_idx_i32(-1, value as i32, lane as i32, 0x1f) as u32 }
}

/// `fma.rn.f32`: `a * b + c` with one rounding.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    unsafe { llvm_fma_f32(a, b, c) }
}

/// `x`, computed here: an opaque `mov` with side effects, so that LLVM does not sink the
/// computation of `x` to where it is used ([`CallScales::now`](crate::opts::CallScales::now),
/// whose divisions must come before the chunk's loads).
#[inline(always)]
pub fn here(x: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!("mov.b32 {y}, {x};", y = out(reg32) y, x = in(reg32) x, options(nomem, nostack));
    }
    y
}

/// `a / b` with the bits of `div.rn.f32`, computed in f64 (`div.rn.f64`, then one rounding to
/// f32: 53 >= 2 x 24 + 2 bits make the double rounding innocuous). ptxas calls another
/// subroutine for its slow path, which holds fewer registers across the code around it
/// ([`Mode::F64_DIVISION`](crate::opts::Mode::F64_DIVISION)). In asm because LLVM folds an f64
/// division of two widened f32 values back into `div.rn.f32`.
#[inline(always)]
pub fn div_rn_f64(a: f32, b: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!(
            "{{ .reg .f64 %xa, %xb; cvt.f64.f32 %xa, {a}; cvt.f64.f32 %xb, {b}; div.rn.f64 %xa, %xa, %xb; cvt.rn.f32.f64 {y}, %xa; }}",
            y = out(reg32) y, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack),
        );
    }
    y
}

/// `1 / a` with the bits of `rcp.rn.f32`, computed in f64 as [`div_rn_f64`] is.
#[inline(always)]
pub fn rcp_rn_f64(a: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!(
            "{{ .reg .f64 %xa; cvt.f64.f32 %xa, {a}; rcp.rn.f64 %xa, %xa; cvt.rn.f32.f64 {y}, %xa; }}",
            y = out(reg32) y, a = in(reg32) a, options(pure, nomem, nostack),
        );
    }
    y
}

/// `ex2.approx.ftz.f32`: 2^x (relative error about 2^-22; `ex2(-inf) = +0`).
#[inline(always)]
pub fn ex2(x: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!("ex2.approx.ftz.f32 {y}, {x};", y = out(reg32) y, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    y
}

/// `rcp.approx.ftz.f32`: 1/x (at most 1 ulp from the rounded reciprocal; `rcp(inf) = +0`).
#[inline(always)]
pub fn rcp(x: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!("rcp.approx.ftz.f32 {y}, {x};", y = out(reg32) y, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    y
}

/// `max.NaN.f32`: the larger of `a` and `b`, NaN when either is (PTX ISA 7.0, sm_80 on;
/// `f32::max` returns the other operand instead).
#[inline(always)]
pub fn max_nan(a: f32, b: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!("max.NaN.f32 {y}, {a}, {b};", y = out(reg32) y, a = in(reg32) a, b = in(reg32) b,
             options(pure, nomem, nostack));
    }
    y
}

/// `lg2.approx.ftz.f32`: log2(x).
#[inline(always)]
pub fn lg2(x: f32) -> f32 {
    let y: f32;
    unsafe {
        asm!("lg2.approx.ftz.f32 {y}, {x};", y = out(reg32) y, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    y
}

/// `cvt.f32.f16`: widen an IEEE half.
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let y: f32;
    unsafe {
        asm!("cvt.f32.f16 {y}, {h};", y = out(reg32) y, h = in(reg16) bits,
             options(pure, nomem, nostack));
    }
    y
}

/// `max.bf16x2`: the lane-wise maximum of two pairs of bfloat16s; a NaN lane gives the other
/// operand's lane (as `f32::max`).
#[inline(always)]
pub fn max_bf16x2(a: u32, b: u32) -> u32 {
    let d: u32;
    unsafe {
        asm!("max.bf16x2 {d}, {a}, {b};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b,
             options(pure, nomem, nostack));
    }
    d
}

/// `max.f16x2`: the lane-wise maximum of two pairs of halves; a NaN lane gives the other
/// operand's lane (as `f32::max`).
#[inline(always)]
pub fn max_f16x2(a: u32, b: u32) -> u32 {
    let d: u32;
    unsafe {
        asm!("max.f16x2 {d}, {a}, {b};", d = out(reg32) d, a = in(reg32) a, b = in(reg32) b,
             options(pure, nomem, nostack));
    }
    d
}

/// `cvt.rn.f16x2.f32`: round two floats to halves, `hi` in the upper 16 bits.
#[inline(always)]
pub fn pack_f16x2(hi: f32, lo: f32) -> u32 {
    let d: u32;
    unsafe {
        asm!("cvt.rn.f16x2.f32 {d}, {a}, {b};", d = out(reg32) d, a = in(reg32) hi,
             b = in(reg32) lo, options(pure, nomem, nostack));
    }
    d
}

/// `cvt.rn.bf16x2.f32`: round two floats to bfloat16s, `hi` in the upper 16 bits.
#[inline(always)]
pub fn pack_bf16x2(hi: f32, lo: f32) -> u32 {
    let d: u32;
    unsafe {
        asm!("cvt.rn.bf16x2.f32 {d}, {a}, {b};", d = out(reg32) d, a = in(reg32) hi,
             b = in(reg32) lo, options(pure, nomem, nostack));
    }
    d
}

/// `ld.global.v4.u32`: one 16-byte load. `addr` must be 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_global_v4(addr: u64) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("ld.global.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
             a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
             p = in(reg64) addr, options(readonly, nostack));
    }
    [a, b, c, d]
}

/// `st.global.v4.u32`: one 16-byte store. `addr` must be 16-byte aligned.
#[inline(always)]
pub unsafe fn st_global_v4(addr: u64, w: [u32; 4]) {
    unsafe {
        asm!("st.global.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
             p = in(reg64) addr, a = in(reg32) w[0], b = in(reg32) w[1], c = in(reg32) w[2],
             d = in(reg32) w[3], options(nostack));
    }
}

/// `ld.global.u16`.
#[inline(always)]
pub unsafe fn ld_global_u16(addr: u64) -> u16 {
    let v: u16;
    unsafe {
        asm!("ld.global.u16 {v}, [{p}];", v = out(reg16) v, p = in(reg64) addr,
             options(readonly, nostack));
    }
    v
}

/// `ld.global.u32`.
#[inline(always)]
pub unsafe fn ld_global_u32(addr: u64) -> u32 {
    let v: u32;
    unsafe {
        asm!("ld.global.u32 {v}, [{p}];", v = out(reg32) v, p = in(reg64) addr,
             options(readonly, nostack));
    }
    v
}

/// `ld.global.u64`.
#[inline(always)]
pub unsafe fn ld_global_u64(addr: u64) -> u64 {
    let v: u64;
    unsafe {
        asm!("ld.global.u64 {v}, [{p}];", v = out(reg64) v, p = in(reg64) addr,
             options(readonly, nostack));
    }
    v
}

/// `st.global.u16`.
#[inline(always)]
pub unsafe fn st_global_u16(addr: u64, v: u16) {
    unsafe { asm!("st.global.u16 [{p}], {v};", p = in(reg64) addr, v = in(reg16) v, options(nostack)) }
}

/// `st.global.u32`.
#[inline(always)]
pub unsafe fn st_global_u32(addr: u64, v: u32) {
    unsafe { asm!("st.global.u32 [{p}], {v};", p = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// `st.global.u64`.
#[inline(always)]
pub unsafe fn st_global_u64(addr: u64, v: u64) {
    unsafe { asm!("st.global.u64 [{p}], {v};", p = in(reg64) addr, v = in(reg64) v, options(nostack)) }
}

/// `red.global.add.u32`: atomic add, result unused.
#[inline(always)]
pub unsafe fn red_add_u32(addr: u64, v: u32) {
    unsafe { asm!("red.global.add.u32 [{p}], {v};", p = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// `atom.global.inc.u32`: returns the word's old value and stores `old + 1`, or 0 where `old`
/// is at least `limit` (a counter that wraps after `limit + 1` increments).
#[inline(always)]
pub unsafe fn atom_inc_u32(addr: u64, limit: u32) -> u32 {
    let old: u32;
    unsafe {
        asm!("atom.global.inc.u32 {old}, [{p}], {limit};", old = out(reg32) old, p = in(reg64) addr,
             limit = in(reg32) limit, options(nostack));
    }
    old
}

/// `atom.acq_rel.gpu.global.inc.u32`: [`atom_inc_u32`] as one release and acquire at GPU scope,
/// so this thread's accesses before it happen before a later acquirer's that reads its value,
/// and those after it see what earlier releasers wrote (in place of a fence before the atomic).
#[inline(always)]
pub unsafe fn atom_inc_acq_rel_gpu_u32(addr: u64, limit: u32) -> u32 {
    let old: u32;
    unsafe {
        asm!("atom.acq_rel.gpu.global.inc.u32 {old}, [{p}], {limit};", old = out(reg32) old,
             p = in(reg64) addr, limit = in(reg32) limit, options(nostack));
    }
    old
}

/// `ld.global.cg.u32`: a load that skips L1 (which is not coherent across SMs), for values
/// another CTA wrote during this launch.
#[inline(always)]
pub unsafe fn ld_global_cg_u32(addr: u64) -> u32 {
    let v: u32;
    unsafe {
        asm!("ld.global.cg.u32 {v}, [{p}];", v = out(reg32) v, p = in(reg64) addr, options(nostack));
    }
    v
}

/// `ld.global.cg.v4.u32`: [`ld_global_v4`] skipping L1, for values another CTA wrote during
/// this launch. `addr` must be 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_global_cg_v4(addr: u64) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("ld.global.cg.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
             a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
             p = in(reg64) addr, options(nostack));
    }
    [a, b, c, d]
}

/// `nanosleep.u32 N`: suspends the thread for about `N` nanoseconds (at most 1 ms), to wait on a
/// flag without taking the memory system's time.
#[inline(always)]
pub fn nanosleep(ns: u32) {
    unsafe { asm!("nanosleep.u32 {n};", n = in(reg32) ns, options(nostack)) };
}

/// `ld.acquire.gpu.global.u32`: a load that orders this thread's later accesses after it, and
/// sees what a release to the same address made visible.
#[inline(always)]
pub unsafe fn ld_acquire_gpu_u32(addr: u64) -> u32 {
    let v: u32;
    unsafe {
        asm!("ld.acquire.gpu.global.u32 {v}, [{p}];", v = out(reg32) v, p = in(reg64) addr,
             options(nostack));
    }
    v
}

/// `st.relaxed.gpu.global.b64`: a 64-bit store other CTAs see whole (single-copy atomic), with
/// no ordering of this thread's other accesses: a value and its tag in one word.
#[inline(always)]
pub unsafe fn st_relaxed_gpu_u64(addr: u64, v: u64) {
    unsafe {
        asm!("st.relaxed.gpu.global.b64 [{p}], {v};", p = in(reg64) addr, v = in(reg64) v,
             options(nostack));
    }
}

/// `ld.relaxed.gpu.global.b64`: a 64-bit load, whole, that sees other CTAs' stores as they land
/// (no stale L1 copy), with no ordering of this thread's other accesses.
#[inline(always)]
pub unsafe fn ld_relaxed_gpu_u64(addr: u64) -> u64 {
    let v: u64;
    unsafe {
        asm!("ld.relaxed.gpu.global.b64 {v}, [{p}];", v = out(reg64) v, p = in(reg64) addr,
             options(nostack));
    }
    v
}

/// `red.release.gpu.global.add.u32`: an atomic add that orders this thread's earlier writes
/// before it, at GPU scope.
#[inline(always)]
pub unsafe fn red_add_release_gpu_u32(addr: u64, v: u32) {
    unsafe {
        asm!("red.release.gpu.global.add.u32 [{p}], {v};", p = in(reg64) addr, v = in(reg32) v,
             options(nostack));
    }
}

/// `fence.acq_rel.gpu`: this thread's memory accesses before it happen before those after it,
/// at GPU scope.
#[inline(always)]
pub fn fence_acq_rel_gpu() {
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
}

/// `mov.u32 %r, xent_dyn_smem;`: the shared-window address of the dynamic shared memory.
#[inline(always)]
pub fn smem_base() -> u32 {
    let a: u32;
    unsafe { asm!("mov.u32 {a}, xent_dyn_smem;", a = out(reg32) a, options(pure, nomem, nostack)) }
    a
}

/// `ld.shared.v4.u32`. `addr` (shared window) must be 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_shared_v4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("ld.shared.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
             a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
             p = in(reg32) addr, options(readonly, nostack));
    }
    [a, b, c, d]
}

/// `st.shared.v4.u32`. `addr` (shared window) must be 16-byte aligned.
#[inline(always)]
pub unsafe fn st_shared_v4(addr: u32, w: [u32; 4]) {
    unsafe {
        asm!("st.shared.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
             p = in(reg32) addr, a = in(reg32) w[0], b = in(reg32) w[1], c = in(reg32) w[2],
             d = in(reg32) w[3], options(nostack));
    }
}

/// `ld.shared.u16`.
#[inline(always)]
pub unsafe fn ld_shared_u16(addr: u32) -> u16 {
    let v: u16;
    unsafe {
        asm!("ld.shared.u16 {v}, [{p}];", v = out(reg16) v, p = in(reg32) addr,
             options(readonly, nostack));
    }
    v
}

/// `ld.shared.v2.u32`: two words at an 8-byte aligned address.
#[inline(always)]
pub unsafe fn ld_shared_v2(addr: u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    unsafe {
        asm!("ld.shared.v2.u32 {{{a}, {b}}}, [{p}];", a = out(reg32) a, b = out(reg32) b, p = in(reg32) addr,
             options(readonly, nostack));
    }
    [a, b]
}

/// `st.shared.v2.u32`: two words at an 8-byte aligned address.
#[inline(always)]
pub unsafe fn st_shared_v2(addr: u32, w: [u32; 2]) {
    unsafe {
        asm!("st.shared.v2.u32 [{p}], {{{a}, {b}}};", p = in(reg32) addr, a = in(reg32) w[0], b = in(reg32) w[1],
             options(nostack));
    }
}

/// `ld.shared.u32`.
#[inline(always)]
pub unsafe fn ld_shared_u32(addr: u32) -> u32 {
    let v: u32;
    unsafe {
        asm!("ld.shared.u32 {v}, [{p}];", v = out(reg32) v, p = in(reg32) addr,
             options(readonly, nostack));
    }
    v
}

/// `st.shared.u16`.
#[inline(always)]
pub unsafe fn st_shared_u16(addr: u32, v: u16) {
    unsafe { asm!("st.shared.u16 [{p}], {v};", p = in(reg32) addr, v = in(reg16) v, options(nostack)) }
}

/// `st.shared.u32`.
#[inline(always)]
pub unsafe fn st_shared_u32(addr: u32, v: u32) {
    unsafe { asm!("st.shared.u32 [{p}], {v};", p = in(reg32) addr, v = in(reg32) v, options(nostack)) }
}

/// `barrier.cluster.arrive.release;` (the non-`.aligned` form: see the module doc).
#[cfg(xent_cluster)]
#[inline(always)]
pub fn cluster_arrive() {
    unsafe { asm!("barrier.cluster.arrive.release;", options(nostack)) }
}

/// `barrier.cluster.wait.acquire;` (the non-`.aligned` form).
#[cfg(xent_cluster)]
#[inline(always)]
pub fn cluster_wait() {
    unsafe { asm!("barrier.cluster.wait.acquire;", options(nostack)) }
}

/// `griddepcontrol.wait;`: with a programmatic dependent launch, waits until the grids this one
/// depends on have completed and their memory is visible; without one, returns at once. Nothing
/// may read or write global memory before it.
#[cfg(xent_cluster)]
#[inline(always)]
pub fn grid_dependency_wait() {
    unsafe { asm!("griddepcontrol.wait;", options(nostack)) }
}

/// `griddepcontrol.launch_dependents;`: lets a grid launched after this one with a programmatic
/// dependency start (it waits in [`grid_dependency_wait`] for this grid's completion).
#[cfg(xent_cluster)]
#[inline(always)]
pub fn launch_dependents() {
    unsafe { asm!("griddepcontrol.launch_dependents;", options(nostack)) }
}

/// `mapa.shared::cluster.u32`: the address of this CTA's shared-memory `addr` in CTA `rank`.
#[cfg(xent_cluster)]
#[inline(always)]
pub fn map_shared_rank(addr: u32, rank: u32) -> u32 {
    let d: u32;
    unsafe {
        asm!("mapa.shared::cluster.u32 {d}, {a}, {r};", d = out(reg32) d, a = in(reg32) addr,
             r = in(reg32) rank, options(pure, nomem, nostack));
    }
    d
}

/// `ld.shared::cluster.u32`: a load from another CTA's shared memory (distributed shared memory).
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn ld_shared_cluster_u32(addr: u32) -> u32 {
    let v: u32;
    unsafe {
        asm!("ld.shared::cluster.u32 {v}, [{a}];", v = out(reg32) v, a = in(reg32) addr,
             options(readonly, nostack));
    }
    v
}

/// `st.shared::cluster.u32`: a store into another CTA's shared memory (distributed shared memory).
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn st_shared_cluster_u32(addr: u32, v: u32) {
    unsafe { asm!("st.shared::cluster.u32 [{a}], {v};", a = in(reg32) addr, v = in(reg32) v, options(nostack)) }
}

/// `mbarrier.init.shared::cta.b64 [addr], count;` (sm_90 bulk copies complete on it).
#[cfg(any(xent_cluster, xent_wgmma))]
#[inline(always)]
pub unsafe fn mbarrier_init(addr: u32, count: u32) {
    unsafe {
        asm!("mbarrier.init.shared::cta.b64 [{a}], {c};", a = in(reg32) addr, c = in(reg32) count,
             options(nostack));
    }
}

/// `fence.mbarrier_init.release.cluster; fence.proxy.async.shared::cta;`: makes an initialised
/// mbarrier visible to the bulk-copy (async) proxy.
#[cfg(any(xent_cluster, xent_wgmma))]
#[inline(always)]
pub fn fence_mbarrier_init() {
    unsafe {
        asm!("fence.mbarrier_init.release.cluster;", "fence.proxy.async.shared::cta;",
             options(nostack));
    }
}

/// `mbarrier.arrive.expect_tx.shared::cta.b64 _, [addr], bytes;`: this thread's arrival, and the
/// bytes the barrier's current phase must still receive.
#[cfg(any(xent_cluster, xent_wgmma))]
#[inline(always)]
pub unsafe fn mbarrier_arrive_expect_tx(addr: u32, bytes: u32) {
    unsafe {
        asm!("mbarrier.arrive.expect_tx.shared::cta.b64 _, [{a}], {b};", a = in(reg32) addr,
             b = in(reg32) bytes, options(nostack));
    }
}

/// `cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], bytes, [mbar];`:
/// the copy engine moves `bytes` (a multiple of 16; both addresses 16-byte aligned) from global
/// memory to this CTA's shared memory and signals `mbar`.
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn bulk_copy_to_shared(dst: u32, src: u64, bytes: u32, mbar: u32) {
    unsafe {
        asm!("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [{d}], [{s}], {n}, [{m}];",
             d = in(reg32) dst, s = in(reg64) src, n = in(reg32) bytes, m = in(reg32) mbar,
             options(nostack));
    }
}

/// `cp.async.bulk.prefetch.L2.global [src], bytes;`: brings `bytes` (a multiple of 16) from the
/// 16-byte aligned global address `src` into L2, without waiting.
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn bulk_prefetch_l2(src: u64, bytes: u32) {
    unsafe { asm!("cp.async.bulk.prefetch.L2.global [{s}], {n};", s = in(reg64) src, n = in(reg32) bytes, options(nostack)) };
}

/// `%globaltimer` (nanoseconds) for the phase timeline of `--cfg xent_trace` builds.
#[cfg(xent_trace)]
#[inline(always)]
pub fn global_timer() -> u64 {
    let t: u64;
    unsafe { asm!("mov.u64 {t}, %globaltimer;", t = out(reg64) t, options(nomem, nostack)) }
    t
}

/// `%smid` for the phase timeline of `--cfg xent_trace` builds.
#[cfg(xent_trace)]
#[inline(always)]
pub fn sm_id() -> u32 {
    let a: u32;
    unsafe { asm!("mov.u32 {a}, %smid;", a = out(reg32) a, options(nomem, nostack)) }
    a
}

/// `%nsmid`: the number of SMs (an upper bound on `%smid`).
#[inline(always)]
pub fn sm_count() -> u32 {
    let a: u32;
    unsafe { asm!("mov.u32 {a}, %nsmid;", a = out(reg32) a, options(pure, nomem, nostack)) }
    a
}

/// `%dynamic_smem_size`: this launch's dynamic shared memory per CTA, in bytes.
#[inline(always)]
pub fn dynamic_smem_size() -> u32 {
    let a: u32;
    unsafe { asm!("mov.u32 {a}, %dynamic_smem_size;", a = out(reg32) a, options(pure, nomem, nostack)) }
    a
}

/// `mbarrier.inval.shared::cta.b64 [addr];`: the barrier's memory may serve something else.
#[cfg(xent_cluster)]
#[inline(always)]
pub unsafe fn mbarrier_inval(addr: u32) {
    unsafe { asm!("mbarrier.inval.shared::cta.b64 [{a}];", a = in(reg32) addr, options(nostack)) }
}

/// `mbarrier.try_wait.parity.shared::cta.b64`: whether the phase with `parity` has completed
/// (waits a bounded, hardware-chosen time before answering false).
#[cfg(any(xent_cluster, xent_wgmma))]
#[inline(always)]
pub unsafe fn mbarrier_try_wait(addr: u32, parity: u32) -> bool {
    let done: u32;
    unsafe {
        asm!("{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{a}], {q}; selp.u32 {d}, 1, 0, p; }}",
             d = out(reg32) done, a = in(reg32) addr, q = in(reg32) parity, options(nostack));
    }
    done != 0
}

/// `mbarrier.arrive.shared::cta.b64 _, [addr];`: this thread's arrival on the barrier's current
/// phase.
#[cfg(xent_wgmma)]
#[inline(always)]
pub unsafe fn mbarrier_arrive(addr: u32) {
    unsafe {
        asm!("mbarrier.arrive.shared::cta.b64 _, [{a}];", a = in(reg32) addr, options(nostack));
    }
}

/// Waits until the barrier's phase with `parity` has completed ([`mbarrier_try_wait`] in a loop).
#[cfg(xent_wgmma)]
#[inline(always)]
pub unsafe fn mbarrier_wait(addr: u32, parity: u32) {
    while !unsafe { mbarrier_try_wait(addr, parity) } {}
}

/// `cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes`: the tensor
/// memory accelerator copies the box at coordinates (`x` innermost, `y`) of the tensor map at
/// generic address `tmap` (64-byte aligned, in parameter space: [`param_block_generic!`]) to
/// shared `dst`, laid out (and
/// swizzled) as the map says, zeros where the box leaves the tensor, and signals `mbar` with its
/// bytes.
#[cfg(xent_wgmma)]
#[inline(always)]
pub unsafe fn tma_load_2d(dst: u32, tmap: u64, x: u32, y: u32, mbar: u32) {
    unsafe {
        asm!("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{d}], [{t}, {{{x}, {y}}}], [{m}];",
             d = in(reg32) dst, t = in(reg64) tmap, x = in(reg32) x, y = in(reg32) y,
             m = in(reg32) mbar, options(nostack));
    }
}

/// Whether `p` holds in every active lane of the warp (`vote.sync.all` over `activemask`), so a
/// branch on it takes those lanes one way. Not `pure`: it must not be merged across branches.
#[inline(always)]
pub fn warp_all(p: bool) -> bool {
    let r: u32;
    unsafe {
        asm!(
            "{{ .reg .pred %wa_p, %wa_q; .reg .b32 %wa_m;",
            "activemask.b32 %wa_m;",
            "setp.ne.u32 %wa_p, {x}, 0;",
            "vote.sync.all.pred %wa_q, %wa_p, %wa_m;",
            "selp.u32 {r}, 1, 0, %wa_q; }}",
            r = out(reg32) r, x = in(reg32) p as u32, options(nomem, nostack));
    }
    r != 0
}

/// The largest `v` of the warp's active lanes (`redux.sync.max.u32` over `activemask`; sm_80 on).
/// Not `pure`, as [`warp_all`].
#[inline(always)]
pub fn warp_max_u32(v: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!(
            "{{ .reg .b32 %wm_m;",
            "activemask.b32 %wm_m;",
            "redux.sync.max.u32 {r}, {v}, %wm_m; }}",
            r = out(reg32) r, v = in(reg32) v, options(nomem, nostack));
    }
    r
}

/// `v` of the warp's first lane (`shfl.sync.idx` from lane 0): a value ptxas knows is the same
/// across the warp, so branches on it are not divergent (the `wgmma` kernels' roles).
#[inline(always)]
pub fn warp_uniform(v: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {v}, 0, 31, -1;", r = out(reg32) r, v = in(reg32) v,
             options(pure, nomem, nostack));
    }
    r
}

/// `cp.async.cg.shared.global` of 16 bytes from global `src` to shared `dst`, or 16 zero bytes
/// when `valid` is false (its source size 0).
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: u64, valid: bool) {
    let size: u32 = if valid { 16 } else { 0 };
    unsafe {
        asm!("cp.async.cg.shared.global [{d}], [{s}], 16, {n};", d = in(reg32) dst, s = in(reg64) src,
             n = in(reg32) size, options(nostack));
    }
}

/// `cp.async.commit_group`.
#[inline(always)]
pub fn cp_async_commit() {
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}

/// `cp.async.wait_group 1`: waits until at most one group of copies is in flight.
#[inline(always)]
pub fn cp_async_wait_one() {
    unsafe { asm!("cp.async.wait_group 1;", options(nostack)) };
}

/// `cp.async.wait_group 0`: waits for every copy.
#[inline(always)]
pub fn cp_async_wait_all() {
    unsafe { asm!("cp.async.wait_group 0;", options(nostack)) };
}

/// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`: four 8x8 b16 matrices; lane `l` gives the address of row `l % 8` of matrix
/// `l / 8`.
#[inline(always)]
pub unsafe fn ldmatrix_x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];",
             a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
             p = in(reg32) addr, options(nostack, readonly));
    }
    [a, b, c, d]
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: `acc += a · b` on one m16n8k16 tile
/// (bf16 in, f32 accumulated).
#[inline(always)]
pub fn mma_bf16(acc: &mut [f32; 4], a: [u32; 4], b0: u32, b1: u32) {
    unsafe {
        asm!("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, \
              {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
             d0 = inout(reg32) acc[0], d1 = inout(reg32) acc[1], d2 = inout(reg32) acc[2],
             d3 = inout(reg32) acc[3], a0 = in(reg32) a[0], a1 = in(reg32) a[1],
             a2 = in(reg32) a[2], a3 = in(reg32) a[3], b0 = in(reg32) b0, b1 = in(reg32) b1,
             options(pure, nomem, nostack));
    }
}

/// `wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16` (sm_90a): `acc += A·B` (or `= A·B`
/// when `accumulate` is false) for the warpgroup's 64 x 128 tile, A (64 x 16) and B (16 x 128,
/// K-major) in shared memory by the descriptors [`wgmma_desc`] makes. Asynchronous: between
/// [`wgmma_fence`] and [`wgmma_commit`] / [`wgmma_wait_all`].
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_m64n128k16_bf16(acc: &mut [f32; 64], desc_a: u64, desc_b: u64, accumulate: bool) {
    let scale_d: u32 = accumulate as u32;
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.b32 p, {sd}, 0; \
              wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 \
              {{{d0}, {d1}, {d2}, {d3}, {d4}, {d5}, {d6}, {d7}, {d8}, {d9}, {d10}, {d11}, {d12}, {d13}, {d14}, {d15}, {d16}, {d17}, {d18}, {d19}, {d20}, {d21}, {d22}, {d23}, {d24}, {d25}, {d26}, {d27}, {d28}, {d29}, {d30}, {d31}, {d32}, {d33}, {d34}, {d35}, {d36}, {d37}, {d38}, {d39}, {d40}, {d41}, {d42}, {d43}, {d44}, {d45}, {d46}, {d47}, {d48}, {d49}, {d50}, {d51}, {d52}, {d53}, {d54}, {d55}, {d56}, {d57}, {d58}, {d59}, {d60}, {d61}, {d62}, {d63}}}, {da}, {db}, p, 1, 1, 0, 0; }}",
             d0 = inout(reg32) acc[0],
             d1 = inout(reg32) acc[1],
             d2 = inout(reg32) acc[2],
             d3 = inout(reg32) acc[3],
             d4 = inout(reg32) acc[4],
             d5 = inout(reg32) acc[5],
             d6 = inout(reg32) acc[6],
             d7 = inout(reg32) acc[7],
             d8 = inout(reg32) acc[8],
             d9 = inout(reg32) acc[9],
             d10 = inout(reg32) acc[10],
             d11 = inout(reg32) acc[11],
             d12 = inout(reg32) acc[12],
             d13 = inout(reg32) acc[13],
             d14 = inout(reg32) acc[14],
             d15 = inout(reg32) acc[15],
             d16 = inout(reg32) acc[16],
             d17 = inout(reg32) acc[17],
             d18 = inout(reg32) acc[18],
             d19 = inout(reg32) acc[19],
             d20 = inout(reg32) acc[20],
             d21 = inout(reg32) acc[21],
             d22 = inout(reg32) acc[22],
             d23 = inout(reg32) acc[23],
             d24 = inout(reg32) acc[24],
             d25 = inout(reg32) acc[25],
             d26 = inout(reg32) acc[26],
             d27 = inout(reg32) acc[27],
             d28 = inout(reg32) acc[28],
             d29 = inout(reg32) acc[29],
             d30 = inout(reg32) acc[30],
             d31 = inout(reg32) acc[31],
             d32 = inout(reg32) acc[32],
             d33 = inout(reg32) acc[33],
             d34 = inout(reg32) acc[34],
             d35 = inout(reg32) acc[35],
             d36 = inout(reg32) acc[36],
             d37 = inout(reg32) acc[37],
             d38 = inout(reg32) acc[38],
             d39 = inout(reg32) acc[39],
             d40 = inout(reg32) acc[40],
             d41 = inout(reg32) acc[41],
             d42 = inout(reg32) acc[42],
             d43 = inout(reg32) acc[43],
             d44 = inout(reg32) acc[44],
             d45 = inout(reg32) acc[45],
             d46 = inout(reg32) acc[46],
             d47 = inout(reg32) acc[47],
             d48 = inout(reg32) acc[48],
             d49 = inout(reg32) acc[49],
             d50 = inout(reg32) acc[50],
             d51 = inout(reg32) acc[51],
             d52 = inout(reg32) acc[52],
             d53 = inout(reg32) acc[53],
             d54 = inout(reg32) acc[54],
             d55 = inout(reg32) acc[55],
             d56 = inout(reg32) acc[56],
             d57 = inout(reg32) acc[57],
             d58 = inout(reg32) acc[58],
             d59 = inout(reg32) acc[59],
             d60 = inout(reg32) acc[60],
             d61 = inout(reg32) acc[61],
             d62 = inout(reg32) acc[62],
             d63 = inout(reg32) acc[63],
             da = in(reg64) desc_a, db = in(reg64) desc_b, sd = in(reg32) scale_d,
             options(nostack));
    }
}

/// `wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16` (sm_90a): as
/// [`wgmma_m64n128k16_bf16`] for a 64 x 256 tile (B 16 x 256, K-major): 128 accumulators a thread,
/// `acc[4·j + 2·h + e]` (`lo` then `hi`) at row `16·warp + lane / 4 + 8·h`, column
/// `8·j + 2·(lane % 4) + e`. `A_MN` 1 sets A's `imm-trans` bit (A stored as 16 rows of K by 64
/// of M, in the layout [`wgmma_desc_sw128_mn`] describes; 0: K-major, [`wgmma_desc_sw128`]), `B_MN`
/// 1 B's (16 rows of K by 256 of N).
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_m64n256k16_bf16<const A_MN: u32, const B_MN: u32>(
    lo: &mut [f32; 64],
    hi: &mut [f32; 64],
    desc_a: u64,
    desc_b: u64,
    accumulate: bool,
) {
    let scale_d: u32 = accumulate as u32;
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.b32 p, {sd}, 0; \
              wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 \
              {{{d0}, {d1}, {d2}, {d3}, {d4}, {d5}, {d6}, {d7}, {d8}, {d9}, {d10}, {d11}, {d12}, {d13}, {d14}, {d15}, {d16}, {d17}, {d18}, {d19}, {d20}, {d21}, {d22}, {d23}, {d24}, {d25}, {d26}, {d27}, {d28}, {d29}, {d30}, {d31}, {d32}, {d33}, {d34}, {d35}, {d36}, {d37}, {d38}, {d39}, {d40}, {d41}, {d42}, {d43}, {d44}, {d45}, {d46}, {d47}, {d48}, {d49}, {d50}, {d51}, {d52}, {d53}, {d54}, {d55}, {d56}, {d57}, {d58}, {d59}, {d60}, {d61}, {d62}, {d63}, {d64}, {d65}, {d66}, {d67}, {d68}, {d69}, {d70}, {d71}, {d72}, {d73}, {d74}, {d75}, {d76}, {d77}, {d78}, {d79}, {d80}, {d81}, {d82}, {d83}, {d84}, {d85}, {d86}, {d87}, {d88}, {d89}, {d90}, {d91}, {d92}, {d93}, {d94}, {d95}, {d96}, {d97}, {d98}, {d99}, {d100}, {d101}, {d102}, {d103}, {d104}, {d105}, {d106}, {d107}, {d108}, {d109}, {d110}, {d111}, {d112}, {d113}, {d114}, {d115}, {d116}, {d117}, {d118}, {d119}, {d120}, {d121}, {d122}, {d123}, {d124}, {d125}, {d126}, {d127}}}, {da}, {db}, p, 1, 1, {ta}, {tb}; }}",
             d0 = inout(reg32) lo[0],
             d1 = inout(reg32) lo[1],
             d2 = inout(reg32) lo[2],
             d3 = inout(reg32) lo[3],
             d4 = inout(reg32) lo[4],
             d5 = inout(reg32) lo[5],
             d6 = inout(reg32) lo[6],
             d7 = inout(reg32) lo[7],
             d8 = inout(reg32) lo[8],
             d9 = inout(reg32) lo[9],
             d10 = inout(reg32) lo[10],
             d11 = inout(reg32) lo[11],
             d12 = inout(reg32) lo[12],
             d13 = inout(reg32) lo[13],
             d14 = inout(reg32) lo[14],
             d15 = inout(reg32) lo[15],
             d16 = inout(reg32) lo[16],
             d17 = inout(reg32) lo[17],
             d18 = inout(reg32) lo[18],
             d19 = inout(reg32) lo[19],
             d20 = inout(reg32) lo[20],
             d21 = inout(reg32) lo[21],
             d22 = inout(reg32) lo[22],
             d23 = inout(reg32) lo[23],
             d24 = inout(reg32) lo[24],
             d25 = inout(reg32) lo[25],
             d26 = inout(reg32) lo[26],
             d27 = inout(reg32) lo[27],
             d28 = inout(reg32) lo[28],
             d29 = inout(reg32) lo[29],
             d30 = inout(reg32) lo[30],
             d31 = inout(reg32) lo[31],
             d32 = inout(reg32) lo[32],
             d33 = inout(reg32) lo[33],
             d34 = inout(reg32) lo[34],
             d35 = inout(reg32) lo[35],
             d36 = inout(reg32) lo[36],
             d37 = inout(reg32) lo[37],
             d38 = inout(reg32) lo[38],
             d39 = inout(reg32) lo[39],
             d40 = inout(reg32) lo[40],
             d41 = inout(reg32) lo[41],
             d42 = inout(reg32) lo[42],
             d43 = inout(reg32) lo[43],
             d44 = inout(reg32) lo[44],
             d45 = inout(reg32) lo[45],
             d46 = inout(reg32) lo[46],
             d47 = inout(reg32) lo[47],
             d48 = inout(reg32) lo[48],
             d49 = inout(reg32) lo[49],
             d50 = inout(reg32) lo[50],
             d51 = inout(reg32) lo[51],
             d52 = inout(reg32) lo[52],
             d53 = inout(reg32) lo[53],
             d54 = inout(reg32) lo[54],
             d55 = inout(reg32) lo[55],
             d56 = inout(reg32) lo[56],
             d57 = inout(reg32) lo[57],
             d58 = inout(reg32) lo[58],
             d59 = inout(reg32) lo[59],
             d60 = inout(reg32) lo[60],
             d61 = inout(reg32) lo[61],
             d62 = inout(reg32) lo[62],
             d63 = inout(reg32) lo[63],
             d64 = inout(reg32) hi[0],
             d65 = inout(reg32) hi[1],
             d66 = inout(reg32) hi[2],
             d67 = inout(reg32) hi[3],
             d68 = inout(reg32) hi[4],
             d69 = inout(reg32) hi[5],
             d70 = inout(reg32) hi[6],
             d71 = inout(reg32) hi[7],
             d72 = inout(reg32) hi[8],
             d73 = inout(reg32) hi[9],
             d74 = inout(reg32) hi[10],
             d75 = inout(reg32) hi[11],
             d76 = inout(reg32) hi[12],
             d77 = inout(reg32) hi[13],
             d78 = inout(reg32) hi[14],
             d79 = inout(reg32) hi[15],
             d80 = inout(reg32) hi[16],
             d81 = inout(reg32) hi[17],
             d82 = inout(reg32) hi[18],
             d83 = inout(reg32) hi[19],
             d84 = inout(reg32) hi[20],
             d85 = inout(reg32) hi[21],
             d86 = inout(reg32) hi[22],
             d87 = inout(reg32) hi[23],
             d88 = inout(reg32) hi[24],
             d89 = inout(reg32) hi[25],
             d90 = inout(reg32) hi[26],
             d91 = inout(reg32) hi[27],
             d92 = inout(reg32) hi[28],
             d93 = inout(reg32) hi[29],
             d94 = inout(reg32) hi[30],
             d95 = inout(reg32) hi[31],
             d96 = inout(reg32) hi[32],
             d97 = inout(reg32) hi[33],
             d98 = inout(reg32) hi[34],
             d99 = inout(reg32) hi[35],
             d100 = inout(reg32) hi[36],
             d101 = inout(reg32) hi[37],
             d102 = inout(reg32) hi[38],
             d103 = inout(reg32) hi[39],
             d104 = inout(reg32) hi[40],
             d105 = inout(reg32) hi[41],
             d106 = inout(reg32) hi[42],
             d107 = inout(reg32) hi[43],
             d108 = inout(reg32) hi[44],
             d109 = inout(reg32) hi[45],
             d110 = inout(reg32) hi[46],
             d111 = inout(reg32) hi[47],
             d112 = inout(reg32) hi[48],
             d113 = inout(reg32) hi[49],
             d114 = inout(reg32) hi[50],
             d115 = inout(reg32) hi[51],
             d116 = inout(reg32) hi[52],
             d117 = inout(reg32) hi[53],
             d118 = inout(reg32) hi[54],
             d119 = inout(reg32) hi[55],
             d120 = inout(reg32) hi[56],
             d121 = inout(reg32) hi[57],
             d122 = inout(reg32) hi[58],
             d123 = inout(reg32) hi[59],
             d124 = inout(reg32) hi[60],
             d125 = inout(reg32) hi[61],
             d126 = inout(reg32) hi[62],
             d127 = inout(reg32) hi[63],
             da = in(reg64) desc_a, db = in(reg64) desc_b, sd = in(reg32) scale_d, ta = const A_MN, tb = const B_MN,
             options(nostack));
    }
}

/// `wgmma.fence.sync.aligned`: orders the warpgroup's register accesses before the `wgmma`s
/// that follow.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_fence() {
    unsafe { asm!("wgmma.fence.sync.aligned;", options(nostack)) };
}

/// `wgmma.commit_group.sync.aligned`.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_commit() {
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack)) };
}

/// `wgmma.wait_group.sync.aligned 0`: waits for every committed `wgmma`.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_wait_all() {
    unsafe { asm!("wgmma.wait_group.sync.aligned 0;", options(nostack)) };
}

/// `wgmma.wait_group.sync.aligned 1`: waits for every committed `wgmma` group but the newest.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_wait_one() {
    unsafe { asm!("wgmma.wait_group.sync.aligned 1;", options(nostack)) };
}

/// `fence.proxy.async.shared::cta`: makes this thread's shared-memory writes (`cp.async` here)
/// visible to the async proxy that `wgmma` reads through.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn fence_proxy_async_shared() {
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// A `wgmma` shared-memory matrix descriptor without swizzling: the start address, the byte
/// offsets between core matrices (8 rows x 16 bytes) adjacent along K (`leading`) and along M or
/// N (`stride`), each in units of 16 bytes (bits 0-13, 16-29, 32-45; swizzle bits 62-63 zero).
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_desc(addr: u32, leading: u32, stride: u32) -> u64 {
    let field = |v: u32| ((v as u64) >> 4) & 0x3fff;
    field(addr) | (field(leading) << 16) | (field(stride) << 32)
}

/// A `wgmma` descriptor for a K-major tile in the 128-byte swizzle layout that TMA writes with
/// `CU_TENSOR_MAP_SWIZZLE_128B` (rows of 64 bf16, 8-row atoms of 1024 bytes, the atom 1024-byte
/// aligned): leading offset unused (1), stride 1024 bytes between 8-row groups, layout type 1
/// (bits 62-63). Moving along K by 16 elements adds 32 bytes to `addr`.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_desc_sw128(addr: u32) -> u64 {
    (((addr as u64) >> 4) & 0x3fff) | (1 << 16) | ((1024u64 >> 4) << 32) | (1u64 << 62)
}

/// A `wgmma` descriptor for an MN-major tile in TMA's 128-byte swizzle layout: rows of K, each 64
/// elements (128 bytes) of M or N, 8-row atoms of 1024 bytes (1024-byte aligned); `mn_block`
/// bytes between blocks of 64 along M or N (the leading offset), 1024 between groups of 8 rows
/// along K (the stride offset). Moving along K by 16 rows adds 2048 bytes to `addr`.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn wgmma_desc_sw128_mn(addr: u32, mn_block: u32) -> u64 {
    let field = |v: u32| ((v as u64) >> 4) & 0x3fff;
    field(addr) | (field(mn_block) << 16) | (field(1024) << 32) | (1u64 << 62)
}

/// `cp.async.bulk.tensor.2d.global.shared::cta.bulk_group`: the tensor memory accelerator copies
/// shared `src` (laid out as the map says) to the box at (`x`, `y`) of the tensor map at `tmap`,
/// leaving out what falls outside the tensor. Completes with [`bulk_commit`] /
/// [`bulk_wait_read`].
#[cfg(xent_wgmma)]
#[inline(always)]
pub unsafe fn tma_store_2d(tmap: u64, x: u32, y: u32, src: u32) {
    unsafe {
        asm!("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [{t}, {{{x}, {y}}}], [{s}];",
             t = in(reg64) tmap, x = in(reg32) x, y = in(reg32) y, s = in(reg32) src,
             options(nostack));
    }
}

/// `cp.async.bulk.commit_group`: this thread's bulk stores so far form a group.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn bulk_commit() {
    unsafe { asm!("cp.async.bulk.commit_group;", options(nostack)) };
}

/// `cp.async.bulk.wait_group.read 0`: waits until this thread's bulk stores have read their
/// shared memory (it may be written again).
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn bulk_wait_read() {
    unsafe { asm!("cp.async.bulk.wait_group.read 0;", options(nostack)) };
}

/// `cp.async.bulk.wait_group 0`: waits until this thread's bulk stores are complete.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn bulk_wait_all() {
    unsafe { asm!("cp.async.bulk.wait_group 0;", options(nostack)) };
}

/// `bar.sync id, threads`: a named barrier for `threads` of the CTA (a multiple of 32).
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn named_barrier(id: u32, threads: u32) {
    unsafe { asm!("bar.sync {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack)) };
}

/// `setmaxnreg.inc.sync.aligned.u32 N` / `.dec`: the warpgroup's registers per thread become `N`
/// (a multiple of 8 in 24..=256); every thread of the warpgroup executes it. The GEMM's consumers
/// take registers the producer gives back.
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn setmaxnreg_inc<const N: u32>() {
    unsafe { asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// See [`setmaxnreg_inc`].
#[cfg(xent_wgmma)]
#[inline(always)]
pub fn setmaxnreg_dec<const N: u32>() {
    unsafe { asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// The generic address of entry point `$entry`'s parameter block (`mov` of the parameter's
/// symbol, then `cvta.param`, PTX 7.7): tensor maps passed by value stay in parameter space,
/// where `cp.async.bulk.tensor` may read them, instead of the copy in local memory that taking
/// the address of a kernel argument in Rust makes. Only inside that entry point (its body is
/// inlined into it).
#[cfg(xent_wgmma)]
#[macro_export]
macro_rules! param_block_generic {
    ($entry:literal) => {{
        let a: u64;
        unsafe {
            core::arch::asm!(concat!("mov.b64 {a}, ", $entry, "_param_0;"), "cvta.param.u64 {a}, {a};",
                             a = out(reg64) a, options(pure, nomem, nostack));
        }
        a
    }};
}

