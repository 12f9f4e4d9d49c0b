//! The GPU kernels of `xent`, written in Rust and compiled to PTX by rustc's NVPTX backend
//! (`cargo xtask ptx`). `#![no_std]`: device primitives (`prim`, the only inline PTX), reductions
//! (`reduce`), element types (`element`), then one module per operation. The `extern
//! "ptx-kernel"` entry points below are thin and monomorphic over one generic body each.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, link_llvm_intrinsics)]
#![allow(internal_features)]
// The sm_90a module (`xent_wgmma`) holds only the warpgroup-MMA prototype: the rest compiles
// there unused.
#![cfg_attr(xent_wgmma, allow(dead_code, unused_imports))]

#[path = "../../host/src/abi.rs"]
pub mod abi;
pub mod argmax;
pub mod entropy;
pub mod element;
#[cfg(xent_wgmma)]
pub mod gemm;
pub mod lse_gemm;
pub mod opts;
pub mod prim;
pub mod reduce;
pub mod scale;
pub mod split;
#[cfg(xent_wgmma)]
pub mod wgmma;
pub mod xent;

use abi::{
    ArgmaxParams, CountParams, EntropyParams, FinishParams, LseGemmParams, ScaleParams,
    ShardArgmaxParams, ShardEntropyMergeParams, ShardEntropyParams, ShardMergeParams, XentParams,
};
#[cfg(xent_wgmma)]
use abi::{GemmParams, GradGemmParams, LseTmaParams};
use element::{Bf16, F16, F32};
use opts::{Full, Plain, RowAcc, RowCap, RowCapAcc, RowConst, RowWSmooth};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    prim::trap()
}

/// Defines `extern "ptx-kernel" fn $name(p: $params)` calling `$body(&p)`.
macro_rules! kernels {
    ($($name:ident($params:ty) => $body:expr;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(p: $params) {
            unsafe { $body(&p) }
        }
    )*};
}

#[cfg(not(xent_wgmma))]
kernels! {
    xent_count_i32(CountParams) => xent::count::<i32>;
    xent_count_i64(CountParams) => xent::count::<i64>;
    xent_finish(FinishParams) => xent::finish;
    xent_lse_gemm_bf16(LseGemmParams) => lse_gemm::lse_gemm_bf16;

    xent_fused_bf16_i32(XentParams) => xent::fused::<Bf16, i32, Plain>;
    xent_fused_bf16_i64(XentParams) => xent::fused::<Bf16, i64, Plain>;
    xent_fused_f16_i32(XentParams) => xent::fused::<F16, i32, Plain>;
    xent_fused_f16_i64(XentParams) => xent::fused::<F16, i64, Plain>;
    xent_fused_f32_i32(XentParams) => xent::fused::<F32, i32, Plain>;
    xent_fused_f32_i64(XentParams) => xent::fused::<F32, i64, Plain>;

    xent_chunk_partial_bf16_i32(XentParams) => xent::chunk_partial::<Bf16, i32, Plain>;
    xent_chunk_partial_bf16_i64(XentParams) => xent::chunk_partial::<Bf16, i64, Plain>;
    xent_chunk_partial_f16_i32(XentParams) => xent::chunk_partial::<F16, i32, Plain>;
    xent_chunk_partial_f16_i64(XentParams) => xent::chunk_partial::<F16, i64, Plain>;
    xent_chunk_partial_f32_i32(XentParams) => xent::chunk_partial::<F32, i32, Plain>;
    xent_chunk_partial_f32_i64(XentParams) => xent::chunk_partial::<F32, i64, Plain>;

    xent_chunk_grad_bf16_i32(XentParams) => xent::chunk_grad::<Bf16, i32, Plain>;
    xent_chunk_grad_bf16_i64(XentParams) => xent::chunk_grad::<Bf16, i64, Plain>;
    xent_chunk_grad_f16_i32(XentParams) => xent::chunk_grad::<F16, i32, Plain>;
    xent_chunk_grad_f16_i64(XentParams) => xent::chunk_grad::<F16, i64, Plain>;
    xent_chunk_grad_f32_i32(XentParams) => xent::chunk_grad::<F32, i32, Plain>;
    xent_chunk_grad_f32_i64(XentParams) => xent::chunk_grad::<F32, i64, Plain>;

    // Per-row option variants. The soft cap with token accuracy or class-weighted smoothing
    // (`RowCapAcc`) and class-weighted smoothing without the cap (`RowWSmooth`) have fused,
    // cluster and split kernels only (one kernel a row): the host runs `opt_` kernels for them in
    // the chunked plan and the backward pass.
    xent_fused_opt_bf16_i32(XentParams) => xent::fused::<Bf16, i32, Full>;
    xent_fused_coef_bf16_i32(XentParams) => xent::fused::<Bf16, i32, RowConst>;
    xent_fused_acc_bf16_i32(XentParams) => xent::fused::<Bf16, i32, RowAcc>;
    xent_fused_cap_bf16_i32(XentParams) => xent::fused::<Bf16, i32, RowCap>;
    xent_fused_capacc_bf16_i32(XentParams) => xent::fused::<Bf16, i32, RowCapAcc>;
    xent_fused_wsm_bf16_i32(XentParams) => xent::fused::<Bf16, i32, RowWSmooth>;
    xent_fused_opt_bf16_i64(XentParams) => xent::fused::<Bf16, i64, Full>;
    xent_fused_coef_bf16_i64(XentParams) => xent::fused::<Bf16, i64, RowConst>;
    xent_fused_acc_bf16_i64(XentParams) => xent::fused::<Bf16, i64, RowAcc>;
    xent_fused_cap_bf16_i64(XentParams) => xent::fused::<Bf16, i64, RowCap>;
    xent_fused_capacc_bf16_i64(XentParams) => xent::fused::<Bf16, i64, RowCapAcc>;
    xent_fused_wsm_bf16_i64(XentParams) => xent::fused::<Bf16, i64, RowWSmooth>;
    xent_fused_opt_f16_i32(XentParams) => xent::fused::<F16, i32, Full>;
    xent_fused_coef_f16_i32(XentParams) => xent::fused::<F16, i32, RowConst>;
    xent_fused_acc_f16_i32(XentParams) => xent::fused::<F16, i32, RowAcc>;
    xent_fused_cap_f16_i32(XentParams) => xent::fused::<F16, i32, RowCap>;
    xent_fused_capacc_f16_i32(XentParams) => xent::fused::<F16, i32, RowCapAcc>;
    xent_fused_wsm_f16_i32(XentParams) => xent::fused::<F16, i32, RowWSmooth>;
    xent_fused_opt_f16_i64(XentParams) => xent::fused::<F16, i64, Full>;
    xent_fused_coef_f16_i64(XentParams) => xent::fused::<F16, i64, RowConst>;
    xent_fused_acc_f16_i64(XentParams) => xent::fused::<F16, i64, RowAcc>;
    xent_fused_cap_f16_i64(XentParams) => xent::fused::<F16, i64, RowCap>;
    xent_fused_capacc_f16_i64(XentParams) => xent::fused::<F16, i64, RowCapAcc>;
    xent_fused_wsm_f16_i64(XentParams) => xent::fused::<F16, i64, RowWSmooth>;
    xent_fused_opt_f32_i32(XentParams) => xent::fused::<F32, i32, Full>;
    xent_fused_coef_f32_i32(XentParams) => xent::fused::<F32, i32, RowConst>;
    xent_fused_acc_f32_i32(XentParams) => xent::fused::<F32, i32, RowAcc>;
    xent_fused_cap_f32_i32(XentParams) => xent::fused::<F32, i32, RowCap>;
    xent_fused_capacc_f32_i32(XentParams) => xent::fused::<F32, i32, RowCapAcc<false>>;
    xent_fused_wsm_f32_i32(XentParams) => xent::fused::<F32, i32, RowWSmooth>;
    xent_fused_opt_f32_i64(XentParams) => xent::fused::<F32, i64, Full>;
    xent_fused_coef_f32_i64(XentParams) => xent::fused::<F32, i64, RowConst>;
    xent_fused_acc_f32_i64(XentParams) => xent::fused::<F32, i64, RowAcc>;
    xent_fused_cap_f32_i64(XentParams) => xent::fused::<F32, i64, RowCap>;
    xent_fused_capacc_f32_i64(XentParams) => xent::fused::<F32, i64, RowCapAcc<false>>;
    xent_fused_wsm_f32_i64(XentParams) => xent::fused::<F32, i64, RowWSmooth>;
    xent_chunk_partial_opt_bf16_i32(XentParams) => xent::chunk_partial::<Bf16, i32, Full>;
    xent_chunk_partial_coef_bf16_i32(XentParams) => xent::chunk_partial::<Bf16, i32, RowConst>;
    xent_chunk_partial_acc_bf16_i32(XentParams) => xent::chunk_partial::<Bf16, i32, RowAcc>;
    xent_chunk_partial_cap_bf16_i32(XentParams) => xent::chunk_partial::<Bf16, i32, RowCap>;
    xent_chunk_partial_opt_bf16_i64(XentParams) => xent::chunk_partial::<Bf16, i64, Full>;
    xent_chunk_partial_coef_bf16_i64(XentParams) => xent::chunk_partial::<Bf16, i64, RowConst>;
    xent_chunk_partial_acc_bf16_i64(XentParams) => xent::chunk_partial::<Bf16, i64, RowAcc>;
    xent_chunk_partial_cap_bf16_i64(XentParams) => xent::chunk_partial::<Bf16, i64, RowCap>;
    xent_chunk_partial_opt_f16_i32(XentParams) => xent::chunk_partial::<F16, i32, Full>;
    xent_chunk_partial_coef_f16_i32(XentParams) => xent::chunk_partial::<F16, i32, RowConst>;
    xent_chunk_partial_acc_f16_i32(XentParams) => xent::chunk_partial::<F16, i32, RowAcc>;
    xent_chunk_partial_cap_f16_i32(XentParams) => xent::chunk_partial::<F16, i32, RowCap>;
    xent_chunk_partial_opt_f16_i64(XentParams) => xent::chunk_partial::<F16, i64, Full>;
    xent_chunk_partial_coef_f16_i64(XentParams) => xent::chunk_partial::<F16, i64, RowConst>;
    xent_chunk_partial_acc_f16_i64(XentParams) => xent::chunk_partial::<F16, i64, RowAcc>;
    xent_chunk_partial_cap_f16_i64(XentParams) => xent::chunk_partial::<F16, i64, RowCap>;
    xent_chunk_partial_opt_f32_i32(XentParams) => xent::chunk_partial::<F32, i32, Full>;
    xent_chunk_partial_coef_f32_i32(XentParams) => xent::chunk_partial::<F32, i32, RowConst>;
    xent_chunk_partial_acc_f32_i32(XentParams) => xent::chunk_partial::<F32, i32, RowAcc>;
    xent_chunk_partial_cap_f32_i32(XentParams) => xent::chunk_partial::<F32, i32, RowCap>;
    xent_chunk_partial_opt_f32_i64(XentParams) => xent::chunk_partial::<F32, i64, Full>;
    xent_chunk_partial_coef_f32_i64(XentParams) => xent::chunk_partial::<F32, i64, RowConst>;
    xent_chunk_partial_acc_f32_i64(XentParams) => xent::chunk_partial::<F32, i64, RowAcc>;
    xent_chunk_partial_cap_f32_i64(XentParams) => xent::chunk_partial::<F32, i64, RowCap>;
    // The second passes count no token accuracy: no `acc_` kernels (the host runs `coef_`, the
    // same code), and no `capacc_` or `wsm_` ones.
    xent_chunk_grad_opt_bf16_i32(XentParams) => xent::chunk_grad::<Bf16, i32, Full>;
    xent_chunk_grad_coef_bf16_i32(XentParams) => xent::chunk_grad::<Bf16, i32, RowConst>;
    xent_chunk_grad_cap_bf16_i32(XentParams) => xent::chunk_grad::<Bf16, i32, RowCap>;
    xent_chunk_grad_opt_bf16_i64(XentParams) => xent::chunk_grad::<Bf16, i64, Full>;
    xent_chunk_grad_coef_bf16_i64(XentParams) => xent::chunk_grad::<Bf16, i64, RowConst>;
    xent_chunk_grad_cap_bf16_i64(XentParams) => xent::chunk_grad::<Bf16, i64, RowCap>;
    xent_chunk_grad_opt_f16_i32(XentParams) => xent::chunk_grad::<F16, i32, Full>;
    xent_chunk_grad_coef_f16_i32(XentParams) => xent::chunk_grad::<F16, i32, RowConst>;
    xent_chunk_grad_cap_f16_i32(XentParams) => xent::chunk_grad::<F16, i32, RowCap>;
    xent_chunk_grad_opt_f16_i64(XentParams) => xent::chunk_grad::<F16, i64, Full>;
    xent_chunk_grad_coef_f16_i64(XentParams) => xent::chunk_grad::<F16, i64, RowConst>;
    xent_chunk_grad_cap_f16_i64(XentParams) => xent::chunk_grad::<F16, i64, RowCap>;
    xent_chunk_grad_opt_f32_i32(XentParams) => xent::chunk_grad::<F32, i32, Full>;
    xent_chunk_grad_coef_f32_i32(XentParams) => xent::chunk_grad::<F32, i32, RowConst>;
    xent_chunk_grad_cap_f32_i32(XentParams) => xent::chunk_grad::<F32, i32, RowCap>;
    xent_chunk_grad_opt_f32_i64(XentParams) => xent::chunk_grad::<F32, i64, Full>;
    xent_chunk_grad_coef_f32_i64(XentParams) => xent::chunk_grad::<F32, i64, RowConst>;
    xent_chunk_grad_cap_f32_i64(XentParams) => xent::chunk_grad::<F32, i64, RowCap>;

    xent_backward_bf16_i32(XentParams) => xent::backward::<Bf16, i32, Plain>;
    xent_backward_bf16_i64(XentParams) => xent::backward::<Bf16, i64, Plain>;
    xent_backward_f16_i32(XentParams) => xent::backward::<F16, i32, Plain>;
    xent_backward_f16_i64(XentParams) => xent::backward::<F16, i64, Plain>;
    xent_backward_f32_i32(XentParams) => xent::backward::<F32, i32, Plain>;
    xent_backward_f32_i64(XentParams) => xent::backward::<F32, i64, Plain>;
    xent_backward_coef_bf16_i32(XentParams) => xent::backward::<Bf16, i32, RowConst>;
    xent_backward_cap_bf16_i32(XentParams) => xent::backward::<Bf16, i32, RowCap>;
    xent_backward_coef_bf16_i64(XentParams) => xent::backward::<Bf16, i64, RowConst>;
    xent_backward_cap_bf16_i64(XentParams) => xent::backward::<Bf16, i64, RowCap>;
    xent_backward_coef_f16_i32(XentParams) => xent::backward::<F16, i32, RowConst>;
    xent_backward_cap_f16_i32(XentParams) => xent::backward::<F16, i32, RowCap>;
    xent_backward_coef_f16_i64(XentParams) => xent::backward::<F16, i64, RowConst>;
    xent_backward_cap_f16_i64(XentParams) => xent::backward::<F16, i64, RowCap>;
    xent_backward_coef_f32_i32(XentParams) => xent::backward::<F32, i32, RowConst>;
    xent_backward_cap_f32_i32(XentParams) => xent::backward::<F32, i32, RowCap>;
    xent_backward_coef_f32_i64(XentParams) => xent::backward::<F32, i64, RowConst>;
    xent_backward_cap_f32_i64(XentParams) => xent::backward::<F32, i64, RowCap>;
    xent_backward_opt_bf16_i32(XentParams) => xent::backward::<Bf16, i32, Full>;
    xent_backward_opt_bf16_i64(XentParams) => xent::backward::<Bf16, i64, Full>;
    xent_backward_opt_f16_i32(XentParams) => xent::backward::<F16, i32, Full>;
    xent_backward_opt_f16_i64(XentParams) => xent::backward::<F16, i64, Full>;
    xent_backward_opt_f32_i32(XentParams) => xent::backward::<F32, i32, Full>;
    xent_backward_opt_f32_i64(XentParams) => xent::backward::<F32, i64, Full>;

    xent_scale_bf16(ScaleParams) => scale::scale::<Bf16>;
    xent_scale_f16(ScaleParams) => scale::scale::<F16>;
    xent_scale_f32(ScaleParams) => scale::scale::<F32>;

    xent_argmax_bf16_i32(ArgmaxParams) => argmax::argmax::<Bf16, i32>;
    xent_argmax_bf16_i64(ArgmaxParams) => argmax::argmax::<Bf16, i64>;
    xent_argmax_f16_i32(ArgmaxParams) => argmax::argmax::<F16, i32>;
    xent_argmax_f16_i64(ArgmaxParams) => argmax::argmax::<F16, i64>;
    xent_argmax_f32_i32(ArgmaxParams) => argmax::argmax::<F32, i32>;
    xent_argmax_f32_i64(ArgmaxParams) => argmax::argmax::<F32, i64>;

    xent_entropy_bf16_i32(EntropyParams) => entropy::entropy::<Bf16, i32>;
    xent_entropy_bf16_i64(EntropyParams) => entropy::entropy::<Bf16, i64>;
    xent_entropy_f16_i32(EntropyParams) => entropy::entropy::<F16, i32>;
    xent_entropy_f16_i64(EntropyParams) => entropy::entropy::<F16, i64>;
    xent_entropy_f32_i32(EntropyParams) => entropy::entropy::<F32, i32>;
    xent_entropy_f32_i64(EntropyParams) => entropy::entropy::<F32, i64>;

    // Vocabulary-parallel token accuracy and predicted tokens: a shard's argmax, then the ranks'.
    xent_shard_argmax_bf16_i32(ShardArgmaxParams) => argmax::shard_argmax::<Bf16, i32>;
    xent_shard_argmax_bf16_i64(ShardArgmaxParams) => argmax::shard_argmax::<Bf16, i64>;
    xent_shard_argmax_f16_i32(ShardArgmaxParams) => argmax::shard_argmax::<F16, i32>;
    xent_shard_argmax_f16_i64(ShardArgmaxParams) => argmax::shard_argmax::<F16, i64>;
    xent_shard_argmax_f32_i32(ShardArgmaxParams) => argmax::shard_argmax::<F32, i32>;
    xent_shard_argmax_f32_i64(ShardArgmaxParams) => argmax::shard_argmax::<F32, i64>;
    xent_shard_merge_i32(ShardMergeParams) => argmax::shard_argmax_merge::<i32>;
    xent_shard_merge_i64(ShardMergeParams) => argmax::shard_argmax_merge::<i64>;

    // Vocabulary-parallel entropies: a shard's summary, then the ranks'.
    xent_shard_entropy_bf16_i32(ShardEntropyParams) => entropy::shard_entropy::<Bf16, i32>;
    xent_shard_entropy_bf16_i64(ShardEntropyParams) => entropy::shard_entropy::<Bf16, i64>;
    xent_shard_entropy_f16_i32(ShardEntropyParams) => entropy::shard_entropy::<F16, i32>;
    xent_shard_entropy_f16_i64(ShardEntropyParams) => entropy::shard_entropy::<F16, i64>;
    xent_shard_entropy_f32_i32(ShardEntropyParams) => entropy::shard_entropy::<F32, i32>;
    xent_shard_entropy_f32_i64(ShardEntropyParams) => entropy::shard_entropy::<F32, i64>;
    xent_shard_entropy_merge_i32(ShardEntropyMergeParams) => entropy::shard_entropy_merge::<i32>;
    xent_shard_entropy_merge_i64(ShardEntropyMergeParams) => entropy::shard_entropy_merge::<i64>;
}

#[cfg(xent_cluster)]
kernels! {
    // Small calls of the plain loss, ordered for latency (`xent::cluster_small`).
    xent_cluster_small_bf16_i32(XentParams) => xent::cluster_small::<Bf16, i32>;
    xent_cluster_small_bf16_i64(XentParams) => xent::cluster_small::<Bf16, i64>;
    xent_cluster_small_f16_i32(XentParams) => xent::cluster_small::<F16, i32>;
    xent_cluster_small_f16_i64(XentParams) => xent::cluster_small::<F16, i64>;
    xent_cluster_small_f32_i32(XentParams) => xent::cluster_small::<F32, i32>;
    xent_cluster_small_f32_i64(XentParams) => xent::cluster_small::<F32, i64>;

    xent_cluster_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, Plain>;
    xent_cluster_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, Plain>;
    xent_cluster_f16_i32(XentParams) => xent::cluster::<F16, i32, Plain>;
    xent_cluster_f16_i64(XentParams) => xent::cluster::<F16, i64, Plain>;
    xent_cluster_f32_i32(XentParams) => xent::cluster::<F32, i32, Plain>;
    xent_cluster_f32_i64(XentParams) => xent::cluster::<F32, i64, Plain>;
    xent_cluster_opt_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, Full>;
    xent_cluster_coef_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, RowConst>;
    xent_cluster_acc_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, RowAcc>;
    xent_cluster_cap_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, RowCap>;
    xent_cluster_capacc_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, RowCapAcc>;
    xent_cluster_wsm_bf16_i32(XentParams) => xent::cluster::<Bf16, i32, RowWSmooth>;
    xent_cluster_opt_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, Full>;
    xent_cluster_coef_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, RowConst>;
    xent_cluster_acc_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, RowAcc>;
    xent_cluster_cap_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, RowCap>;
    xent_cluster_capacc_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, RowCapAcc>;
    xent_cluster_wsm_bf16_i64(XentParams) => xent::cluster::<Bf16, i64, RowWSmooth>;
    xent_cluster_opt_f16_i32(XentParams) => xent::cluster::<F16, i32, Full>;
    xent_cluster_coef_f16_i32(XentParams) => xent::cluster::<F16, i32, RowConst>;
    xent_cluster_acc_f16_i32(XentParams) => xent::cluster::<F16, i32, RowAcc>;
    xent_cluster_cap_f16_i32(XentParams) => xent::cluster::<F16, i32, RowCap>;
    xent_cluster_capacc_f16_i32(XentParams) => xent::cluster::<F16, i32, RowCapAcc>;
    xent_cluster_wsm_f16_i32(XentParams) => xent::cluster::<F16, i32, RowWSmooth>;
    xent_cluster_opt_f16_i64(XentParams) => xent::cluster::<F16, i64, Full>;
    xent_cluster_coef_f16_i64(XentParams) => xent::cluster::<F16, i64, RowConst>;
    xent_cluster_acc_f16_i64(XentParams) => xent::cluster::<F16, i64, RowAcc>;
    xent_cluster_cap_f16_i64(XentParams) => xent::cluster::<F16, i64, RowCap>;
    xent_cluster_capacc_f16_i64(XentParams) => xent::cluster::<F16, i64, RowCapAcc>;
    xent_cluster_wsm_f16_i64(XentParams) => xent::cluster::<F16, i64, RowWSmooth>;
    xent_cluster_opt_f32_i32(XentParams) => xent::cluster::<F32, i32, Full>;
    xent_cluster_coef_f32_i32(XentParams) => xent::cluster::<F32, i32, RowConst>;
    xent_cluster_acc_f32_i32(XentParams) => xent::cluster::<F32, i32, RowAcc>;
    xent_cluster_cap_f32_i32(XentParams) => xent::cluster::<F32, i32, RowCap>;
    xent_cluster_capacc_f32_i32(XentParams) => xent::cluster::<F32, i32, RowCapAcc<false>>;
    xent_cluster_wsm_f32_i32(XentParams) => xent::cluster::<F32, i32, RowWSmooth>;
    xent_cluster_opt_f32_i64(XentParams) => xent::cluster::<F32, i64, Full>;
    xent_cluster_coef_f32_i64(XentParams) => xent::cluster::<F32, i64, RowConst>;
    xent_cluster_acc_f32_i64(XentParams) => xent::cluster::<F32, i64, RowAcc>;
    xent_cluster_cap_f32_i64(XentParams) => xent::cluster::<F32, i64, RowCap>;
    xent_cluster_capacc_f32_i64(XentParams) => xent::cluster::<F32, i64, RowCapAcc<false>>;
    xent_cluster_wsm_f32_i64(XentParams) => xent::cluster::<F32, i64, RowWSmooth>;
}

// The split plan's kernels: sm_80 only (on sm_90 the cluster kernels take every shape).
#[cfg(not(any(xent_cluster, xent_wgmma)))]
kernels! {
    xent_split_bf16_i32(XentParams) => split::split::<Bf16, i32, Plain>;
    xent_split_coef_bf16_i32(XentParams) => split::split::<Bf16, i32, RowConst>;
    xent_split_acc_bf16_i32(XentParams) => split::split::<Bf16, i32, RowAcc>;
    xent_split_cap_bf16_i32(XentParams) => split::split::<Bf16, i32, RowCap>;
    xent_split_capacc_bf16_i32(XentParams) => split::split::<Bf16, i32, RowCapAcc>;
    xent_split_wsm_bf16_i32(XentParams) => split::split::<Bf16, i32, RowWSmooth>;
    xent_split_opt_bf16_i32(XentParams) => split::split::<Bf16, i32, Full>;
    xent_split_bf16_i64(XentParams) => split::split::<Bf16, i64, Plain>;
    xent_split_coef_bf16_i64(XentParams) => split::split::<Bf16, i64, RowConst>;
    xent_split_acc_bf16_i64(XentParams) => split::split::<Bf16, i64, RowAcc>;
    xent_split_cap_bf16_i64(XentParams) => split::split::<Bf16, i64, RowCap>;
    xent_split_capacc_bf16_i64(XentParams) => split::split::<Bf16, i64, RowCapAcc>;
    xent_split_wsm_bf16_i64(XentParams) => split::split::<Bf16, i64, RowWSmooth>;
    xent_split_opt_bf16_i64(XentParams) => split::split::<Bf16, i64, Full>;
    xent_split_f16_i32(XentParams) => split::split::<F16, i32, Plain>;
    xent_split_coef_f16_i32(XentParams) => split::split::<F16, i32, RowConst>;
    xent_split_acc_f16_i32(XentParams) => split::split::<F16, i32, RowAcc>;
    xent_split_cap_f16_i32(XentParams) => split::split::<F16, i32, RowCap>;
    xent_split_capacc_f16_i32(XentParams) => split::split::<F16, i32, RowCapAcc>;
    xent_split_wsm_f16_i32(XentParams) => split::split::<F16, i32, RowWSmooth>;
    xent_split_opt_f16_i32(XentParams) => split::split::<F16, i32, Full>;
    xent_split_f16_i64(XentParams) => split::split::<F16, i64, Plain>;
    xent_split_coef_f16_i64(XentParams) => split::split::<F16, i64, RowConst>;
    xent_split_acc_f16_i64(XentParams) => split::split::<F16, i64, RowAcc>;
    xent_split_cap_f16_i64(XentParams) => split::split::<F16, i64, RowCap>;
    xent_split_capacc_f16_i64(XentParams) => split::split::<F16, i64, RowCapAcc>;
    xent_split_wsm_f16_i64(XentParams) => split::split::<F16, i64, RowWSmooth>;
    xent_split_opt_f16_i64(XentParams) => split::split::<F16, i64, Full>;
    xent_split_f32_i32(XentParams) => split::split::<F32, i32, Plain>;
    xent_split_coef_f32_i32(XentParams) => split::split::<F32, i32, RowConst>;
    xent_split_acc_f32_i32(XentParams) => split::split::<F32, i32, RowAcc>;
    xent_split_cap_f32_i32(XentParams) => split::split::<F32, i32, RowCap>;
    xent_split_capacc_f32_i32(XentParams) => split::split::<F32, i32, RowCapAcc<false>>;
    xent_split_wsm_f32_i32(XentParams) => split::split::<F32, i32, RowWSmooth>;
    xent_split_opt_f32_i32(XentParams) => split::split::<F32, i32, Full>;
    xent_split_f32_i64(XentParams) => split::split::<F32, i64, Plain>;
    xent_split_coef_f32_i64(XentParams) => split::split::<F32, i64, RowConst>;
    xent_split_acc_f32_i64(XentParams) => split::split::<F32, i64, RowAcc>;
    xent_split_cap_f32_i64(XentParams) => split::split::<F32, i64, RowCap>;
    xent_split_capacc_f32_i64(XentParams) => split::split::<F32, i64, RowCapAcc<false>>;
    xent_split_wsm_f32_i64(XentParams) => split::split::<F32, i64, RowWSmooth>;
    xent_split_opt_f32_i64(XentParams) => split::split::<F32, i64, Full>;
}

// The split plan with the chunks left in L2 (`split::split_l2`): sm_80, the plain loss only.
#[cfg(not(any(xent_cluster, xent_wgmma)))]
kernels! {
    xent_split_l2_bf16_i32(XentParams) => split::split_l2::<Bf16, i32, Plain>;
    xent_split_l2_bf16_i64(XentParams) => split::split_l2::<Bf16, i64, Plain>;
    xent_split_l2_f16_i32(XentParams) => split::split_l2::<F16, i32, Plain>;
    xent_split_l2_f16_i64(XentParams) => split::split_l2::<F16, i64, Plain>;
    xent_split_l2_f32_i32(XentParams) => split::split_l2::<F32, i32, Plain>;
    xent_split_l2_f32_i64(XentParams) => split::split_l2::<F32, i64, Plain>;
}

// The sm_90a module: Hopper's warpgroup MMA, which PTX for plain sm_90 cannot name (and which
// newer GPUs cannot JIT), so it lives apart from the main PTX.
#[cfg(xent_wgmma)]
kernels! {
    xent_lse_wgmma_bf16(LseGemmParams) => wgmma::lse_wgmma_bf16;
    xent_lse_wgmma_pipe_bf16(LseGemmParams) => wgmma::lse_wgmma_pipe_bf16;
    xent_lse_tma_bf16(LseTmaParams) => wgmma::lse_tma_bf16;
    xent_gemm_tn_bf16(GemmParams) => gemm::gemm_tn_bf16;
    xent_gemm_grads_bf16(GradGemmParams) => gemm::gemm_grads_bf16;
}
